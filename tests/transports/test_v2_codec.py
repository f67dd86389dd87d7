"""Tests of the OIP V2 REST codec (servekit.transports._v2): no HTTP here.

Golden payloads are copied from the Open Inference Protocol REST spec,
/work/shared/specs/open_inference_rest.yaml (kserve/open-inference-protocol,
specification/protocol/open_inference_rest.yaml at ff934734c2675b80102abdeb9c2ea2d712026a41),
``components.schemas.inference_request.x-examples`` ("Example 1" and "Example 2").
"""

from __future__ import annotations

import gc
import json
import struct
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest

from servekit.errors import InvalidInput
from servekit.transports._v2 import (
    InferRequest,
    decode_infer_request,
    encode_infer_response,
    model_metadata,
    server_metadata,
)
from servekit.transports._v2_errors import Limits, V2Error
from servekit.transports._v2_json import parse_json_bounded
from servekit.transports._v2_tensors import DATATYPES, Tensor, datatype_of, tensor_from_array

# ------------------------------------------------------------------------ helpers


def _body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _req(*inputs: dict[str, Any], **top: Any) -> bytes:
    return _body({"inputs": list(inputs), **top})


def _inp(
    name: str = "x", datatype: str = "FP32", shape: Any = (2,), data: Any = (1.0, 2.0)
) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": list(data)}


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    n = len(body) if header_length is None else header_length
    return json.loads(body[:n]), body[n:]


def _round_trip(tensor: Tensor, *, binary: bool) -> Tensor:
    """Encode ``tensor`` as a response output, send it back as a request input, decode."""
    body, hlen = encode_infer_response(
        model_name="m", model_version=None, id=None, outputs=[tensor], binary=binary
    )
    assert (hlen is not None) is binary
    header, rest = _split(body, hlen)
    request_json = _body({"inputs": header["outputs"]})
    request = decode_infer_request(
        request_json + rest, header_length=len(request_json) if binary else None
    )
    (decoded,) = request.inputs
    return decoded


def _refused(body: bytes, match: str = "", **kwargs: Any) -> V2Error:
    with pytest.raises(V2Error, match=match) as info:
        decode_infer_request(body, **kwargs)
    return info.value


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------- golden (spec)

# open_inference_rest.yaml, inference_request.x-examples["Example 1"], verbatim.
SPEC_EXAMPLE_1 = {
    "id": "42",
    "inputs": [
        {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
        {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True]},
    ],
    "outputs": [{"name": "output0"}],
}

# open_inference_rest.yaml, inference_request.x-examples["Example 2"] (a response body:
# it has outputs with data), verbatim.
SPEC_EXAMPLE_2 = {
    "id": "42",
    "outputs": [
        {
            "name": "output0",
            "shape": [3, 2],
            "datatype": "FP32",
            "data": [1, 1.1, 2, 2.1, 3, 3.1],
        }
    ],
}


def test_v2_spec_example_1_verbatim_is_refused_for_its_count_mismatch() -> None:
    # The spec's own example declares BOOL shape [3] with one element: a count mismatch.
    _refused(_body(SPEC_EXAMPLE_1), r"inputs\[1\]\.data has 1 elements, but its shape needs 3")


def test_v2_spec_example_1_decodes_with_the_count_fixed() -> None:
    example = json.loads(json.dumps(SPEC_EXAMPLE_1))
    example["inputs"][1]["data"] = [True, False, True]
    request = decode_infer_request(_body(example))
    assert request.id == "42"
    input0, input1 = request.inputs
    assert (input0.name, input0.datatype, input0.shape) == ("input0", "UINT32", (2, 2))
    assert input0.data.dtype == np.uint32
    assert input0.data.tolist() == [[1, 2], [3, 4]]
    assert (input1.name, input1.datatype, input1.shape) == ("input1", "BOOL", (3,))
    assert input1.data.tolist() == [True, False, True]
    assert [(o.name, o.binary, o.parameters) for o in request.outputs] == [("output0", False, {})]
    assert request.parameters == {} and request.timeout_s is None and request.priority is None


