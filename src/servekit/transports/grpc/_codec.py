"""The codec between the gRPC messages of the Open Inference Protocol and the V2 records.

A ``ModelInferRequest`` becomes the same :class:`~servekit.transports._v2.InferRequest`
the REST codec produces, checked by the same functions and under the same
:class:`~servekit.transports.Limits`: shapes and element counts by ``_shape_and_count``
(before anything is allocated), ``raw_input_contents`` by ``_binary_array`` (the raw
form is the REST binary tensor extension's: row-major little-endian elements, BYTES as
4-byte little-endian length prefixes plus bytes), the timeout and priority parameters
by ``_check_known_parameters``. Outputs are the REST path's tensors, written as typed
``contents`` or as ``raw_output_contents`` (the bytes ``_binary_data`` writes).

Decisions:

- **Typed contents** must use the field of the input's datatype (``fp32_contents`` for
  FP32, ``int_contents`` for INT8/INT16/INT32, ...) and hold exactly the shape's
  element count; another populated field is refused. Values of INT8/INT16/UINT8/UINT16
  inputs (carried in 32-bit fields) must be in their type's range. FP16 has no typed
  field in the protocol: it is raw only.
- **Raw contents**: one entry per input, in input order; then no input may carry
  ``contents``. A fixed-size type needs exactly ``count * itemsize`` bytes.
- **Output form**: raw when the request sent raw inputs (a client that speaks raw
  reads raw) or when an output has no typed field (FP16), else typed.
- **Parameters** (``InferParameter``) map to plain values: bool, int (int64, uint64),
  str, float. Triton's ``timeout`` (microseconds) and servekit's ``servekit_timeout_s``
  work as on REST.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _v2, _v2_tensors
from .._v2 import InferRequest, RequestedOutput
from .._v2_errors import Limits, V2Error
from .._v2_tensors import DATATYPES, Tensor
from ._proto import open_inference_grpc_pb2 as pb

__all__ = ["decode_infer_request", "encode_infer_response", "parameters"]

#: The typed ``InferTensorContents`` field of each datatype (FP16: none, raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Up to this many values, typed contents are converted by iterating (see _typed_array).
_FROMITER_MAX = 32

# The numpy type a typed field's values arrive as, before the range check.
_WIRE_DTYPE: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


def parameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as a dict of plain values (a
    parameter with no value set is left out)."""
    if not raw:
        return {}
    result: dict[str, Any] = {}
    for key, value in raw.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            result[key] = getattr(value, choice)
    return result


def _set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if value >= 2**63:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = str(value)


def _typed_array(
    contents: Any, plan: _v2_tensors._InputPlan, where: str, limits: Limits
) -> npt.NDArray[Any]:
    datatype: str = plan.datatype
    field = CONTENTS_FIELD.get(datatype)
    populated = [fd.name for fd, _ in contents.ListFields()]
    if field is None:
        raise V2Error(
            f"{where}: {datatype} has no typed contents in the protocol; send it in "
            "raw_input_contents"
        )
    others = [name for name in populated if name != field]
    if others:
        raise V2Error(f"{where} is {datatype}, so its contents go in {field}, not {others[0]}")
    values = getattr(contents, field)
    if len(values) != plan.count:
        raise V2Error(
            f"{where}.contents.{field} has {len(values)} elements, but shape "
            f"{list(plan.shape)} needs {plan.count}"
        )
    if datatype == "BYTES":
        array = np.empty(plan.count, dtype=object)
        for i, x in enumerate(values):
            if len(x) > limits.max_bytes_element:
                raise V2Error(
                    f"{where}.contents.bytes_contents[{i}] has {len(x)} bytes; at most "
                    f"{limits.max_bytes_element} allowed (max_bytes_element)"
                )
            array[i] = x
        return array.reshape(plan.shape)
    # np.array reads the container through its buffer in a constant ~1 µs whatever the
    # size; for a handful of values iterating (fromiter) is cheaper than that set-up.
    if plan.count <= _FROMITER_MAX:
        wire = np.fromiter(values, _WIRE_DTYPE[field], plan.count)
    else:
        wire = np.array(values, dtype=_WIRE_DTYPE[field])
    dtype = DATATYPES[datatype]
    if dtype != wire.dtype:  # INT8/INT16/UINT8/UINT16 in a 32-bit field
        info = np.iinfo(dtype)
        outside = (wire < info.min) | (wire > info.max)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise V2Error(
                f"{where}.contents.{field}[{i}] is outside the range of {datatype} "
                f"({info.min}..{info.max})"
            )
        wire = wire.astype(dtype)
    return wire.reshape(plan.shape)


