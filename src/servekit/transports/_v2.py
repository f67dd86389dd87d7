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
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from servekit.errors import InvalidInput

__all__ = [
    "DATATYPES",
    "InferRequest",
    "Limits",
    "RequestedOutput",
    "Tensor",
    "V2Error",
    "datatype_of",
    "decode_infer_request",
    "encode_infer_response",
    "model_metadata",
    "parse_json_bounded",
    "server_metadata",
    "tensor_from_array",
]

#: Most dimensions a shape may have (numpy 1.x's limit; numpy 2 allows 64).
_MAX_DIMS = 32
#: Longest accepted decimal string for ``Inference-Header-Content-Length``.
_MAX_HEADER_DIGITS = 20


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


#: OIP datatype name -> numpy dtype (BYTES -> ``object`` arrays holding ``bytes``).
DATATYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "BOOL": np.dtype(np.bool_),
        "UINT8": np.dtype(np.uint8),
        "UINT16": np.dtype(np.uint16),
        "UINT32": np.dtype(np.uint32),
        "UINT64": np.dtype(np.uint64),
        "INT8": np.dtype(np.int8),
        "INT16": np.dtype(np.int16),
        "INT32": np.dtype(np.int32),
        "INT64": np.dtype(np.int64),
        "FP16": np.dtype(np.float16),
        "FP32": np.dtype(np.float32),
        "FP64": np.dtype(np.float64),
        "BYTES": np.dtype(object),
    }
)

_KIND_SIZE_TO_DATATYPE: dict[tuple[str, int], str] = {
    (dtype.kind, dtype.itemsize): name for name, dtype in DATATYPES.items() if name != "BYTES"
}
_INT_TYPES = frozenset(n for n, d in DATATYPES.items() if d.kind in "iu")
_FLOAT_TYPES = frozenset(("FP16", "FP32", "FP64"))
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def datatype_of(array: npt.NDArray[Any]) -> str:
    """Return the OIP datatype name of a numpy array's dtype (byte order ignored).

    Object, ``str`` (``U``) and ``bytes`` (``S``) arrays are ``"BYTES"``; other dtypes
    (complex, datetime, ...) raise ``ValueError``.

    >>> datatype_of(np.zeros(2, dtype=np.float32))
    'FP32'
    """
    dtype = np.asarray(array).dtype
    if dtype.kind in "OUS":
        return "BYTES"
    name = _KIND_SIZE_TO_DATATYPE.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return name


