"""servekit.transports.grpc over a real grpc.aio channel on 127.0.0.1: health, metadata,
infer with typed and raw tensors, deadlines, cancellation, overload, bad requests.

grpc.aio runs on asyncio only (it has no trio support), so these async tests override
the suite's ``anyio_backend`` fixture to asyncio alone.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

import servekit as sk
from servekit.testing import Echo, FailOn, Slow
from servekit.transports import Limits, Service
from servekit.transports.grpc import (
    add_to_server,
    create_server,
    server_options,
    status_code,
)
from servekit.transports.grpc import pb2 as pb
from servekit.transports.grpc import pb2_grpc as pb_grpc

Tensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture
def anyio_backend() -> str:
    # grpc.aio runs on asyncio only: no trio run for this module.
    return "asyncio"


@sk.model
def norms(batch: list[sk.Array("float32", (3,))]) -> list[float]:  # type: ignore[valid-type]
    return [float(np.linalg.norm(v)) for v in batch]


@asynccontextmanager
async def serving(predictors: Any, **options: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A started grpc.aio server on 127.0.0.1 (port 0) and a stub on a channel to it."""
    served = [predictors] if isinstance(predictors, sk.Predictor) else []
    if isinstance(predictors, Mapping):
        served = list(predictors.values())
    for predictor in served:
        await predictor.astart()
    server_opts = options.pop("server_options", server_options())
    server = grpc.aio.server(options=server_opts)
    servicer = add_to_server(server, predictors, **options)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.GRPCInferenceServiceStub(channel), servicer
    finally:
        await channel.close()
        await server.stop(None)
        for predictor in served:
            await predictor.aclose()


def infer_request(model: str, *tensors: Tensor, raw: list[bytes] | None = None) -> Any:
    return pb.ModelInferRequest(model_name=model, inputs=list(tensors), raw_input_contents=raw)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def error_code(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ())["servekit-error-code"]


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (bounded) for something another thread or the server does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- health and metadata ---------------------------------------------------------------