def test_v2_spec_example_2_response_golden() -> None:
    expected = SPEC_EXAMPLE_2["outputs"][0]
    data = np.array(expected["data"], dtype=np.float32).reshape(3, 2)
    body, hlen = encode_infer_response(
        model_name="m",
        model_version="1",
        id="42",
        outputs=[tensor_from_array("output0", data)],
    )
    assert hlen is None
    got = json.loads(body)
    assert set(got) == {"model_name", "model_version", "id", "outputs"}
    assert (got["model_name"], got["model_version"], got["id"]) == ("m", "1", "42")
    (out,) = got["outputs"]
    assert {k: out[k] for k in ("name", "shape", "datatype")} == {
        k: expected[k] for k in ("name", "shape", "datatype")
    }
    # FP32 is written as the exact value; as FP32 it equals the spec's numbers.
    assert np.array_equal(
        np.array(out["data"], dtype=np.float32), np.array(expected["data"], dtype=np.float32)
    )


# ---------------------------------------------------------------------- round trips

_SAMPLES: dict[str, Any] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 1, 255], dtype=np.uint8),
    "UINT16": np.array([0, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], dtype=np.int16),
    "INT32": np.array([[-(2**31)], [2**31 - 1]], dtype=np.int32),
    "INT64": np.array([-(2**63), -1, 0, 2**63 - 1], dtype=np.int64),
    "FP16": np.array([0.1, -2.5, 65504.0, 6e-8, np.inf, -np.inf, -0.0], dtype=np.float16),
    "FP32": np.array([[1.1, -0.0, 3.4028235e38], [1e-45, np.inf, np.nan]], dtype=np.float32),
    "FP64": np.array([0.1, 1e308, -5e-324, np.nan, -np.inf], dtype=np.float64),
    "BYTES": np.array([b"", b"abc", "h\u00e9llo \u2603".encode(), b"a\x00"], dtype=object),
}
_BINARY_ONLY_BYTES = np.array([b"\xff\xfe\x00", b"ok"], dtype=object)


def test_v2_datatype_table_is_complete() -> None:
    assert set(DATATYPES) == set(_SAMPLES)
    assert DATATYPES["BYTES"] == np.dtype(object)
    for name, sample in _SAMPLES.items():
        assert datatype_of(sample) == name
    assert datatype_of(np.zeros(1, dtype=">i4")) == "INT32"
    with pytest.raises(ValueError, match="complex"):
        datatype_of(np.zeros(1, dtype=np.complex64))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", sorted(_SAMPLES))
def test_v2_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    sample = _SAMPLES[datatype]
    tensor = tensor_from_array("t", sample)
    assert tensor.datatype == datatype
    decoded = _round_trip(tensor, binary=binary)
    assert (decoded.name, decoded.datatype, decoded.shape) == ("t", datatype, sample.shape)
    assert decoded.data.dtype == DATATYPES[datatype]
    if datatype == "BYTES":
        assert decoded.data.tolist() == sample.tolist()
        assert all(type(x) is bytes for x in decoded.data.reshape(-1))
    else:
        # bit-identical, NaN included
        assert decoded.data.tobytes() == sample.tobytes()
    assert decoded.parameters == {}


def test_v2_round_trip_non_utf8_bytes_binary_only() -> None:
    tensor = tensor_from_array("b", _BINARY_ONLY_BYTES)
    assert _round_trip(tensor, binary=True).data.tolist() == _BINARY_ONLY_BYTES.tolist()
    with pytest.raises(V2Error, match="binary_data_output"):
        encode_infer_response(model_name="m", model_version=None, id=None, outputs=[tensor])


def test_v2_response_json_forms() -> None:
    outputs = [
        tensor_from_array("f", np.array([[1.5, np.nan], [np.inf, -np.inf]], dtype=np.float64)),
        tensor_from_array("s", ["caf\u00e9", b"x"]),
        tensor_from_array("i", 7),
    ]
    body, hlen = encode_infer_response(model_name="m", model_version=None, id=None, outputs=outputs)
    assert hlen is None
    got = json.loads(body)
    assert got == {
        "model_name": "m",
        "outputs": [
            {
                "name": "f",
                "datatype": "FP64",
                "shape": [2, 2],
                "data": [1.5, "NaN", "Infinity", "-Infinity"],
            },
            {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["caf\u00e9", "x"]},
            {"name": "i", "datatype": "INT64", "shape": [], "data": [7]},
        ],
    }


