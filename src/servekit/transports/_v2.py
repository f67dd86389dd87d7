"""Pure codec for the Open Inference Protocol (OIP, "KServe V2") REST API.

No HTTP and no I/O here: bytes and dicts in, bytes and dicts out. A transport reads the
body (refusing it past ``Limits.max_body_bytes`` while reading), passes it with the raw
``Inference-Header-Content-Length`` header to :func:`decode_infer_request`, maps
:class:`V2Error` to HTTP 400 with ``{"error": message}``, and sends what
:func:`encode_infer_response` returns (setting ``Inference-Header-Content-Length`` when
the returned header length is not ``None``).

Supported: the JSON tensor form of the spec and Triton's binary tensor data extension
(a JSON header followed by raw little-endian tensor bytes).

Decisions
---------
* **JSON strictness.** Bodies must be UTF-8 JSON per RFC 8259: the bare tokens ``NaN``,
  ``Infinity`` and ``-Infinity`` are refused, and so are duplicate keys in one object
  (last-wins parsing lets a proxy and the server read different requests). Nesting
  deeper than ``Limits.max_json_depth`` is refused by a linear scan *before* parsing,
  so a 250,000-deep ``[[[...`` costs a few microseconds and can never hit Python's
  recursion limit. Depth counts every array and object: ``[]`` has depth 1, the
  smallest inference request (an object holding ``inputs``, a list of objects holding
  ``data``) already has depth 4.
* **Unknown keys** (top level, inputs, outputs) are ignored, as the spec allows
  extensions.
* **Shapes** are lists of non-negative ``int`` (``true``/``false`` and floats refused),
  at most 32 dimensions (numpy's portable limit). The element count is computed with
  Python ints and checked against ``max_elements_per_tensor`` and
  ``max_total_elements`` before anything is allocated.
* **JSON data** may be flat or nested in any way; it is flattened iteratively in
  row-major order and only the element count must equal the shape's product (as
  Triton does). A scalar (shape ``[]``) is sent as ``[x]``.
* **Element types.** BOOL: only ``true``/``false`` (not 0/1). Integer types: only JSON
  integers (not booleans, not ``1.0``) within the datatype's range. FP16/FP32/FP64:
  JSON numbers (ints or floats) plus exactly the strings ``"NaN"``, ``"Infinity"`` and
  ``"-Infinity"`` (the form the encoder writes, since JSON has no non-finite numbers);
  any other string, and a finite number that overflows the datatype (``1e39`` as
  FP32, ``1e999``), is refused. BYTES: JSON strings, stored as their UTF-8 bytes
  (lone surrogates refused); each element at most ``max_bytes_element`` bytes.
* **Binary data** (``parameters.binary_data_size``, an int >= 0) excludes ``data``.
  Inputs take their bytes from the section after the JSON header in input order;
  the sizes must add up to exactly the bytes after the header (trailing bytes and
  short bodies are both refused). Without a header length the whole body is JSON, so
  only empty binary inputs are possible. Fixed-size types must have exactly
  ``count * itemsize`` bytes, little-endian; BOOL bytes must be 0 or 1. BYTES elements
  are 4-byte little-endian length prefixes plus bytes; every prefix must fit in the
  input's own section and the element count must equal the shape's product. Decoded
  arrays are fresh, writable, native-endian copies; ``binary_data_size`` is removed
  from the input's ``parameters``.
* **Header length** (``Inference-Header-Content-Length``): an ``int`` or a string of
  ASCII digits (surrounding whitespace allowed), with ``0 < n <= len(body)``.
* **Requested outputs**: unique non-empty string names; ``binary`` is the output's
  ``parameters.binary_data`` (the extension's name; ``binary_data_output`` there is
  read too) when present, else the request's ``parameters.binary_data_output``, else
  ``False``; all must be booleans.
* **Timeout and priority.** ``parameters.servekit_timeout_s`` is a timeout in seconds
  (servekit's own key); when it is absent, Triton's ``parameters.timeout`` is read in
  *microseconds*. Either must be a finite number >= 0 (booleans refused); 0 means "no
  timeout" (``timeout_s`` is then ``None``), as in Triton. ``parameters.priority`` must
  be an int >= 0 (Triton: 0 is the default priority) and is returned as given.
* **Response JSON.** ``data`` is a flat row-major list. FP16/FP32 values are written as
  the exact decimal of their value (``1.100000023841858`` for FP32 ``1.1``), so a
  JSON round trip is bit-identical; non-finite floats are written as the strings
  ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (NaN payload bits are only kept in binary
  form). BYTES are written as strings when they are valid UTF-8; a non-UTF-8 element
  in a JSON output raises :class:`V2Error` telling the client to ask for binary
  output (``binary_data_output``), rather than silently changing the format.
  ``id`` is present exactly when the request sent one (echoed verbatim, TR-10).
* **Errors.** Every malformed request raises :class:`V2Error` (an
  :class:`~servekit.errors.InvalidInput`, hence a ``ValueError``). Programming errors
  on the server side (a :class:`Tensor` whose data does not match its shape, an output
  array of an unsupported dtype) raise ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._v2_errors import Limits, V2Error
from ._v2_json import _json_type, _name, _object, _optional_bool, _parameters, parse_json_bounded
from ._v2_tensors import (
    DATATYPES,
    Tensor,
    _binary_array,
    _binary_data,
    _InputPlan,
    _json_array,
    _json_data,
    _plan_input,
)

__all__ = [
    "InferRequest",
    "RequestedOutput",
    "decode_infer_request",
    "encode_infer_response",
    "model_metadata",
    "server_metadata",
]


#: Longest accepted decimal string for ``Inference-Header-Content-Length``.
_MAX_HEADER_DIGITS = 20


@dataclass(frozen=True)
class RequestedOutput:
    """An output named in a request's ``outputs``.

    ``binary`` says whether the client wants it in the binary section (its own
    ``binary_data`` parameter, else the request's ``binary_data_output``); ``parameters`` is the
    output's parameters object as sent.
    """

    name: str
    binary: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request.

    ``id`` is the client's request id (``None`` when not sent); ``outputs`` is empty
    when the client did not name outputs (then it wants all of them);
    ``binary_output_default`` is the request's ``parameters.binary_data_output``,
    which applies to outputs not named in ``outputs``.
    """

    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output_default: bool = False

    @property
    def timeout_s(self) -> float | None:
        """The timeout in seconds, or ``None`` for none.

        From ``parameters.servekit_timeout_s`` (seconds), else Triton's
        ``parameters.timeout`` (microseconds); 0, absent or invalid values give ``None``.
        """
        seconds = _nonneg_number(self.parameters.get("servekit_timeout_s"))
        if seconds is None:
            micros = _nonneg_number(self.parameters.get("timeout"))
            seconds = None if micros is None else micros / 1e6
        return seconds if seconds else None

    @property
    def priority(self) -> int | None:
        """``parameters.priority`` (an int >= 0, 0 being Triton's default), or ``None``."""
        value = self.parameters.get("priority")
        if type(value) is int and value >= 0:
            return value
        return None


def _nonneg_number(value: object) -> float | None:
    if type(value) in (int, float):
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:  # an integer past a float's range is invalid (TR-12's fuzz)
            return None
        if math.isfinite(number) and number >= 0:
            return number
    return None


# ----------------------------------------------------------------------- decoding


def _parse_header_length(header_length: int | str | None, body_len: int) -> int:
    if header_length is None:
        return body_len
    if isinstance(header_length, bool):
        raise V2Error("Inference-Header-Content-Length must be an integer")
    if isinstance(header_length, str):
        text = header_length.strip(" \t")
        if not text or len(text) > _MAX_HEADER_DIGITS or not text.isascii() or not text.isdigit():
            raise V2Error(
                f"Inference-Header-Content-Length {header_length[:40]!r} is not a "
                "non-negative decimal integer"
            )
        value = int(text)
    elif isinstance(header_length, int):
        value = header_length
    else:
        raise V2Error("Inference-Header-Content-Length must be an integer")
    if value <= 0 or value > body_len:
        raise V2Error(
            f"Inference-Header-Content-Length {value} is outside 1..{body_len} (the body size)"
        )
    return value


def decode_infer_request(
    body: bytes,
    *,
    header_length: int | str | None = None,
    limits: Limits = Limits(),  # noqa: B008 - frozen: sharing it is safe
) -> InferRequest:
    """Decode an OIP V2 inference request body (JSON, or JSON plus binary tensor data).

    ``header_length`` is the raw value of the ``Inference-Header-Content-Length`` HTTP
    header when the client sent one. Every malformed request raises :class:`V2Error`
    whose message names the offending field; see the module docstring for the rules.
    Limits are checked before any tensor memory is allocated.
    """
    if len(body) > limits.max_body_bytes:
        raise V2Error(
            f"body has {len(body)} bytes; at most {limits.max_body_bytes} allowed (max_body_bytes)"
        )
    json_len = _parse_header_length(header_length, len(body))
    view = memoryview(body)
    header = _object(parse_json_bounded(view[:json_len], limits.max_json_depth), "request")

    request_id = header.get("id")
    if "id" in header and not isinstance(request_id, str):
        raise V2Error(f"id must be a string, not {_json_type(request_id)}")
    params = _parameters(header, "request")
    binary_default = bool(_optional_bool(params, "binary_data_output", "request"))
    _check_known_parameters(params)

    if "inputs" not in header:
        raise V2Error("inputs is required")
    raw_inputs = header["inputs"]
    if not isinstance(raw_inputs, list):
        raise V2Error(f"inputs must be an array, not {_json_type(raw_inputs)}")
    if not raw_inputs:
        raise V2Error("inputs must not be empty")
    if len(raw_inputs) > limits.max_inputs:
        raise V2Error(f"{len(raw_inputs)} inputs; at most {limits.max_inputs} allowed (max_inputs)")
    plans: list[_InputPlan] = []
    names: set[str] = set()
    total = 0
    for i, raw in enumerate(raw_inputs):
        plan = _plan_input(raw, f"inputs[{i}]", limits)
        if plan.name in names:
            raise V2Error(f"inputs[{i}].name {plan.name!r} is a duplicate")
        names.add(plan.name)
        total += plan.count
        if total > limits.max_total_elements:
            raise V2Error(
                f"inputs hold more than {limits.max_total_elements} elements in total "
                "(max_total_elements)"
            )
        plans.append(plan)

    outputs = _decode_outputs(header, binary_default, limits)

    remaining = len(body) - json_len
    wanted = sum(p.binary_size for p in plans if p.binary_size is not None)
    if wanted != remaining:
        raise V2Error(
            f"inputs declare {wanted} bytes of binary data (binary_data_size), but "
            f"{remaining} bytes follow the JSON header"
        )

    tensors: list[Tensor] = []
    offset = json_len
    for i, plan in enumerate(plans):
        where = f"inputs[{i}]"
        if plan.binary_size is None:
            array = _json_array(plan, where, limits)
        else:
            section = view[offset : offset + plan.binary_size]
            offset += plan.binary_size
            array = _binary_array(plan, section, where, limits)
        tensors.append(Tensor(plan.name, plan.datatype, plan.shape, array, plan.parameters))
    return InferRequest(
        id=request_id,
        inputs=tuple(tensors),
        outputs=outputs,
        parameters=params,
        binary_output_default=binary_default,
    )


def _check_known_parameters(params: dict[str, Any]) -> None:
    for key in ("servekit_timeout_s", "timeout"):
        if key in params:
            value = params[key]
            if type(value) not in (int, float) or _nonneg_number(value) is None:
                raise V2Error(f"request.parameters.{key} must be a finite number >= 0")
    if "priority" in params:
        value = params["priority"]
        if type(value) is not int or value < 0:
            raise V2Error("request.parameters.priority must be an integer >= 0")


def _decode_outputs(
    header: dict[str, Any], binary_default: bool, limits: Limits
) -> tuple[RequestedOutput, ...]:
    if "outputs" not in header:
        return ()
    raw_outputs = header["outputs"]
    if not isinstance(raw_outputs, list):
        raise V2Error(f"outputs must be an array, not {_json_type(raw_outputs)}")
    if len(raw_outputs) > limits.max_outputs:
        raise V2Error(
            f"{len(raw_outputs)} outputs; at most {limits.max_outputs} allowed (max_outputs)"
        )
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_outputs):
        where = f"outputs[{i}]"
        item = _object(raw, where)
        name = _name(item, where)
        if name in seen:
            raise V2Error(f"{where}.name {name!r} is a duplicate")
        seen.add(name)
        params = _parameters(item, where)
        # The extension names it ``binary_data`` on a requested output (what
        # tritonclient sends); ``binary_data_output`` there is accepted as well.
        binary = _optional_bool(params, "binary_data", where)
        if binary is None:
            binary = _optional_bool(params, "binary_data_output", where)
        result.append(RequestedOutput(name, binary_default if binary is None else binary, params))
    return tuple(result)