@pytest.mark.anyio
async def test_health_and_readiness() -> None:
    predictor = sk.Predictor(Echo(), name="echo", version="3")
    async with serving(predictor) as (stub, servicer):
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="echo"))).ready
        ready = await stub.ModelReady(pb.ModelReadyRequest(name="echo", version="3"))
        assert ready.ready
        error = await rpc_error(stub.ModelReady(pb.ModelReadyRequest(name="nope")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_code(error) == "not_found"
        error = await rpc_error(stub.ModelReady(pb.ModelReadyRequest(name="echo", version="2")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        servicer.service.accepting = False  # shutting down: not ready, still live
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="echo"))).ready
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live


@pytest.mark.anyio
async def test_server_and_model_metadata() -> None:
    predictors = {"norms": sk.Predictor(norms, name="norms"), "echo": sk.Predictor(Echo())}
    async with serving(predictors, name="my-server") as (stub, _):
        server = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert server.name == "my-server"
        assert server.version == sk.__version__
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="norms"))
        assert meta.name == "norms"
        assert list(meta.versions) == ["1"]
        assert meta.platform == "servekit"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("input", "FP32", [-1, 3])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("output", "FP64", [-1])
        ]
        error = await rpc_error(stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
        assert error.code() == grpc.StatusCode.NOT_FOUND


# --- inference -------------------------------------------------------------------------

# (datatype, typed contents field, a [2, 2] array of that type)
CASES = [
    ("FP32", "fp32_contents", np.array([[1.5, -2.25], [np.inf, 3.0]], dtype=np.float32)),
    ("INT64", "int64_contents", np.array([[2**62, -1], [0, -(2**63)]], dtype=np.int64)),
    ("BOOL", "bool_contents", np.array([[True, False], [False, True]])),
    (
        "BYTES",
        "bytes_contents",
        np.array([[b"a", b"\x00\xffz"], [b"", "é".encode()]], dtype=object),
    ),
]


def raw_bytes(datatype: str, array: np.ndarray[Any, Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(x)) + x for x in array.reshape(-1))
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def output_array(response: Any, index: int, datatype: str) -> np.ndarray[Any, Any]:
    out = response.outputs[index]
    shape = tuple(out.shape)
    if response.raw_output_contents:
        raw = response.raw_output_contents[index]
        if datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (n,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + n])
                offset += 4 + n
            return np.array(items, dtype=object).reshape(shape)
        dtype = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?", "FP16": "<f2"}[datatype]
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = {c[0]: c[1] for c in CASES}[datatype]
    values = list(getattr(out.contents, field))
    return np.array(values, dtype=object if datatype == "BYTES" else None).reshape(shape)


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["typed", "raw"])
@pytest.mark.parametrize(("datatype", "field", "array"), CASES, ids=[c[0] for c in CASES])
async def test_infer_round_trips_each_datatype(
    datatype: str, field: str, array: np.ndarray[Any, Any], form: str
) -> None:
    model = Echo()
    async with serving(sk.Predictor(model, name="echo")) as (stub, _):
        tensor = Tensor(name="x", datatype=datatype, shape=[2, 2])
        raw = None
        if form == "typed":
            getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
        else:
            raw = [raw_bytes(datatype, array)]
        request = infer_request("echo", tensor, raw=raw)
        request.id = "req-7"
        response = await stub.ModelInfer(request)
    assert response.model_name == "echo"
    assert response.model_version == "1"
    assert response.id == "req-7"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("output", datatype, [2, 2])
    ]
    # A client that sent raw contents gets raw contents back; typed gets typed.
    assert bool(response.raw_output_contents) == (form == "raw")
    assert not response.outputs[0].HasField("contents") or form == "typed"
    got = output_array(response, 0, datatype)
    assert got.tolist() == array.tolist()
    # The batch dimension: the model saw two items, the rows.
    assert len(model.calls) == 1
    assert [np.asarray(x).tolist() for x in model.calls[0]] == array.tolist()