def test_v2_response_binary_subset_and_header_length() -> None:
    a = tensor_from_array("a", np.array([1, 2], dtype=np.int32))
    b = tensor_from_array("b", np.array([0.5], dtype=np.float32))
    body, hlen = encode_infer_response(
        model_name="m", model_version="2", id="r", outputs=[a, b], binary={"b"}
    )
    assert hlen is not None
    header, rest = _split(body, hlen)
    assert header["outputs"][0]["data"] == [1, 2]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 4}
    assert "data" not in header["outputs"][1]
    assert rest == struct.pack("<f", 0.5)


def test_v2_binary_request_mixed_with_json_inputs() -> None:
    strings = [b"ab", b"", b"\x00\xff"]
    raw_bytes = b"".join(struct.pack("<I", len(s)) + s for s in strings)
    raw_f16 = np.array([1.0, -2.0], dtype="<f2").tobytes()
    header = _body(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(raw_bytes), "keep": 1},
                },
                _inp("j", "INT8", (2,), (1, -1)),
                {
                    "name": "h",
                    "datatype": "FP16",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": len(raw_f16)},
                },
            ],
            "parameters": {"binary_data_output": True},
            "outputs": [
                {"name": "o1"},
                {"name": "o2", "parameters": {"binary_data_output": False}},
            ],
        }
    )
    request = decode_infer_request(header + raw_bytes + raw_f16, header_length=str(len(header)))
    s, j, h = request.inputs
    assert s.data.tolist() == strings and s.parameters == {"keep": 1}
    assert j.data.tolist() == [1, -1]
    assert h.data.dtype == np.float16 and h.data.tolist() == [[1.0, -2.0]]
    assert h.data.flags.writeable
    assert request.binary_output_default is True
    assert [(o.name, o.binary) for o in request.outputs] == [("o1", True), ("o2", False)]


def test_v2_tensor_validates_itself() -> None:
    with pytest.raises(ValueError, match="shape"):
        Tensor("t", "FP32", (3,), np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="not FP32"):
        Tensor("t", "FP32", (2,), np.zeros(2, dtype=np.float64))
    with pytest.raises(ValueError, match="unknown datatype"):
        Tensor("t", "FP8", (2,), np.zeros(2, dtype=np.float64))
    with pytest.raises(TypeError, match="BYTES"):
        tensor_from_array("t", np.array([b"a", 3], dtype=object))


# --------------------------------------------------------------- TR-03 JSON depth


def _depth_request(depth: int) -> bytes:
    # {"inputs": [ {"data": <nested>} ]} : 3 levels around the data arrays.
    data = "[" * (depth - 3) + "1" + "]" * (depth - 3)
    return ('{"inputs":[{"name":"x","datatype":"INT32","shape":[1],"data":' + data + "}]}").encode()


def test_v2_tr03_depth_50_accepted() -> None:
    request = decode_infer_request(_depth_request(50))
    assert request.inputs[0].data.tolist() == [1]


def test_v2_tr03_depth_120_refused() -> None:
    _refused(_depth_request(120), "nested deeper than 64")


def test_v2_tr03_depth_bounds_exact() -> None:
    assert parse_json_bounded(_nested(64).encode(), 64) is not None
    with pytest.raises(V2Error, match="deeper"):
        parse_json_bounded(_nested(65).encode(), 64)
    # brackets inside strings do not count, escaped quotes do not end strings
    assert parse_json_bounded(b'["[[[[", "\\"{{{{"]', 1) == ["[[[[", '"{{{{']


@pytest.mark.parametrize("text", ["[" * 250_000, _nested(250_000), '{"a":' * 250_000])
def test_v2_tr03_very_deep_refused_fast(text: str) -> None:
    start = time.perf_counter()
    with pytest.raises(V2Error, match="nested deeper") as info:
        decode_infer_request(text.encode())
    assert time.perf_counter() - start < 1.0
    assert not isinstance(info.value.__context__, RecursionError)