# ----------------------------------------------------------------------- encoding


def encode_infer_response(
    *,
    model_name: str,
    model_version: str | None,
    id: str | None,  # the protocol's field name
    outputs: Sequence[Tensor],
    binary: set[str] | bool = False,
) -> tuple[bytes, int | None]:
    """Encode an OIP V2 inference response.

    ``binary`` is ``True`` (every output binary), ``False`` (all JSON) or the set of
    output names to send binary. Returns the body and, when any output is binary, the
    JSON header's length for ``Inference-Header-Content-Length`` (``None`` otherwise).
    ``model_version`` and ``id`` are omitted when ``None`` (TR-10: ``id`` only when the
    request had one). See the module docstring for the JSON forms of floats and BYTES.
    """
    body: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        body["model_version"] = model_version
    if id is not None:
        body["id"] = id
    json_outputs: list[dict[str, Any]] = []
    sections: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": [int(d) for d in tensor.shape],
        }
        params = dict(tensor.parameters)
        is_binary = binary if isinstance(binary, bool) else tensor.name in binary
        if is_binary:
            raw = _binary_data(tensor)
            sections.append(raw)
            params["binary_data_size"] = len(raw)
            entry["parameters"] = params
        else:
            params.pop("binary_data_size", None)
            if params:
                entry["parameters"] = params
            entry["data"] = _json_data(tensor)
        json_outputs.append(entry)
    body["outputs"] = json_outputs
    header = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if not sections:
        return header, None
    return header + b"".join(sections), len(header)


