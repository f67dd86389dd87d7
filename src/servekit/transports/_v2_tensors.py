"""Tensors of the OIP V2 codec: datatypes, shapes, and tensor data as JSON or binary.

:data:`DATATYPES` maps the protocol's datatype names to numpy dtypes and a
:class:`Tensor` is one named array of them. The private helpers decode one request
input (its shape, then its JSON ``data`` or its bytes of the binary tensor data
extension) into an array, and encode one output array as JSON ``data`` or as raw
little-endian bytes; the REST codec (:mod:`servekit.transports._v2`, whose docstring
states the rules) and the gRPC codec share them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from ._v2_errors import Limits, V2Error
from ._v2_json import _json_type, _name, _object, _parameters

__all__ = ["DATATYPES", "Tensor", "datatype_of", "tensor_from_array"]


#: Most dimensions a shape may have (numpy 1.x's limit; numpy 2 allows 64).
_MAX_DIMS = 32


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