@pytest.mark.parametrize(
    "body",
    [b'"' + b'\\"' * 1_000_000, b'"' + b'\\"' * 1_000_000 + b"\\", b'["' + b"[" * 2_000_000],
)
def test_v2_tr03_unterminated_strings_scan_in_linear_time(body: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(V2Error, match="invalid JSON"):
        parse_json_bounded(body, 64)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xff{}", "not UTF-8"),
        (b'{"inputs": [', "invalid JSON"),
        (b"", "invalid JSON"),
        (b'{"a": NaN}', "NaN is not a JSON value"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "invalid JSON"),
    ],
)
def test_v2_invalid_json_refused(body: bytes, match: str) -> None:
    with pytest.raises(V2Error, match=match):
        parse_json_bounded(body, 64)


def test_v2_error_is_invalid_input() -> None:
    error = _refused(b"[]", "request must be a JSON object")
    assert isinstance(error, InvalidInput) and isinstance(error, ValueError)
    assert error.code == "invalid_v2_request"


# ------------------------------------------------------------- TR-04 shape/dtype


@pytest.mark.parametrize(
    ("inp", "match"),
    [
        (_inp(shape=[16, 2**60 + 2], data=[1.0]), "max_elements_per_tensor"),
        (_inp(shape=[-1, 2]), r"shape\[0\] is -1"),
        (_inp(shape=[2.0]), r"shape\[0\] must be an integer, not a number"),
        (_inp(shape=["2"]), r"shape\[0\] must be an integer, not a string"),
        (_inp(shape=[True, 2]), r"shape\[0\] must be an integer, not a boolean"),
        ({"name": "x", "datatype": "FP32", "shape": 2, "data": [1.0, 2.0]}, "array of integers"),
        (_inp(shape=[1] * 33, data=[1.0]), "at most 32"),
        (_inp(shape=[3]), "has 2 elements, but its shape needs 3"),
        (_inp(shape=[1]), "has more than 1 elements"),
        (_inp(datatype="FP8"), "datatype 'FP8' is not one of"),
        (_inp(datatype=7), "datatype '7' is not one of"),
        (_inp(datatype="BOOL", shape=[1], data=[2]), "true or false for BOOL"),
        (_inp(datatype="BOOL", shape=[1], data=[1]), "true or false for BOOL"),
        (_inp(shape=[1], data=["abc"]), "must be a number"),
        (_inp(shape=[1], data=["nan"]), "must be a number"),
        (_inp(shape=[1], data=[True]), "must be a number"),
        (_inp(shape=[1], data=[1e39]), "out of range for FP32"),
        (_inp(datatype="FP64", shape=[1], data=[10**400]), "out of range for FP64"),
        (_inp(datatype="INT32", shape=[1], data=[1.0]), "must be an integer for INT32"),
        (_inp(datatype="INT32", shape=[1], data=[True]), "must be an integer for INT32"),
        (_inp(datatype="UINT8", shape=[2], data=[0, 256]), r"data\[1\] is outside the range"),
        (_inp(datatype="INT8", shape=[1], data=[-129]), "outside the range of INT8"),
        (_inp(datatype="UINT64", shape=[1], data=[2**64]), "outside the range of UINT64"),
        (_inp(datatype="BYTES", shape=[1], data=[1]), "must be a string for BYTES"),
        (_inp(datatype="BYTES", shape=[1], data=["\ud800"]), "lone surrogate"),
        ({"name": "x", "datatype": "FP32", "shape": [1]}, "needs data or"),
        ({"name": "x", "datatype": "FP32", "data": [1.0]}, r"shape is required"),
        ({"name": "x", "shape": [1], "data": [1.0]}, r"datatype is required"),
        ({**_inp(), "data": 1.0}, "data must be an array"),
    ],
)
def test_v2_tr04_shape_and_datatype_abuse(inp: dict[str, Any], match: str) -> None:
    _refused(_req(inp), match)


