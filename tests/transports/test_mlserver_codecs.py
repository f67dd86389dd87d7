"""TR-13: MLServer's codecs and types against a real `servekit serve`.

Requests are built with ``mlserver.codecs`` (``NumpyCodec`` for FP32, INT64, BOOL and
FP16; ``StringCodec``, ``Base64Codec`` and ``NumpyCodec`` for BYTES) into an
``mlserver.types.InferenceRequest``, serialised by MLServer's own pydantic models, and
sent with httpx to an identity model on 127.0.0.1; answers are parsed into
``mlserver.types.InferenceResponse`` and decoded with the same codecs: every output is
bit-identical to its input (same dtype, shape and bytes, or the same strings).

MLServer's REST types carry tensors as JSON only (its binary form is gRPC's
``raw_*_contents``), so there is no binary-extension case here; ``Base64Codec``
is how MLServer sends arbitrary bytes over JSON, and is covered with bytes that are
not UTF-8.

Run by ``nox -s "clients(client='mlserver')"`` (MLServer pins protobuf 6 and an older
Starlette than kserve, so it has a virtualenv of its own).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from _serve_proc import serve

pytest.importorskip("mlserver", reason="nox -s \"clients(client='mlserver')\" runs this")
from mlserver.codecs import Base64Codec, NumpyCodec, StringCodec
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataModelResponse,
    MetadataServerResponse,
    RequestInput,
)

NUMERIC: dict[str, np.ndarray] = {
    "FP32": np.array([[0.1, -3.5, 1e-30], [3.4e38, -0.0, 7.0]], dtype=np.float32),
    "INT64": np.array([[2**62, -(2**63)], [0, 7]], dtype=np.int64),
    "BOOL": np.array([[True, False, True]], dtype=np.bool_),
    "FP16": np.array([[0.1, 65504.0], [-2.5, 6.1e-5]], dtype=np.float16),
}
STRINGS = ["servekit", "", "tensor", "utf-8 \u00e9 \u2603", "\x00\x01x"]
RAW = [b"servekit", b"", b"\x00\xff\xfe binary", b"\x80 not utf-8"]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("mlserver")
    with serve(root) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        yield client


def infer(http: httpx.Client, request_input: RequestInput) -> InferenceResponse:
    request = InferenceRequest(id="r-1", inputs=[request_input])
    response = http.post(
        "/v2/models/echo/infer",
        content=request.model_dump_json(),  # MLServer's serialisation (unset fields left out)
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    parsed = InferenceResponse.model_validate_json(response.content)
    assert parsed.id == "r-1"
    assert parsed.model_name == "echo"
    assert len(parsed.outputs) == 1 and parsed.outputs[0].name == "output"
    assert parsed.outputs[0].datatype == request_input.datatype
    assert parsed.outputs[0].shape == request_input.shape
    return parsed


def test_metadata_parses_as_mlserver_types(http: httpx.Client) -> None:
    server = MetadataServerResponse.model_validate_json(http.get("/v2").content)
    assert "binary_tensor_data" in server.extensions
    model = MetadataModelResponse.model_validate_json(http.get("/v2/models/echo").content)
    assert model.name == "echo"
    assert http.get("/v2/models/echo/ready").status_code == 200


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_numpy_codec_round_trip_is_bit_identical(http: httpx.Client, datatype: str) -> None:
    sent = NUMERIC[datatype]
    request_input = NumpyCodec.encode_input("x", sent)
    assert request_input.datatype == datatype
    parsed = infer(http, request_input)
    got = NumpyCodec.decode_output(parsed.outputs[0])
    assert got.dtype == sent.dtype
    assert got.shape == sent.shape
    assert got.tobytes() == sent.tobytes()


def test_string_codec_round_trip(http: httpx.Client) -> None:
    request_input = StringCodec.encode_input("x", STRINGS, use_bytes=False)
    parsed = infer(http, request_input)
    got = StringCodec.decode_output(parsed.outputs[0])
    assert got == STRINGS
    assert all(type(x) is str for x in got)


def test_base64_codec_round_trips_bytes_that_are_not_utf8(http: httpx.Client) -> None:
    request_input = Base64Codec.encode_input("x", RAW, use_bytes=False)
    parsed = infer(http, request_input)
    got = Base64Codec.decode_output(parsed.outputs[0])
    assert got == RAW
    assert all(type(x) is bytes for x in got)


def test_numpy_codec_round_trips_a_string_tensor(http: httpx.Client) -> None:
    sent = np.array([["servekit", "tensor"], ["utf-8 \u00e9", ""]])
    request_input = NumpyCodec.encode_input("x", sent)
    assert request_input.datatype == "BYTES"
    parsed = infer(http, request_input)
    got = NumpyCodec.decode_output(parsed.outputs[0])
    assert got.shape == sent.shape
    assert got.tolist() == sent.tolist()