@pytest.mark.anyio
async def test_infer_with_two_inputs_and_requested_outputs() -> None:
    model = Echo()
    async with serving(sk.Predictor(model, name="echo")) as (stub, _):
        a = Tensor(name="a", datatype="FP64", shape=[2])
        a.contents.fp64_contents.extend([0.5, 1.5])
        b = Tensor(name="b", datatype="INT8", shape=[2, 1])
        b.contents.int_contents.extend([-128, 127])
        request = infer_request("echo", a, b)
        response = await stub.ModelInfer(request)
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
            ("a", "FP64", [2]),
            ("b", "INT8", [2, 1]),
        ]
        assert list(response.outputs[1].contents.int_contents) == [-128, 127]
        assert model.calls[0][0]["a"] == 0.5
        request.outputs.add(name="b")
        response = await stub.ModelInfer(request)
        assert [o.name for o in response.outputs] == ["b"]
        del request.outputs[:]
        request.outputs.add(name="c")
        error = await rpc_error(stub.ModelInfer(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown output 'c'" in (error.details() or "")


@pytest.mark.anyio
async def test_fp16_travels_raw_both_ways() -> None:
    array = np.array([1.0, -0.5, 65504.0], dtype=np.float16)
    async with serving(sk.Predictor(Echo(), name="echo")) as (stub, _):
        tensor = Tensor(name="x", datatype="FP16", shape=[3])
        response = await stub.ModelInfer(infer_request("echo", tensor, raw=[array.tobytes()]))
        assert response.outputs[0].datatype == "FP16"
        assert output_array(response, 0, "FP16").tolist() == array.tolist()
        # Typed FP16 does not exist in the protocol.
        error = await rpc_error(stub.ModelInfer(infer_request("echo", tensor)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents" in (error.details() or "")


@pytest.mark.anyio
async def test_infer_checks_inputs_against_the_signature() -> None:
    async with serving(sk.Predictor(norms, name="norms")) as (stub, _):
        good = Tensor(name="input", datatype="FP32", shape=[1, 3])
        good.contents.fp32_contents.extend([3.0, 4.0, 0.0])
        response = await stub.ModelInfer(infer_request("norms", good))
        assert list(response.outputs[0].contents.fp64_contents) == [5.0]
        bad = Tensor(name="input", datatype="FP32", shape=[1, 2])
        bad.contents.fp32_contents.extend([3.0, 4.0])
        error = await rpc_error(stub.ModelInfer(infer_request("norms", bad)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_code(error) == "invalid_input"


@pytest.mark.anyio
async def test_model_errors_are_internal_without_the_models_message() -> None:
    predictor = sk.Predictor(FailOn({13}), name="fragile")
    async with serving(predictor) as (stub, _):
        tensor = Tensor(name="x", datatype="INT64", shape=[1])
        tensor.contents.int64_contents.append(13)
        error = await rpc_error(stub.ModelInfer(infer_request("fragile", tensor)))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error_code(error) == "model_error"
        assert error.details() == "model_error: the model raised ValueError for this input"


# --- deadlines, cancellation, overload, shutdown ----------------------------------------


def one(value: int) -> Tensor:
    tensor = Tensor(name="x", datatype="INT64", shape=[1])
    tensor.contents.int64_contents.append(value)
    return tensor


def blocked() -> tuple[Slow, threading.Event]:
    release = threading.Event()
    return Slow(delay_s=0.0, release=release), release


@pytest.mark.anyio
async def test_a_deadline_that_expires_in_the_queue_never_reaches_the_model() -> None:
    model, release = blocked()
    batcher = sk.Batcher(max_batch_size=1)
    predictor = sk.Predictor(model, name="slow", backend=sk.Threads(1), batcher=batcher)
    async with serving(predictor) as (stub, _):
        try:
            first = asyncio.ensure_future(stub.ModelInfer(infer_request("slow", one(1))))
            await wait_for(model.entered.is_set)  # the only worker is busy
            error = await rpc_error(stub.ModelInfer(infer_request("slow", one(2)), timeout=0.3))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The client's deadline may fire a moment before the server gives up the item.
            await wait_for(
                lambda: (
                    (s := batcher.statistics()).expired + s.cancelled == 1 and s.queue_depth == 0
                )
            )
            release.set()
            response = await first
            assert list(response.outputs[0].contents.int64_contents) == [1]
        finally:
            release.set()  # a failure must not leave close() waiting on the model
    assert [[int(x) for x in call] for call in model.calls] == [[1]]


@pytest.mark.anyio
async def test_the_grpc_deadline_becomes_the_timeout_and_the_server_answers_it() -> None:
    # The deadline reaches the batcher as timeout_s: with a parameter timeout shorter
    # than the RPC's, the server's own DeadlineExceeded answers (with its code).
    model, release = blocked()
    batcher = sk.Batcher(max_batch_size=1)
    predictor = sk.Predictor(model, name="slow", backend=sk.Threads(1), batcher=batcher)
    async with serving(predictor) as (stub, _):
        try:
            first = asyncio.ensure_future(stub.ModelInfer(infer_request("slow", one(1))))
            await wait_for(model.entered.is_set)
            request = infer_request("slow", one(2))
            request.parameters["timeout"].int64_param = 200_000  # Triton's: microseconds
            error = await rpc_error(stub.ModelInfer(request, timeout=30))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert error_code(error) == "deadline_exceeded"
            assert batcher.statistics().expired == 1
            release.set()
            await first
        finally:
            release.set()  # a failure must not leave close() waiting on the model
    assert [[int(x) for x in call] for call in model.calls] == [[1]]


@pytest.mark.anyio
async def test_cancelling_an_rpc_takes_its_item_out_of_the_queue() -> None:
    model, release = blocked()
    batcher = sk.Batcher(max_batch_size=1)
    predictor = sk.Predictor(model, name="slow", backend=sk.Threads(1), batcher=batcher)
    async with serving(predictor) as (stub, _):
        try:
            first = stub.ModelInfer(infer_request("slow", one(1)))
            await wait_for(model.entered.is_set)
            second = stub.ModelInfer(infer_request("slow", one(2)))
            await wait_for(lambda: batcher.statistics().queue_depth == 1)
            assert second.cancel()
            await wait_for(lambda: batcher.statistics().cancelled == 1)
            assert batcher.statistics().queue_depth == 0
            release.set()
            assert list((await first).outputs[0].contents.int64_contents) == [1]
            with pytest.raises(asyncio.CancelledError):
                await second
        finally:
            release.set()  # a failure must not leave close() waiting on the model
    assert [[int(x) for x in call] for call in model.calls] == [[1]]


@pytest.mark.anyio
async def test_overload_is_resource_exhausted_with_a_retry_hint() -> None:
    model, release = blocked()
    batcher = sk.Batcher(max_batch_size=1, max_queue=1)
    predictor = sk.Predictor(model, name="slow", backend=sk.Threads(1), batcher=batcher)
    async with serving(predictor) as (stub, _):
        try:
            first = stub.ModelInfer(infer_request("slow", one(1)))
            await wait_for(model.entered.is_set)
            second = stub.ModelInfer(infer_request("slow", one(2)))
            await wait_for(lambda: batcher.statistics().queue_depth == 1)
            error = await rpc_error(stub.ModelInfer(infer_request("slow", one(3))))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            metadata = dict(error.trailing_metadata() or ())
            assert metadata["servekit-error-code"] == "overloaded"
            assert int(metadata["retry-after"]) >= 1
            assert (error.details() or "").startswith("overloaded: ")
            release.set()
            assert (await first).outputs[0].contents.int64_contents[0] == 1
            assert (await second).outputs[0].contents.int64_contents[0] == 2
        finally:
            release.set()  # a failure must not leave close() waiting on the model


@pytest.mark.anyio
async def test_a_closing_server_refuses_inference_as_unavailable() -> None:
    async with serving(sk.Predictor(Echo(), name="echo")) as (stub, servicer):
        servicer.service.accepting = False
        error = await rpc_error(stub.ModelInfer(infer_request("echo", one(1))))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_code(error) == "closed"


# --- bad requests ------------------------------------------------------------------------


def fp32(shape: list[int], values: list[float]) -> Tensor:
    tensor = Tensor(name="x", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values)
    return tensor


BAD = [
    ("unknown model", lambda: infer_request("nope", fp32([1], [1.0])), "NOT_FOUND", "no model"),
    (
        "unknown version",
        lambda: pb.ModelInferRequest(
            model_name="echo", model_version="9", inputs=[fp32([1], [1.0])]
        ),
        "NOT_FOUND",
        "no version '9'",
    ),
    ("no inputs", lambda: infer_request("echo"), "INVALID_ARGUMENT", "inputs must not be"),
    (
        "unknown datatype",
        lambda: infer_request("echo", Tensor(name="x", datatype="FP8", shape=[1])),
        "INVALID_ARGUMENT",
        "datatype 'FP8' is not one of",
    ),
    (
        "shape and contents disagree",
        lambda: infer_request("echo", fp32([2, 2], [1.0, 2.0, 3.0])),
        "INVALID_ARGUMENT",
        "has 3 elements, but shape [2, 2] needs 4",
    ),
    (
        "negative dimension",
        lambda: infer_request("echo", fp32([-1], [])),
        "INVALID_ARGUMENT",
        "dimensions must be >= 0",
    ),
    (
        "contents in the wrong field",
        lambda: infer_request(
            "echo",
            Tensor(
                name="x",
                datatype="FP32",
                shape=[1],
                contents=pb.InferTensorContents(int64_contents=[1]),
            ),
        ),
        "INVALID_ARGUMENT",
        "go in fp32_contents, not int64_contents",
    ),
    (
        "raw contents of the wrong size",
        lambda: infer_request(
            "echo", Tensor(name="x", datatype="FP32", shape=[2]), raw=[b"\x00" * 7]
        ),
        "INVALID_ARGUMENT",
        "has 7 bytes, but shape [2] of FP32 needs 8",
    ),
    (
        "raw BYTES with a length past the end",
        lambda: infer_request(
            "echo",
            Tensor(name="x", datatype="BYTES", shape=[1]),
            raw=[struct.pack("<I", 10) + b"abc"],
        ),
        "INVALID_ARGUMENT",
        "points past the end",
    ),
    (
        "raw BOOL bytes other than 0 and 1",
        lambda: infer_request("echo", Tensor(name="x", datatype="BOOL", shape=[1]), raw=[b"\x02"]),
        "INVALID_ARGUMENT",
        "only bytes 0 and 1",
    ),
    (
        "raw entries fewer than inputs",
        lambda: infer_request(
            "echo",
            Tensor(name="x", datatype="FP32", shape=[1]),
            Tensor(name="y", datatype="FP32", shape=[1]),
            raw=[b"\x00" * 4],
        ),
        "INVALID_ARGUMENT",
        "raw_input_contents has 1 entries for 2 inputs",
    ),
    (
        "raw and typed mixed",
        lambda: infer_request("echo", fp32([1], [1.0]), raw=[b"\x00" * 4]),
        "INVALID_ARGUMENT",
        "use one form for every input",
    ),
    (
        "INT8 out of range",
        lambda: infer_request(
            "echo",
            Tensor(
                name="x",
                datatype="INT8",
                shape=[1],
                contents=pb.InferTensorContents(int_contents=[300]),
            ),
        ),
        "INVALID_ARGUMENT",
        "outside the range of INT8",
    ),
    (
        "duplicate input names",
        lambda: infer_request("echo", fp32([1], [1.0]), fp32([1], [2.0])),
        "INVALID_ARGUMENT",
        "is a duplicate",
    ),
    (
        "batch dimensions differ",
        lambda: infer_request(
            "echo",
            fp32([1], [1.0]),
            Tensor(
                name="y",
                datatype="FP32",
                shape=[2],
                contents=pb.InferTensorContents(fp32_contents=[1, 2]),
            ),
        ),
        "INVALID_ARGUMENT",
        "same first (batch) dimension",
    ),
    (
        "negative priority",
        lambda: pb.ModelInferRequest(
            model_name="echo",
            inputs=[fp32([1], [1.0])],
            parameters={"priority": pb.InferParameter(int64_param=-1)},
        ),
        "INVALID_ARGUMENT",
        "priority must be an integer >= 0",
    ),
    (
        "too many elements",
        lambda: infer_request("echo", fp32([10, 10], [0.0] * 100)),
        "INVALID_ARGUMENT",
        "max_elements_per_tensor",
    ),
]


@pytest.mark.anyio
async def test_bad_requests_get_invalid_argument_or_not_found() -> None:
    model = Echo()
    limits = Limits(max_elements_per_tensor=50)
    async with serving(sk.Predictor(model, name="echo"), limits=limits) as (stub, _):
        for label, build, status, text in BAD:
            error = await rpc_error(stub.ModelInfer(build()))
            assert error.code() == getattr(grpc.StatusCode, status), label
            assert text in (error.details() or ""), (label, error.details())
            code = error_code(error)
            assert (error.details() or "").startswith(f"{code}: "), label
    assert model.calls == []  # no bad request reached the model


@pytest.mark.anyio
async def test_message_size_limits() -> None:
    big = fp32([1000], [1.0] * 1000)  # about 4 kB
    # The servicer's own check, for a host whose server allows more.
    async with serving(sk.Predictor(Echo(), name="echo"), max_message_bytes=1000) as (stub, _):
        error = await rpc_error(stub.ModelInfer(infer_request("echo", big)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_code(error) == "payload_too_large"
        assert (await stub.ModelInfer(infer_request("echo", one(1)))).outputs
    # gRPC's own limit, set where the server is created.
    predictor = sk.Predictor(Echo(), name="echo")
    async with predictor:
        served = create_server(predictor, max_message_bytes=1000)
        await served.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                error = await rpc_error(stub.ModelInfer(infer_request("echo", big)))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert (await stub.ModelInfer(infer_request("echo", one(1)))).outputs
        finally:
            await served.stop(None)


@pytest.mark.anyio
async def test_a_service_shared_with_an_http_app() -> None:
    predictor = sk.Predictor(Echo(), name="echo")
    service = Service(predictor)
    async with serving(service) as (stub, servicer):
        await predictor.astart()
        assert servicer.service is service
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        service.accepting = False
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        await predictor.aclose()


def test_status_codes_follow_the_transports_table() -> None:
    assert status_code("overloaded") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code("deadline_exceeded") == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_code("invalid_input") == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code("invalid_v2_request") == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code("not_found") == grpc.StatusCode.NOT_FOUND
    assert status_code("model_not_found") == grpc.StatusCode.NOT_FOUND
    assert status_code("closed") == grpc.StatusCode.UNAVAILABLE
    assert status_code("not_ready") == grpc.StatusCode.UNAVAILABLE
    assert status_code("payload_too_large") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code("cancelled") == grpc.StatusCode.CANCELLED
    assert status_code("model_error") == grpc.StatusCode.INTERNAL
    assert status_code("something_new") == grpc.StatusCode.INTERNAL


def test_servekit_and_its_transports_import_without_grpc() -> None:
    code = (
        "import sys; import servekit, servekit.transports; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_docstring_examples_run() -> None:
    import doctest

    import servekit.transports.grpc

    assert doctest.testmod(servekit.transports.grpc).failed == 0


def test_public_names_are_listed_and_documented() -> None:
    import inspect

    import servekit.transports.grpc as module

    assert module.__all__ == sorted(module.__all__)
    missing = []
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            if not inspect.getdoc(value):
                missing.append(name)
            for member, attr in vars(value).items() if inspect.isclass(value) else ():
                if not member.startswith("_") and inspect.isfunction(attr) and not attr.__doc__:
                    missing.append(f"{name}.{member}")
    assert missing == []


@pytest.mark.anyio
async def test_create_server_does_not_share_a_taken_port() -> None:
    # grpc's default (SO_REUSEPORT) would let two servers split one port's connections.
    first = grpc.aio.server()
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    try:
        with pytest.raises(OSError, match="in use"):
            create_server(sk.Predictor(Echo()), port=port)
    finally:
        await first.stop(None)


@pytest.mark.anyio
async def test_larger_typed_tensors() -> None:
    # Past a few dozen values the codec reads typed contents another way: same answers.
    values = np.arange(-50, 50, dtype=np.int16).reshape(2, 50)
    async with serving(sk.Predictor(Echo(), name="echo")) as (stub, _):
        tensor = Tensor(name="x", datatype="INT16", shape=[2, 50])
        tensor.contents.int_contents.extend(values.reshape(-1).tolist())
        response = await stub.ModelInfer(infer_request("echo", tensor))
        assert response.outputs[0].datatype == "INT16"
        assert list(response.outputs[0].contents.int_contents) == values.reshape(-1).tolist()
        tensor.contents.int_contents[77] = 40_000
        error = await rpc_error(stub.ModelInfer(infer_request("echo", tensor)))
        assert "int_contents[77] is outside the range of INT16" in (error.details() or "")