def test_v2_tr04_huge_shape_allocates_nothing() -> None:
    body = _req(_inp(shape=[16, 2**60 + 2], data=[1.0]))
    body_big = _req(_inp(shape=[2**62] * 32, data=[1.0]))
    tracemalloc.start()
    try:
        for payload in (body, body_big):
            with pytest.raises(V2Error):
                decode_infer_request(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_v2_tr04_float_specials_and_nesting() -> None:
    body = _req(_inp(shape=[2, 2], data=[[1, "NaN"], ["Infinity", "-Infinity"]]))
    (x,) = decode_infer_request(body).inputs
    assert x.data.dtype == np.float32
    assert np.isnan(x.data[0, 1]) and x.data[1].tolist() == [np.inf, -np.inf]
    # nesting need not follow the shape, only the count (row-major)
    body = _req(_inp(datatype="INT64", shape=[2, 2], data=[[1], [2, [3, [4]]]]))
    assert decode_infer_request(body).inputs[0].data.tolist() == [[1, 2], [3, 4]]
    # FP32's largest value written as its shortest decimal is accepted
    body = _req(_inp(shape=[1], data=[3.4028235e38]))
    assert decode_infer_request(body).inputs[0].data[0] == np.finfo(np.float32).max
    # empty and scalar tensors
    body = _req(_inp("e", shape=[0, 5], data=[]), _inp("s", datatype="INT8", shape=[], data=[3]))
    e, s = decode_infer_request(body).inputs
    assert e.data.shape == (0, 5) and s.data.shape == () and s.data.tolist() == 3


# -------------------------------------------------------------- TR-05 structure


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"inputs": [_inp()], "outputs": [{"name": "o"}, {"name": "o"}]}, "'o' is a duplicate"),
        ({"inputs": [_inp()], "outputs": [{"parameters": {}}]}, r"outputs\[0\]\.name is required"),
        ({"inputs": [_inp()], "outputs": [{"name": 3}]}, "non-empty string"),
        ({"inputs": [_inp()], "outputs": ["o"]}, r"outputs\[0\] must be a JSON object"),
        ({"inputs": [_inp()], "outputs": {"name": "o"}}, "outputs must be an array"),
        (
            {"inputs": [_inp()], "outputs": [{"name": "o", "parameters": []}]},
            r"outputs\[0\]\.parameters must be a JSON object",
        ),
        (
            {
                "inputs": [_inp()],
                "outputs": [{"name": "o", "parameters": {"binary_data_output": 1}}],
            },
            "binary_data_output must be true or false",
        ),
        ({}, "inputs is required"),
        ({"inputs": []}, "inputs must not be empty"),
        ({"inputs": {}}, "inputs must be an array"),
        ({"inputs": [42]}, r"inputs\[0\] must be a JSON object"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, r"name is required"),
        ({"inputs": [_inp(""), _inp()]}, "non-empty string"),
        ({"inputs": [_inp(), _inp()]}, r"inputs\[1\]\.name 'x' is a duplicate"),
        ({"id": 42, "inputs": [_inp()]}, "id must be a string, not a number"),
        ({"id": None, "inputs": [_inp()]}, "id must be a string, not null"),
        ({"inputs": [_inp()], "parameters": [1]}, "request.parameters must be a JSON object"),
        ({"inputs": [_inp()], "parameters": "x"}, "request.parameters must be a JSON object"),
        ({"inputs": [{**_inp(), "parameters": 3}]}, r"inputs\[0\]\.parameters must be"),
        ({"inputs": [_inp()], "parameters": {"binary_data_output": "yes"}}, "true or false"),
        ({"inputs": [_inp()], "parameters": {"timeout": -1}}, "timeout must be"),
        ({"inputs": [_inp()], "parameters": {"timeout": "5"}}, "timeout must be"),
        ({"inputs": [_inp()], "parameters": {"servekit_timeout_s": True}}, "servekit_timeout_s"),
        ({"inputs": [_inp()], "parameters": {"priority": 1.5}}, "priority must be"),
        ({"inputs": [_inp()], "parameters": {"priority": -1}}, "priority must be"),
    ],
)
def test_v2_tr05_request_structure(obj: dict[str, Any], match: str) -> None:
    _refused(_body(obj), match)