@dataclass(frozen=True, eq=False)
class Tensor:
    """One named tensor of a request or response.

    ``data`` is a numpy array of exactly ``shape`` whose dtype is ``DATATYPES[datatype]``
    (BYTES: an object array of ``bytes``). ``parameters`` holds the tensor's OIP
    parameters. Equality is identity (arrays have no single truth value); compare
    ``data`` with numpy. Build one from any array with :func:`tensor_from_array`.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"Tensor {self.name!r}: unknown datatype {self.datatype!r}")
        if not isinstance(self.data, np.ndarray):
            raise TypeError(f"Tensor {self.name!r}: data must be a numpy array")
        if tuple(self.data.shape) != tuple(self.shape):
            raise ValueError(
                f"Tensor {self.name!r}: data has shape {self.data.shape}, not {self.shape}"
            )
        if datatype_of(self.data) != self.datatype:
            raise ValueError(
                f"Tensor {self.name!r}: data of dtype {self.data.dtype} is not {self.datatype}"
            )


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


# --------------------------------------------------------------------------- JSON

# A JSON string literal, or one structural bracket. An unterminated string runs to the
# end of the input (the parser then refuses it), so every match succeeds on its first,
# greedy path: the scan is linear even for input like '"\\"\\"\\"...' with no closing quote.
_SCAN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
_OPENERS = frozenset("[{")
_CLOSERS = frozenset("]}")


def _refuse_constant(token: str) -> Any:
    raise V2Error(
        f"invalid JSON: {token} is not a JSON value; send non-finite floats as the strings "
        '"NaN", "Infinity", "-Infinity"'
    )


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise V2Error(f"invalid JSON: duplicate key {key!r} in one object")
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(
    parse_constant=_refuse_constant, object_pairs_hook=_object_without_duplicates
)


def parse_json_bounded(body: bytes | memoryview, max_depth: int) -> Any:
    """Parse UTF-8 JSON ``body``, refusing nesting deeper than ``max_depth``.

    The depth is checked by a linear scan before the (recursive) parser runs, so deep
    input is refused quickly and never reaches Python's recursion limit. Invalid UTF-8,
    invalid JSON, ``NaN``/``Infinity`` tokens and duplicate keys raise :class:`V2Error`.

    >>> parse_json_bounded(b'{"a": [1, 2]}', 2)
    {'a': [1, 2]}
    """
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise V2Error(f"invalid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = 0
    # Fewer brackets in all than the limit (most bodies): no need to scan for depth.
    scan = text.count("[") + text.count("{") > max_depth
    for match in _SCAN.finditer(text) if scan else ():
        token = match.group()
        if token in _OPENERS:
            depth += 1
            if depth > max_depth:
                raise V2Error(f"invalid JSON: nested deeper than {max_depth} levels")
        elif token in _CLOSERS:
            depth -= 1
    try:
        return _DECODER.decode(text)
    except V2Error:
        raise
    except RecursionError:  # pragma: no cover - the scan bounds the depth
        raise V2Error("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int strings past Python's digit limit
        raise V2Error(f"invalid JSON: {exc}") from None


# ----------------------------------------------------------------------- decoding


@dataclass
class _InputPlan:
    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int
    parameters: dict[str, Any]
    data: list[Any] | None
    binary_size: int | None


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


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise V2Error(f"{where} must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _name(item: dict[str, Any], where: str) -> str:
    if "name" not in item:
        raise V2Error(f"{where}.name is required")
    name = item["name"]
    if not isinstance(name, str) or not name:
        raise V2Error(f"{where}.name must be a non-empty string, not {_json_type(name)}")
    return name


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    if "parameters" not in item:
        return {}
    return dict(_object(item["parameters"], f"{where}.parameters"))


def _optional_bool(params: dict[str, Any], key: str, where: str) -> bool | None:
    if key not in params:
        return None
    value = params[key]
    if not isinstance(value, bool):
        raise V2Error(f"{where}.parameters.{key} must be true or false")
    return value


def _shape_and_count(raw: Any, where: str, limits: Limits) -> tuple[tuple[int, ...], int]:
    if not isinstance(raw, list):
        raise V2Error(f"{where}.shape must be an array of integers, not {_json_type(raw)}")
    if len(raw) > _MAX_DIMS:
        raise V2Error(f"{where}.shape has {len(raw)} dimensions; at most {_MAX_DIMS} allowed")
    for i, dim in enumerate(raw):
        if type(dim) is not int:
            raise V2Error(f"{where}.shape[{i}] must be an integer, not {_json_type(dim)}")
        if dim < 0:
            raise V2Error(f"{where}.shape[{i}] is {dim}; dimensions must be >= 0")
    shape = tuple(raw)
    if 0 in shape:
        return shape, 0
    count = 1
    for dim in shape:  # stops as soon as the limit is passed: no huge ints
        count *= dim
        if count > limits.max_elements_per_tensor:
            raise V2Error(
                f"{where}.shape {list(shape)} has more than "
                f"{limits.max_elements_per_tensor} elements (max_elements_per_tensor)"
            )
    return shape, count


def _plan_input(raw: Any, where: str, limits: Limits) -> _InputPlan:
    item = _object(raw, where)
    name = _name(item, where)
    if "datatype" not in item:
        raise V2Error(f"{where}.datatype is required")
    datatype = item["datatype"]
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise V2Error(
            f"{where}.datatype {str(datatype)[:40]!r} is not one of {', '.join(DATATYPES)}"
        )
    if "shape" not in item:
        raise V2Error(f"{where}.shape is required")
    shape, count = _shape_and_count(item["shape"], where, limits)
    params = _parameters(item, where)
    has_data = "data" in item
    if "binary_data_size" in params:
        size = params.pop("binary_data_size")
        if type(size) is not int or size < 0:
            raise V2Error(f"{where}.parameters.binary_data_size must be an integer >= 0")
        if has_data:
            raise V2Error(f"{where} has both data and parameters.binary_data_size")
        if datatype != "BYTES" and size != count * DATATYPES[datatype].itemsize:
            raise V2Error(
                f"{where}.parameters.binary_data_size is {size}, but shape {list(shape)} of "
                f"{datatype} needs {count * DATATYPES[datatype].itemsize} bytes"
            )
        return _InputPlan(name, datatype, shape, count, params, None, size)
    if not has_data:
        raise V2Error(f"{where} needs data or parameters.binary_data_size")
    data = item["data"]
    if not isinstance(data, list):
        raise V2Error(f"{where}.data must be an array, not {_json_type(data)}")
    return _InputPlan(name, datatype, shape, count, params, data, None)


def _flatten(data: list[Any], expected: int, where: str) -> list[Any]:
    if not any(type(x) is list for x in data):
        flat = data
    else:
        flat = []
        stack: list[Iterator[Any]] = [iter(data)]
        while stack:
            for item in stack[-1]:
                if type(item) is list:
                    stack.append(iter(item))
                    break
                flat.append(item)
                if len(flat) > expected:
                    break
            else:
                stack.pop()
                continue
            if len(flat) > expected:
                break
    if len(flat) != expected:
        got = f"more than {expected}" if len(flat) > expected else str(len(flat))
        raise V2Error(f"{where}.data has {got} elements, but its shape needs {expected}")
    return flat


def _first_bad(flat: list[Any], ok: Any) -> int:
    return next(i for i, x in enumerate(flat) if not ok(x))


def _json_array(plan: _InputPlan, where: str, limits: Limits) -> npt.NDArray[Any]:
    flat = _flatten(plan.data or [], plan.count, where)
    datatype = plan.datatype
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        if not all(type(x) is bool for x in flat):
            i = _first_bad(flat, lambda x: type(x) is bool)
            raise V2Error(f"{where}.data[{i}] must be true or false for BOOL, got {flat[i]!r:.40}")
        array = np.array(flat, dtype=dtype)
    elif datatype in _INT_TYPES:
        if not all(type(x) is int for x in flat):
            i = _first_bad(flat, lambda x: type(x) is int)
            raise V2Error(
                f"{where}.data[{i}] must be an integer for {datatype}, got {flat[i]!r:.40}"
            )
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
        if flat and (min(flat) < lo or max(flat) > hi):
            i = _first_bad(flat, lambda x: lo <= x <= hi)
            raise V2Error(f"{where}.data[{i}] is outside the range of {datatype} ({lo}..{hi})")
        array = np.array(flat, dtype=dtype)
    elif datatype in _FLOAT_TYPES:
        array = _json_floats(flat, dtype, datatype, where)
    else:  # BYTES
        array = np.empty(len(flat), dtype=object)
        for i, x in enumerate(flat):
            if not isinstance(x, str):
                raise V2Error(f"{where}.data[{i}] must be a string for BYTES, got {x!r:.40}")
            try:
                encoded = x.encode("utf-8")
            except UnicodeEncodeError:
                raise V2Error(f"{where}.data[{i}] is not valid Unicode (lone surrogate)") from None
            if len(encoded) > limits.max_bytes_element:
                raise V2Error(
                    f"{where}.data[{i}] has {len(encoded)} bytes; at most "
                    f"{limits.max_bytes_element} allowed (max_bytes_element)"
                )
            array[i] = encoded
    return array.reshape(plan.shape)


def _json_floats(
    flat: list[Any], dtype: np.dtype[Any], datatype: str, where: str
) -> npt.NDArray[Any]:
    values: list[float] = []
    special: list[bool] = []
    for i, x in enumerate(flat):
        kind = type(x)
        if kind is float or kind is int:
            try:
                values.append(float(x))
            except OverflowError:
                raise V2Error(f"{where}.data[{i}] is out of range for {datatype}") from None
            special.append(False)
        elif kind is str and x in _NONFINITE_IN:
            values.append(_NONFINITE_IN[x])
            special.append(True)
        else:
            raise V2Error(
                f'{where}.data[{i}] must be a number (or "NaN", "Infinity", '
                f'"-Infinity") for {datatype}, got {x!r:.40}'
            )
    source = np.array(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        array = source.astype(dtype)
    overflow = np.isinf(array) & ~np.array(special, dtype=bool)
    if overflow.any():
        i = int(np.flatnonzero(overflow)[0])
        raise V2Error(f"{where}.data[{i}] is out of range for {datatype}")
    return array


def _binary_array(
    plan: _InputPlan, section: memoryview, where: str, limits: Limits
) -> npt.NDArray[Any]:
    datatype = plan.datatype
    if datatype != "BYTES":
        dtype = DATATYPES[datatype]
        raw = np.frombuffer(section, dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
        if datatype == "BOOL":
            as_bytes = np.frombuffer(section, dtype=np.uint8)
            if as_bytes.size and int(as_bytes.max()) > 1:
                raise V2Error(f"{where}: BOOL binary data must hold only bytes 0 and 1")
        return raw.astype(dtype).reshape(plan.shape)
    array = np.empty(plan.count, dtype=object)
    offset, end, n = 0, len(section), 0
    while offset < end:
        if n >= plan.count:
            raise V2Error(
                f"{where}: binary BYTES data holds more than the {plan.count} elements "
                "its shape needs"
            )
        if offset + 4 > end:
            raise V2Error(f"{where}: binary BYTES element {n} has a truncated length prefix")
        (length,) = struct.unpack_from("<I", section, offset)
        offset += 4
        if length > limits.max_bytes_element:
            raise V2Error(
                f"{where}: binary BYTES element {n} has {length} bytes; at most "
                f"{limits.max_bytes_element} allowed (max_bytes_element)"
            )
        if offset + length > end:
            raise V2Error(
                f"{where}: binary BYTES element {n} length {length} points past the end "
                "of its binary data"
            )
        array[n] = bytes(section[offset : offset + length])
        offset += length
        n += 1
    if n != plan.count:
        raise V2Error(
            f"{where}: binary BYTES data holds {n} elements, but its shape needs {plan.count}"
        )
    return array.reshape(plan.shape)


def decode_infer_request(
    body: bytes,
    *,
    header_length: int | str | None = None,
    limits: Limits = Limits(),  # frozen: sharing it is safe
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


def tensor_from_array(name: str, array: Any) -> Tensor:
    """Build a :class:`Tensor` from a numpy array, a (nested) list or a scalar.

    The datatype follows the dtype (:func:`datatype_of`). ``str``/``bytes`` arrays and
    object arrays holding only ``str``/``bytes`` become BYTES (``str`` as UTF-8). Lists
    of ``bytes`` keep their exact bytes (numpy ``S`` arrays would drop trailing NULs).

    >>> tensor_from_array("y", [1.5, 2.5]).datatype
    'FP64'
    """
    if isinstance(array, np.ndarray):
        data = array
    else:
        try:
            data = np.asarray(array)
        except ValueError:  # mixed str and non-ASCII bytes, ragged lists
            data = np.array(array, dtype=object)
        if data.dtype.kind in "US":  # fixed-width strings drop trailing NULs: keep objects
            data = np.array(array, dtype=object)
    if data.dtype.kind in "OUS":
        converted = np.empty(data.shape, dtype=object)
        flat_in = data.reshape(-1)
        flat_out = converted.reshape(-1)
        for i, x in enumerate(flat_in):
            if isinstance(x, (bytes, bytearray, memoryview, np.bytes_)):
                flat_out[i] = bytes(x)
            elif isinstance(x, str):
                flat_out[i] = x.encode("utf-8")
            else:
                raise TypeError(
                    f"tensor {name!r}: element {i} is {type(x).__name__}; BYTES tensors hold "
                    "only str or bytes"
                )
        data = converted
    datatype = datatype_of(data)
    if datatype != "BYTES" and data.dtype != DATATYPES[datatype]:
        data = data.astype(DATATYPES[datatype])  # native byte order
    return Tensor(name, datatype, tuple(int(d) for d in data.shape), data)


def _json_data(tensor: Tensor) -> list[Any]:
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        result: list[Any] = []
        for i, x in enumerate(flat):
            raw = _bytes_element(tensor, i, x)
            try:
                result.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise V2Error(
                    f"output {tensor.name!r} element {i} is not valid UTF-8 and cannot be sent "
                    "as JSON; request it with parameters.binary_data_output = true"
                ) from None
        return result
    if tensor.datatype in _FLOAT_TYPES:
        values: list[Any] = flat.astype(np.float64).tolist()
        if not np.isfinite(flat).all():
            for i in np.flatnonzero(~np.isfinite(flat)).tolist():
                v = values[i]
                values[i] = "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        return values
    plain: list[Any] = flat.tolist()
    return plain


def _bytes_element(tensor: Tensor, i: int, x: Any) -> bytes:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, str):
        return x.encode("utf-8")
    raise TypeError(
        f"output {tensor.name!r} element {i} is {type(x).__name__}; BYTES holds str or bytes"
    )


def _binary_data(tensor: Tensor) -> bytes:
    if tensor.datatype != "BYTES":
        dtype = DATATYPES[tensor.datatype]
        little = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
        return np.ascontiguousarray(tensor.data, dtype=little).tobytes()
    parts: list[bytes] = []
    for i, x in enumerate(tensor.data.reshape(-1)):
        raw = _bytes_element(tensor, i, x)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


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