def _raw_array(
    raw: bytes, plan: _v2_tensors._InputPlan, where: str, limits: Limits
) -> npt.NDArray[Any]:
    if plan.datatype != "BYTES":
        needed = plan.count * DATATYPES[plan.datatype].itemsize
        if len(raw) != needed:
            raise V2Error(
                f"{where}: its raw_input_contents entry has {len(raw)} bytes, but shape "
                f"{list(plan.shape)} of {plan.datatype} needs {needed}"
            )
    return _v2_tensors._binary_array(plan, memoryview(raw), where, limits)


def decode_infer_request(request: Any, limits: Limits) -> InferRequest:
    """Decode a ``ModelInferRequest`` into an :class:`InferRequest`; every malformed
    request raises :class:`V2Error` naming the field (see the module docstring)."""
    inputs = request.inputs
    if not inputs:
        raise V2Error("inputs must not be empty")
    if len(inputs) > limits.max_inputs:
        raise V2Error(f"{len(inputs)} inputs; at most {limits.max_inputs} allowed (max_inputs)")
    raw: Sequence[bytes] = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise V2Error(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; send one "
            "per input, in input order"
        )
    params = parameters(request.parameters)
    _v2._check_known_parameters(params)

    tensors: list[Tensor] = []
    names: set[str] = set()
    total = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        name, datatype = tensor.name, tensor.datatype
        if not name:
            raise V2Error(f"{where}.name is required")
        if name in names:
            raise V2Error(f"{where}.name {name!r} is a duplicate")
        names.add(name)
        if datatype not in DATATYPES:
            raise V2Error(
                f"{where}.datatype {datatype[:40]!r} is not one of {', '.join(DATATYPES)}"
            )
        shape, count = _v2_tensors._shape_and_count(list(tensor.shape), where, limits)
        total += count
        if total > limits.max_total_elements:
            raise V2Error(
                f"inputs hold more than {limits.max_total_elements} elements in total "
                "(max_total_elements)"
            )
        tensor_params = parameters(tensor.parameters)
        plan = _v2_tensors._InputPlan(name, datatype, shape, count, tensor_params, None, None)
        if raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise V2Error(
                    f"{where} has contents, but the request sends raw_input_contents; use "
                    "one form for every input"
                )
            array = _raw_array(raw[i], plan, where, limits)
        else:
            array = _typed_array(tensor.contents, plan, where, limits)
        tensors.append(Tensor(name, datatype, shape, array, tensor_params))

    if len(request.outputs) > limits.max_outputs:
        raise V2Error(
            f"{len(request.outputs)} outputs; at most {limits.max_outputs} allowed (max_outputs)"
        )
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, output in enumerate(request.outputs):
        if not output.name:
            raise V2Error(f"outputs[{i}].name is required")
        if output.name in seen:
            raise V2Error(f"outputs[{i}].name {output.name!r} is a duplicate")
        seen.add(output.name)
        outputs.append(RequestedOutput(output.name, False, parameters(output.parameters)))
    return InferRequest(
        id=request.id or None,
        inputs=tuple(tensors),
        outputs=tuple(outputs),
        parameters=params,
        binary_output_default=bool(raw),
    )


def _typed_values(tensor: Tensor) -> list[Any]:
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [_v2_tensors._bytes_element(tensor, i, x) for i, x in enumerate(flat)]
    values: list[Any] = flat.tolist()
    return values


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    id: str | None,  # the protocol's field name
    outputs: Sequence[Tensor],
    raw: bool,
) -> Any:
    """A ``ModelInferResponse`` holding ``outputs``: in ``raw_output_contents`` when
    ``raw`` (or when an output has no typed field, FP16), else as typed contents."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version)
    if id is not None:
        response.id = id
    raw = raw or any(t.datatype not in CONTENTS_FIELD for t in outputs)
    for tensor in outputs:
        out = response.outputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=[int(d) for d in tensor.shape]
        )
        if tensor.parameters:
            _set_parameters(out.parameters, tensor.parameters)
        if raw:
            response.raw_output_contents.append(_v2_tensors._binary_data(tensor))
        else:
            getattr(out.contents, CONTENTS_FIELD[tensor.datatype]).extend(_typed_values(tensor))
    return response