def test_v2_unknown_keys_ignored() -> None:
    obj = {"inputs": [{**_inp(), "extra": 1}], "outputs": [{"name": "o", "x": 2}], "zzz": [3]}
    request = decode_infer_request(_body(obj))
    assert request.inputs[0].name == "x" and request.outputs[0].name == "o"


# ---------------------------------------------------------------- TR-06 binary


def _binary_request(sizes: list[int], datatype: str = "UINT8") -> bytes:
    return _body(
        {
            "inputs": [
                {
                    "name": f"b{i}",
                    "datatype": datatype,
                    "shape": [size],
                    "parameters": {"binary_data_size": size},
                }
                for i, size in enumerate(sizes)
            ]
        }
    )


@pytest.mark.parametrize(
    ("header_length", "match"),
    [
        (lambda n, total: total + 1, "outside 1.."),
        (lambda n, total: -1, "outside 1.."),
        (lambda n, total: "-1", "not a non-negative decimal"),
        (lambda n, total: "abc", "not a non-negative decimal"),
        (lambda n, total: "12.0", "not a non-negative decimal"),
        (lambda n, total: "", "not a non-negative decimal"),
        (lambda n, total: "\u0661\u0662", "not a non-negative decimal"),
        (lambda n, total: "99999999999", "99999999999 is outside"),
        (lambda n, total: "9" * 5000, "not a non-negative decimal"),
        (lambda n, total: 0, "outside 1.."),
        (lambda n, total: True, "must be an integer"),
    ],
)
def test_v2_tr06_header_length_abuse(header_length: Any, match: str) -> None:
    header = _binary_request([3])
    body = header + b"\x01\x02\x03"
    _refused(body, match, header_length=header_length(len(header), len(body)))


def test_v2_tr06_header_length_accepts_padded_string() -> None:
    header = _binary_request([3])
    request = decode_infer_request(header + b"abc", header_length=f" {len(header)} ")
    assert request.inputs[0].data.tobytes() == b"abc"


def test_v2_tr06_binary_sizes_must_cover_exactly_the_rest() -> None:
    header = _binary_request([2, 3])
    _refused(
        header + b"\x00" * 4, "declare 5 bytes .* but 4 bytes follow", header_length=len(header)
    )
    _refused(
        header + b"\x00" * 6, "declare 5 bytes .* but 6 bytes follow", header_length=len(header)
    )
    # trailing bytes after a pure JSON header
    plain = _req(_inp())
    _refused(plain + b"junk", "declare 0 bytes .* but 4 bytes follow", header_length=len(plain))
    # binary input without a header length: the whole body is the JSON
    _refused(header, "declare 5 bytes .* but 0 bytes follow")
    ok = decode_infer_request(header + b"\x01" * 5, header_length=len(header))
    assert [t.data.tolist() for t in ok.inputs] == [[1, 1], [1, 1, 1]]


@pytest.mark.parametrize(
    ("inp", "match"),
    [
        (
            {"name": "x", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 4}},
            "binary_data_size is 4, but shape .* needs 8",
        ),
        (
            {
                "name": "x",
                "datatype": "INT32",
                "shape": [1],
                "parameters": {"binary_data_size": -4},
            },
            "binary_data_size must be an integer >= 0",
        ),
        (
            {
                "name": "x",
                "datatype": "INT32",
                "shape": [1],
                "parameters": {"binary_data_size": "4"},
            },
            "binary_data_size must be an integer >= 0",
        ),
        ({**_inp(shape=[1], data=[1.0]), "parameters": {"binary_data_size": 4}}, "both data"),
    ],
)
def test_v2_tr06_binary_declarations(inp: dict[str, Any], match: str) -> None:
    header = _req(inp)
    _refused(header + b"\x00" * 4, match, header_length=len(header))


def _bytes_request(count: int, section: bytes) -> tuple[bytes, int]:
    header = _req(
        {
            "name": "s",
            "datatype": "BYTES",
            "shape": [count],
            "parameters": {"binary_data_size": len(section)},
        }
    )
    return header + section, len(header)


