"""The error and the resource limits of the OIP V2 codec (:mod:`servekit.transports._v2`).

Every malformed request raises :class:`V2Error`; :class:`Limits` caps what one request
may make the decoder allocate.
"""

from __future__ import annotations

from dataclasses import dataclass

from servekit.errors import InvalidInput

__all__ = ["Limits", "V2Error"]


class V2Error(InvalidInput):
    """A malformed OIP V2 request; the message says what is wrong.

    Transports answer HTTP 400 with ``{"error": message}``.

    >>> V2Error("inputs: required").code
    'invalid_v2_request'
    """

    code = "invalid_v2_request"


@dataclass(frozen=True)
class Limits:
    """Resource caps applied while decoding a request (SEC-06); exceeding one is a
    :class:`V2Error`."""

    #: Deepest nesting of JSON arrays/objects (``[]`` is depth 1).
    max_json_depth: int = 64
    #: Most inputs in one request.
    max_inputs: int = 64
    #: Most requested outputs in one request.
    max_outputs: int = 64
    #: Most elements in one tensor (the product of its shape).
    max_elements_per_tensor: int = 16_777_216
    #: Most elements across all inputs of one request.
    max_total_elements: int = 67_108_864
    #: Most bytes in one BYTES element.
    max_bytes_element: int = 16_777_216
    #: Largest body (JSON header plus binary section) in bytes.
    max_body_bytes: int = 64 * 2**20
