"""TR-13: a real Open Inference Protocol client against a real `servekit serve`.

NVIDIA's ``tritonclient[http]`` sends FP32, INT64, BYTES, BOOL and FP16 tensors to an
identity model on 127.0.0.1, as JSON and with the binary tensor data extension (input
and requested output alike), and reads the answers back with its own decoder: every
output is bit-identical to its input (same dtype, shape and bytes).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from _serve_proc import serve

pytest.importorskip("uvicorn")

TENSORS: dict[str, np.ndarray] = {
    "FP32": np.array([[0.1, -3.5, 1e-30], [3.4e38, -0.0, 7.0]], dtype=np.float32),
    "INT64": np.array([[2**62, -(2**63)], [0, 7]], dtype=np.int64),
    "BYTES": np.array([[b"servekit", b""], [b"tensor", b"\x00\x01x"]], dtype=np.object_),
    "BOOL": np.array([[True, False, True]], dtype=np.bool_),
    "FP16": np.array([[0.1, 65504.0], [-2.5, 6.1e-5]], dtype=np.float16),
}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("triton")) as port:
        yield f"127.0.0.1:{port}"


def test_the_client_sees_a_live_ready_server_and_the_model(url: str) -> None:
    client = triton.InferenceServerClient(url=url)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("echo")
        assert client.get_model_metadata("echo")["name"] == "echo"
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", sorted(TENSORS))
def test_round_trip_is_bit_identical(url: str, datatype: str, binary: bool) -> None:
    sent = TENSORS[datatype]
    if datatype == "BYTES" and not binary:
        sent = np.array([[b"servekit", b""], [b"tensor", b"utf-8 \xc3\xa9"]], dtype=np.object_)
    client = triton.InferenceServerClient(url=url)
    try:
        tensor = triton.InferInput("x", list(sent.shape), datatype)
        tensor.set_data_from_numpy(sent, binary_data=binary)
        wanted = triton.InferRequestedOutput("output", binary_data=binary)
        result = client.infer("echo", inputs=[tensor], outputs=[wanted], request_id="r-1")
    finally:
        client.close()
    assert result.get_response()["id"] == "r-1"
    output = result.get_output("output")
    assert output is not None
    # The answer came in the form asked for: the binary section, or JSON data.
    assert ("binary_data_size" in output.get("parameters", {})) is binary
    got = result.as_numpy("output")
    assert got is not None
    assert got.shape == sent.shape
    if datatype == "BYTES":
        assert got.dtype == np.object_
        # JSON carries BYTES as strings, which the client gives back as str.
        elements = [x.encode() if isinstance(x, str) and not binary else x for x in got.ravel()]
        assert elements == list(sent.ravel()), got
        assert all(type(x) is bytes for x in elements)
    else:
        assert got.dtype == sent.dtype
        assert got.tobytes() == sent.tobytes()