@pytest.mark.parametrize(
    ("count", "section", "match"),
    [
        (1, struct.pack("<I", 10) + b"abc", "length 10 points past the end"),
        (1, struct.pack("<I", 2**32 - 1) + b"abc", "4294967295 bytes; at most"),
        (2, struct.pack("<I", 1) + b"a" + b"\x01\x00", "truncated length prefix"),
        (2, struct.pack("<I", 1) + b"a", "holds 1 elements, but its shape needs 2"),
        (1, struct.pack("<I", 1) + b"a" + struct.pack("<I", 0), "more than the 1 elements"),
    ],
)
def test_v2_tr06_bytes_prefix_abuse(count: int, section: bytes, match: str) -> None:
    body, hlen = _bytes_request(count, section)
    _refused(body, match, header_length=hlen)


def test_v2_tr06_bytes_prefix_cannot_reach_into_the_next_input() -> None:
    first = struct.pack("<I", 5) + b"ab"  # claims 5 bytes, has 2; next input follows
    header = _body(
        {
            "inputs": [
                {"name": "s", "datatype": "BYTES", "shape": [1],
                 "parameters": {"binary_data_size": len(first)}},
                {"name": "u", "datatype": "UINT8", "shape": [4],
                 "parameters": {"binary_data_size": 4}},
            ]
        }
    )  # fmt: skip
    _refused(header + first + b"cdef", "points past the end", header_length=len(header))


def test_v2_tr06_bool_binary_must_be_0_or_1() -> None:
    header = _binary_request([2], "BOOL")
    _refused(header + b"\x01\x02", "only bytes 0 and 1", header_length=len(header))
    ok = decode_infer_request(header + b"\x01\x00", header_length=len(header))
    assert ok.inputs[0].data.tolist() == [True, False]


# ------------------------------------------------------------------ TR-10 id echo


@pytest.mark.parametrize("request_id", ["42", "", ' a\u00e9\u2603\U0001f600 "q" ', "\ud800x"])
def test_v2_tr10_id_echoed_verbatim(request_id: str) -> None:
    request = decode_infer_request(_body({"id": request_id, "inputs": [_inp()]}))
    assert request.id == request_id
    body, _ = encode_infer_response(
        model_name="m", model_version="1", id=request.id, outputs=[request.inputs[0]]
    )
    assert json.loads(body)["id"] == request_id


def test_v2_tr10_id_absent_when_not_sent() -> None:
    request = decode_infer_request(_req(_inp()))
    assert request.id is None
    body, _ = encode_infer_response(
        model_name="m", model_version=None, id=request.id, outputs=list(request.inputs)
    )
    assert "id" not in json.loads(body) and "model_version" not in json.loads(body)


# ---------------------------------------------------------------- SEC-06 limits


def test_v2_limit_max_inputs() -> None:
    body = _req(*[_inp(f"x{i}") for i in range(65)])
    _refused(body, "65 inputs; at most 64")
    assert len(decode_infer_request(_req(*[_inp(f"x{i}") for i in range(64)])).inputs) == 64


def test_v2_limit_max_outputs() -> None:
    body = _req(_inp(), outputs=[{"name": f"o{i}"} for i in range(3)])
    _refused(body, "3 outputs; at most 2", limits=Limits(max_outputs=2))


def test_v2_limit_elements_per_tensor() -> None:
    limits = Limits(max_elements_per_tensor=4)
    _refused(_req(_inp(shape=[5], data=[0.0] * 5)), "max_elements_per_tensor", limits=limits)
    assert decode_infer_request(_req(_inp(shape=[4], data=[0.0] * 4)), limits=limits)
    _refused(_req(_inp(shape=[2**25], data=[])), "more than 16777216 elements")


def test_v2_limit_total_elements() -> None:
    limits = Limits(max_elements_per_tensor=4, max_total_elements=6)
    body = _req(_inp("a", shape=[4], data=[0.0] * 4), _inp("b", shape=[3], data=[0.0] * 3))
    _refused(body, "max_total_elements", limits=limits)
    body = _req(
        *[_inp(f"x{i}", shape=[2**24, 1], data=[]) for i in range(5)]
    )  # 5 * 2**24 > 2**26 with the default limits, refused before any data check
    _refused(body, "max_total_elements")


