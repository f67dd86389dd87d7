"""TR-13: the ``kserve`` package's own REST client against a real `servekit serve`.

kserve's :class:`~kserve.InferenceRESTClient` (Open Inference Protocol, ``v2``) sends
FP32, INT64, BYTES, BOOL and FP16 tensors, built with kserve's ``InferInput``,
``RequestedOutput`` and ``InferRequest``, to an identity model on 127.0.0.1, as JSON and
with the binary tensor data extension (input and requested output alike), and decodes
the answers with kserve's own decoder (``InferResponse.from_bytes``, ``as_numpy``):
every output is bit-identical to its input (same dtype, shape and bytes).

kserve's encoder refuses FP16 as JSON data ("Sending FP16 data via JSON is not
supported"), so the JSON case of FP16 sends the input in binary and asks for the
output as JSON: the server's JSON FP16 is still what kserve decodes. Its decoder also
turns every BYTES element into ``str`` (UTF-8), so the BYTES tensor is valid UTF-8.

Run by ``nox -s "clients(client='kserve')"`` (kserve pins protobuf 6, which the gRPC
transport of the `tests` session cannot use).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from _serve_proc import serve

kserve = pytest.importorskip("kserve", reason="nox -s \"clients(client='kserve')\" runs this")
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig  # noqa: E402
from kserve.protocol.infer_type import RequestedOutput  # noqa: E402

TENSORS: dict[str, np.ndarray] = {
    "FP32": np.array([[0.1, -3.5, 1e-30], [3.4e38, -0.0, 7.0]], dtype=np.float32),
    "INT64": np.array([[2**62, -(2**63)], [0, 7]], dtype=np.int64),
    "BYTES": np.array(
        [[b"servekit", b""], [b"tensor", b"\x00\x01x utf-8 \xc3\xa9"]], dtype=np.object_
    ),
    "BOOL": np.array([[True, False, True]], dtype=np.bool_),
    "FP16": np.array([[0.1, 65504.0], [-2.5, 6.1e-5]], dtype=np.float16),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # kserve's client is asyncio-first (httpx.AsyncClient)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("kserve")) as port:
        yield f"http://127.0.0.1:{port}"


def client() -> InferenceRESTClient:
    return InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))


@pytest.mark.anyio
async def test_the_client_sees_a_live_ready_server_and_the_model(base_url: str) -> None:
    async with client() as rest:
        assert await rest.is_server_live(base_url) is True
        assert await rest.is_server_ready(base_url) is True
        assert await rest.is_model_ready(base_url, "echo") is True
        assert await rest.is_model_ready(base_url, "ghost") is False


@pytest.mark.anyio
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", sorted(TENSORS))
async def test_round_trip_is_bit_identical(base_url: str, datatype: str, binary: bool) -> None:
    sent = TENSORS[datatype]
    tensor = InferInput("x", list(sent.shape), datatype)
    tensor.set_data_from_numpy(sent, binary_data=binary or datatype == "FP16")
    wanted = RequestedOutput("output", parameters={"binary_data": binary})
    request = InferRequest("echo", [tensor], request_id="r-1", request_outputs=[wanted])
    headers: dict[str, str] = {}
    async with client() as rest:
        result = await rest.infer(base_url, request, model_name="echo", response_headers=headers)
    assert result.id == "r-1"
    assert result.model_name == "echo"
    # The answer came in the form asked for: after the JSON header, or as JSON data.
    assert ("inference-header-content-length" in headers) is binary
    output = result.get_output_by_name("output")
    assert output is not None
    assert output.datatype == datatype
    got = output.as_numpy()
    assert got.shape == sent.shape
    if datatype == "BYTES":
        assert got.dtype == np.object_
        # kserve decodes BYTES to str, from JSON and from the binary section alike.
        elements = [x.encode() for x in got.ravel()]
        assert elements == list(sent.ravel()), got
    else:
        assert got.dtype == sent.dtype
        assert got.tobytes() == sent.tobytes()


@pytest.mark.anyio
async def test_kserve_refuses_fp16_as_json_itself(base_url: str) -> None:
    """Why the JSON case of FP16 sends its input in binary: kserve's own encoder."""
    from kserve.errors import InvalidInput

    tensor = InferInput("x", [2], "FP16")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float16), binary_data=False)
    async with client() as rest:
        with pytest.raises(InvalidInput, match="FP16"):
            await rest.infer(base_url, InferRequest("echo", [tensor]), model_name="echo")


@pytest.mark.anyio
async def test_several_tensors_in_one_binary_request(base_url: str) -> None:
    """Every dtype at once, each in its own slice of the binary section."""
    # The tensors of one request share their first (batch) dimension.
    tensors = {**TENSORS, "BOOL": np.array([[True, False, True], [False, False, True]])}
    names = sorted(tensors)
    inputs = []
    for name in names:
        tensor = InferInput(name.lower(), list(tensors[name].shape), name)
        tensor.set_data_from_numpy(tensors[name], binary_data=True)
        inputs.append(tensor)
    request = InferRequest("echo", inputs, parameters={"binary_data_output": True})
    async with client() as rest:
        result = await rest.infer(base_url, request, model_name="echo")
    # A model of one input gets the tensors as a dict and answers the same dict: one
    # output per input name.
    assert sorted(o.name for o in result.outputs) == sorted(n.lower() for n in names)
    for name in names:
        output = result.get_output_by_name(name.lower())
        assert output is not None and output.datatype == name
        got, sent = output.as_numpy(), tensors[name]
        if name == "BYTES":
            assert [x.encode() for x in got.ravel()] == list(sent.ravel())
        else:
            assert got.dtype == sent.dtype and got.tobytes() == sent.tobytes()