# ----------------------------------------------------------------------- metadata


def _metadata_tensors(tensors: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for i, t in enumerate(tensors):
        name, datatype, shape = t["name"], t["datatype"], t["shape"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}[{i}].name must be a non-empty string")
        if datatype not in DATATYPES:
            raise ValueError(f"{where}[{i}].datatype {datatype!r} is not an OIP datatype")
        dims = [int(d) for d in shape]
        if any(d < -1 for d in dims):
            raise ValueError(f"{where}[{i}].shape dimensions must be >= -1 (-1: variable)")
        result.append({"name": name, "datatype": datatype, "shape": dims})
    return result


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The spec's ``metadata_model_response`` object.

    ``inputs``/``outputs`` are mappings with ``name``, ``datatype`` and ``shape`` (``-1``
    for a variable dimension); they are validated and copied.

    >>> model_metadata("m", ["1"], "servekit", [], [])["versions"]
    ['1']
    """
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": _metadata_tensors(inputs, "inputs"),
        "outputs": _metadata_tensors(outputs, "outputs"),
    }


def server_metadata(name: str, version: str, extensions: Sequence[str]) -> dict[str, Any]:
    """The spec's ``metadata_server_response`` object.

    >>> server_metadata("servekit", "0.1", ["binary_tensor_data"])["extensions"]
    ['binary_tensor_data']
    """
    return {"name": name, "version": version, "extensions": [str(e) for e in extensions]}