def test_v2_limit_bytes_element() -> None:
    limits = Limits(max_bytes_element=3)
    _refused(
        _req(_inp(datatype="BYTES", shape=[2], data=["abc", "\u00e9\u00e9"])),
        r"data\[1\] has 4 bytes; at most 3",
        limits=limits,
    )
    body, hlen = _bytes_request(1, struct.pack("<I", 4) + b"abcd")
    _refused(body, "element 0 has 4 bytes; at most 3", header_length=hlen, limits=limits)
    assert decode_infer_request(body, header_length=hlen).inputs[0].data.tolist() == [b"abcd"]


def test_v2_limit_body_and_depth() -> None:
    body = _req(_inp())
    _refused(body, "max_body_bytes", limits=Limits(max_body_bytes=len(body) - 1))
    assert decode_infer_request(body, limits=Limits(max_body_bytes=len(body)))
    _refused(body, "nested deeper than 3", limits=Limits(max_json_depth=3))


# ------------------------------------------------------- parameters and metadata


@pytest.mark.parametrize(
    ("parameters", "timeout_s", "priority"),
    [
        ({}, None, None),
        ({"servekit_timeout_s": 2.5}, 2.5, None),
        ({"servekit_timeout_s": 3, "timeout": 1_000_000}, 3.0, None),
        ({"timeout": 1_500_000}, 1.5, None),
        ({"timeout": 0}, None, None),
        ({"servekit_timeout_s": 0.0}, None, None),
        ({"priority": 0}, None, 0),
        ({"priority": 7, "timeout": 250}, 0.00025, 7),
    ],
)
def test_v2_timeout_and_priority(
    parameters: dict[str, Any], timeout_s: float | None, priority: int | None
) -> None:
    request = decode_infer_request(_req(_inp(), parameters=parameters))
    assert request.parameters == parameters
    assert request.timeout_s == timeout_s
    assert request.priority == priority


def test_v2_properties_tolerate_hand_built_requests() -> None:
    request = InferRequest(id=None, inputs=(), parameters={"timeout": "x", "priority": True})
    assert request.timeout_s is None and request.priority is None


def test_v2_model_metadata_shape() -> None:
    meta = model_metadata(
        "churn",
        ["1", "2"],
        "servekit",
        [{"name": "x", "datatype": "FP32", "shape": (-1, 3)}],
        [{"name": "y", "datatype": "INT64", "shape": [-1]}],
    )
    assert meta == {
        "name": "churn",
        "versions": ["1", "2"],
        "platform": "servekit",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
    }
    json.dumps(meta)
    with pytest.raises(ValueError, match="datatype"):
        model_metadata("m", [], "p", [{"name": "x", "datatype": "F", "shape": []}], [])
    with pytest.raises(ValueError, match=">= -1"):
        model_metadata("m", [], "p", [{"name": "x", "datatype": "FP32", "shape": [-2]}], [])


def test_v2_server_metadata_shape() -> None:
    meta = server_metadata("servekit", "0.3.0", ("binary_tensor_data",))
    assert meta == {"name": "servekit", "version": "0.3.0", "extensions": ["binary_tensor_data"]}
    json.dumps(meta)


def test_v2_rejected_requests_do_not_accumulate_memory() -> None:
    header = _binary_request([3])
    bad = [
        (_body({"inputs": [_inp(shape=[16, 2**60 + 2])]}), None),
        (_nested(100_000).encode(), None),
        (_body({"id": 1, "inputs": [_inp()]}), None),
        (header + b"\x00" * 4, len(header)),
        (header + b"\x00" * 3, "nope"),
    ]

    def run(n: int) -> None:
        for _ in range(n):
            for body, hlen in bad:
                try:
                    decode_infer_request(body, header_length=hlen)
                except V2Error:
                    pass

    run(50)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        run(400)  # 2,000 rejected requests
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024
