"""The ASGI and WSGI apps: the same requests through both, in process, plus a real
uvicorn on 127.0.0.1. Async tests run on asyncio and trio."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import httpx
import numpy as np
import pytest
from pydantic import BaseModel

import servekit as sk
from servekit.jobs import JobQueue, MemoryJobStore
from servekit.testing import Slow
from servekit.transports import Limits, create_asgi_app, create_wsgi_app

Client = Callable[..., Awaitable[httpx.Response]]


def double(xs: list[Any]) -> list[Any]:
    return [x * 2 for x in xs]


@sk.model(per_item=True)
def fragile(x: int) -> int:
    if x == 13:
        raise ValueError("secret path /etc/shadow leaked")
    if x == 99:
        raise sk.Overloaded("busy", retry_after_s=2.5)
    return x + 1


@sk.model
def norms(batch: list[sk.Array("float32", (3,))]) -> list[float]:  # type: ignore[valid-type]
    return [float(np.linalg.norm(v)) for v in batch]


def predictors() -> dict[str, sk.Predictor[Any, Any]]:
    return {
        "double": sk.Predictor(double, name="double"),
        "fragile": sk.Predictor(fragile, name="fragile"),
        "norms": sk.Predictor(norms, name="norms"),
    }


@pytest.fixture(params=["asgi", "wsgi"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    served = predictors()
    jobs = JobQueue(served["double"], store=MemoryJobStore(), workers=1)
    limits = Limits(max_body_bytes=100_000)
    if request.param == "asgi":
        app = create_asgi_app(served, jobs=jobs, limits=limits)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as http:

            async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
                return await http.request(method, path, **kwargs)

            yield call
    else:
        wsgi = create_wsgi_app(served, jobs=jobs, limits=limits)
        with httpx.Client(transport=httpx.WSGITransport(app=wsgi), base_url="http://test") as h:

            async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
                return await anyio.to_thread.run_sync(lambda: h.request(method, path, **kwargs))

            yield call
    await jobs.aclose()
    for predictor in served.values():
        await predictor.aclose()


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert "Traceback" not in response.text
    return dict(body["error"])


@pytest.mark.anyio
async def test_http_health_and_server_metadata(client: Client) -> None:
    live = await client("GET", "/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    ready = await client("GET", "/v2/health/ready")
    assert ready.status_code in (200, 503)
    meta = await client("GET", "/v2")
    assert meta.status_code == 200
    assert meta.json()["name"] == "servekit"
    assert "version" in meta.json()


@pytest.mark.anyio
async def test_http_predict_one_and_many(client: Client) -> None:
    one = await client("POST", "/models/double/predict", json={"input": 21})
    assert one.status_code == 200
    assert one.json()["output"] == 42
    assert one.json()["model"] == "double"
    many = await client("POST", "/models/fragile/predict_many", json={"inputs": [1, 13, 2]})
    assert many.status_code == 200
    body = many.json()
    assert body["outputs"] == [2, None, 3]
    assert body["errors"][0] is None and body["errors"][2] is None
    assert body["errors"][1]["code"] == "model_error"
    assert "ValueError" in body["errors"][1]["message"]
    assert "/etc/shadow" not in many.text  # SEC-08: the model's message stays inside


@pytest.mark.anyio
async def test_http_error_table(client: Client) -> None:
    # TR-01: malformed JSON, wrong content type, empty body -> 400; live afterwards.
    bad = await client(
        "POST",
        "/models/double/predict",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400
    assert error_of(bad)["code"] in ("invalid_v2_request", "bad_request")
    text = await client(
        "POST", "/models/double/predict", content=b"x", headers={"content-type": "text/plain"}
    )
    assert text.status_code == 400
    empty = await client("POST", "/models/double/predict", content=b"")
    assert empty.status_code == 400
    assert (await client("GET", "/v2/health/live")).status_code == 200
    # A model error is 500 with the class name only; an input failing the signature 422.
    failed = await client("POST", "/models/fragile/predict", json={"input": 13})
    assert failed.status_code == 500
    assert "/etc/shadow" not in failed.text
    assert error_of(failed)["code"] == "model_error"
    invalid = await client("POST", "/models/fragile/predict", json={"input": "abc"})
    assert invalid.status_code == 422
    assert error_of(invalid)["code"] == "invalid_input"
    busy = await client("POST", "/models/fragile/predict", json={"input": 99})
    assert busy.status_code == 429
    assert busy.headers["retry-after"] == "3"
    # TR-07: unknown model 404, unknown route 404, wrong method 405 with Allow.
    assert (await client("POST", "/models/nope/predict", json={"input": 1})).status_code == 404
    assert (await client("GET", "/nowhere")).status_code == 404
    wrong = await client("GET", "/models/double/predict")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert (await client("POST", "/v2/health/live")).headers["allow"] == "GET"
    # TR-02: a body over the limit is 413.
    big = await client("POST", "/models/double/predict", content=b"[" * 200_000)
    assert big.status_code == 413
    # TR-03: JSON nested too deep is 400, not a crash.
    deep = await client("POST", "/models/double/predict", content=b"[" * 120 + b"]" * 120)
    assert deep.status_code == 400


@pytest.mark.anyio
async def test_http_v2_infer_json_and_id_echo(client: Client) -> None:
    request = {
        "id": "req-7",
        "inputs": [
            {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [3, 4, 0, 0, 0, 2]}
        ],
    }
    response = await client("POST", "/v2/models/norms/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-7"
    assert body["model_name"] == "norms"
    (output,) = body["outputs"]
    assert output["shape"] == [2]
    assert output["data"] == [5.0, 2.0]
    del request["id"]
    assert "id" not in (await client("POST", "/v2/models/norms/infer", json=request)).json()
    versioned = await client("POST", "/v2/models/norms/versions/1/infer", json=request)
    assert versioned.status_code == 200
    missing = await client("POST", "/v2/models/norms/versions/9/infer", json=request)
    assert missing.status_code == 404
    bad_shape = {"inputs": [{"name": "i", "shape": [-1], "datatype": "FP32", "data": []}]}
    assert (await client("POST", "/v2/models/norms/infer", json=bad_shape)).status_code == 400


@pytest.mark.anyio
async def test_http_v2_binary_output(client: Client) -> None:
    request = {
        "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 2]}],
        "outputs": [{"name": "output", "parameters": {"binary_data_output": True}}],
    }
    response = await client("POST", "/v2/models/norms/infer", json=request)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    (output,) = header["outputs"]
    assert output["parameters"]["binary_data_size"] == 8  # one FP64 (a Python float)
    (value,) = struct.unpack("<d", response.content[length:])
    assert value == 3.0


@pytest.mark.anyio
async def test_http_model_metadata_and_readiness(client: Client) -> None:
    meta = await client("GET", "/v2/models/norms")
    assert meta.status_code == 200
    body = meta.json()
    assert body["name"] == "norms"
    assert body["inputs"][0]["datatype"] == "FP32"
    assert body["inputs"][0]["shape"] == [-1, 3]
    await client("POST", "/models/norms/predict", json={"input": [1, 0, 0]})
    ready = await client("GET", "/v2/models/norms/ready")
    assert (ready.status_code, ready.json()["ready"]) == (200, True)
    assert (await client("GET", "/v2/models/nope/ready")).status_code == 404


@pytest.mark.anyio
async def test_http_jobs_routes(client: Client) -> None:
    submitted = await client("POST", "/jobs", json={"input": 5})
    assert submitted.status_code == 202
    location = submitted.headers["location"]
    assert location == f"/jobs/{submitted.json()['id']}"
    deadline = time.monotonic() + 10
    while True:
        job = (await client("GET", location)).json()
        if job["status"] == "succeeded" or time.monotonic() > deadline:
            break
        await anyio.sleep(0.01)
    assert job["result"] == 10
    unknown = await client("GET", "/jobs/not-a-job")
    assert unknown.status_code == 404
    assert error_of(unknown)["code"] == "job_not_found"
    keyed = await client("POST", "/jobs", json={"input": 1}, headers={"idempotency-key": "k1"})
    again = await client("POST", "/jobs", json={"input": 1}, headers={"idempotency-key": "k1"})
    assert keyed.json()["id"] == again.json()["id"]
    conflict = await client("POST", "/jobs", json={"input": 2}, headers={"idempotency-key": "k1"})
    assert conflict.status_code == 409
    cancelled = await client("DELETE", location)
    assert cancelled.status_code == 200
    assert (await client("GET", "/jobs")).status_code == 404  # no listing over HTTP (SEC-10)


@pytest.mark.anyio
async def test_http_deadline_is_504() -> None:
    release = threading.Event()
    slow = sk.Predictor(Slow(delay_s=0.0, release=release), backend=sk.Threads(1))
    app = create_asgi_app(slow)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as http:
            response = await http.post("/predict", json={"input": 1, "timeout_s": 0.05})
        assert response.status_code == 504
        assert error_of(response)["code"] == "deadline_exceeded"
    finally:
        release.set()
        await slow.aclose()


@pytest.mark.anyio
async def test_asgi_client_disconnect_cancels_the_queued_item() -> None:
    release = threading.Event()
    model = Slow(delay_s=0.0, release=release)
    predictor = sk.Predictor(model, backend=sk.Threads(1), batcher=sk.Batcher(max_batch_size=1))
    app = create_asgi_app(predictor)
    sent: list[dict[str, Any]] = []

    async def request(body: bytes, disconnect_after_s: float | None) -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            if disconnect_after_s is None:
                await anyio.sleep_forever()
            await anyio.sleep(disconnect_after_s)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/predict",
            "headers": [(b"content-type", b"application/json")],
            "query_string": b"",
        }
        await app(scope, receive, send)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(request, b'{"input": 1}', None)  # occupies the only worker
            await anyio.sleep(0.2)
            await request(b'{"input": 2}', 0.1)  # queued, then the client goes away
            stats = predictor.batcher.statistics() if predictor.batcher else None
            assert stats is not None
            assert stats.cancelled == 1
            release.set()
    finally:
        release.set()
        await predictor.aclose()
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert statuses == [200]  # nothing was sent to the client that left


def _predict_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
    }


def test_asgi_on_asyncio_the_disconnect_watcher_ends_with_its_request() -> None:
    # On asyncio the watcher is a bare task (no task group): after the answer it is
    # cancelled, and gone one loop pass later; a receive() that fails while watching
    # does not fail the request; a request cancelled from outside stays cancelled.
    import asyncio

    predictor = sk.Predictor(double, batcher=sk.Batcher(max_batch_size=4))
    app = create_asgi_app(predictor, lifespan=False)

    async def request(receive_fails: bool) -> list[dict[str, Any]]:
        messages = [{"type": "http.request", "body": b'{"input": 2}', "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            if receive_fails:
                raise RuntimeError("the server's receive broke")
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(_predict_scope(), receive, send)
        return sent

    async def main() -> None:
        before = asyncio.all_tasks()
        for receive_fails in (False, True, False):
            sent = await request(receive_fails)
            assert sent[0]["status"] == 200
            assert json.loads(sent[1]["body"])["output"] == 4
        await asyncio.sleep(0)  # the cancelled watchers finish on this pass
        assert asyncio.all_tasks() == before

        release = threading.Event()
        slow = sk.Predictor(Slow(delay_s=0.0, release=release), batcher=sk.Batcher())
        slow_app = create_asgi_app(slow, lifespan=False)

        async def never() -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def ignore(message: dict[str, Any]) -> None:
            raise AssertionError("a cancelled request sends nothing")

        async def slow_request() -> None:
            messages = [{"type": "http.request", "body": b'{"input": 1}', "more_body": False}]

            async def receive() -> dict[str, Any]:
                return messages.pop() if messages else await never()

            await slow_app(_predict_scope(), receive, ignore)

        slow.start()
        try:
            task = asyncio.ensure_future(slow_request())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            release.set()
            await slow.aclose()

    predictor.start()
    try:
        asyncio.run(main())
    finally:
        predictor.close()


@pytest.mark.anyio
async def test_asgi_lifespan_starts_and_drains() -> None:
    predictor = sk.Predictor(double)
    app = create_asgi_app(predictor)
    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            assert predictor.ready

    await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert predictor.state is sk.PredictorState.CLOSED
    assert not app.service.ready()


def test_http_under_a_real_uvicorn_on_loopback() -> None:
    uvicorn = pytest.importorskip("uvicorn")
    predictor = sk.Predictor(double)
    config = uvicorn.Config(
        create_asgi_app(predictor), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.get("/v2/health/ready").json() == {"ready": True}
            assert http.post("/predict", json={"input": 4}).json()["output"] == 8
    finally:
        server.should_exit = True
        thread.join(10)
    assert predictor.state is sk.PredictorState.CLOSED  # lifespan shutdown drained it


@pytest.mark.anyio
async def test_http_metrics_parse_with_prometheus_client() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    batched = sk.Predictor(double, name="batched", batcher=sk.Batcher(max_batch_size=8))
    plain = sk.Predictor(fragile, name="plain")
    app = create_asgi_app({"batched": batched, "plain": plain})
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as http:
            for x in range(5):
                await http.post("/models/batched/predict", json={"input": x})
            await http.post("/models/plain/predict", json={"input": 13})
            response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        requests = {
            (s.labels["model"], s.labels["outcome"]): s.value
            for s in families["servekit_predictions"].samples
        }
        assert requests[("batched", "succeeded")] == 5
        assert requests[("plain", "failed")] == 1
        sizes = families["servekit_batch_size_items"].samples
        sizes = [s for s in sizes if s.name.endswith("_count")]
        assert sizes[0].value == families["servekit_batches"].samples[0].value
        assert families["servekit_request_duration_seconds"].type == "histogram"
        assert families["servekit_ready"].samples[0].value in (0.0, 1.0)
    finally:
        await batched.aclose()
        await plain.aclose()


class Reading(BaseModel):
    celsius: float


@sk.model
def fahrenheit(batch: list[Reading]) -> list[float]:
    return [r.celsius * 9 / 5 + 32 for r in batch]


@pytest.mark.anyio
async def test_http_mounted_under_a_prefix_and_named_one_field_inputs() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    predictor = sk.Predictor(fahrenheit, name="f")
    host = Starlette(routes=[Mount("/raw", app=create_asgi_app(predictor, lifespan=False))])
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=host), base_url="http://t"
        ) as http:
            native = await http.post("/raw/predict", json={"input": {"celsius": 100}})
            assert native.status_code == 200, native.text
            assert native.json()["output"] == 212.0
            infer = await http.post(
                "/raw/v2/models/f/infer",
                json={
                    "inputs": [
                        {"name": "celsius", "shape": [2], "datatype": "FP64", "data": [0, 100]}
                    ]
                },
            )
            assert infer.status_code == 200, infer.text
            assert infer.json()["outputs"][0]["data"] == [32.0, 212.0]
            missing = await http.get("/raw/v2/models/nope")
            assert missing.status_code == 404
            assert isinstance(missing.json()["error"], str)  # the OIP error shape
            assert missing.json()["code"] == "not_found"
    finally:
        await predictor.aclose()


def test_wsgi_start_makes_it_ready_before_the_first_request() -> None:
    predictor = sk.Predictor(double)
    app = create_wsgi_app(predictor)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        assert http.get("/v2/health/ready").status_code == 503
        app.start()
        assert http.get("/v2/health/ready").json() == {"ready": True}
        app.close()
        assert http.get("/v2/health/ready").status_code == 503
        assert http.post("/predict", json={"input": 1}).status_code == 503
    assert predictor.state is sk.PredictorState.CLOSED


def test_http_metadata_of_nested_list_inputs() -> None:
    @sk.model
    def rows(batch: list[list[float]]) -> list[float]:
        return [sum(r) for r in batch]

    app = create_wsgi_app(sk.Predictor(rows, name="rows"))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        (spec,) = http.get("/v2/models/rows").json()["inputs"]
    assert spec == {"name": "input", "datatype": "FP64", "shape": [-1, -1]}


class Labelled(BaseModel):
    label: str
    score: float


@sk.model
def labeler(batch: list[str]) -> list[Labelled]:
    return [Labelled(label=x.upper(), score=len(x)) for x in batch]


@pytest.mark.anyio
async def test_http_v2_infer_of_a_model_returning_pydantic_models() -> None:
    predictor = sk.Predictor(labeler, name="lab")
    app = create_asgi_app(predictor)
    request = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "bc"]}]}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as http:
            response = await http.post("/v2/models/lab/infer", json=request)
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        assert outputs == {"label": ["A", "BC"], "score": [1.0, 2.0]}
    finally:
        await predictor.aclose()


@pytest.mark.anyio
async def test_http_openapi_json_has_each_models_schemas(client: Client) -> None:
    response = await client("GET", "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    route = document["paths"]["/models/norms/predict"]["post"]
    body = route["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["input"]["x-dtype"] == "float32"
    assert "429" in route["responses"]
    assert "/jobs" in document["paths"]


@pytest.mark.anyio
async def test_http_v2_an_empty_batch_is_refused_and_a_scalar_keeps_no_batch_axis(
    client: Client,
) -> None:
    # No item: nothing says what the outputs' datatype or shape would be, so a clear
    # 400 instead of a guessed tensor.
    empty = {"inputs": [{"name": "x", "shape": [0, 3], "datatype": "FP32", "data": []}]}
    response = await client("POST", "/v2/models/double/infer", json=empty)
    assert response.status_code == 400
    assert "first) dimension of the inputs is 0" in response.json()["error"]
    # A 0-d input is one item, and its output comes back without a batch axis.
    scalar = {"inputs": [{"name": "x", "shape": [], "datatype": "INT64", "data": [21]}]}
    response = await client("POST", "/v2/models/double/infer", json=scalar)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert (output["shape"], output["datatype"], output["data"]) == ([], "INT64", [42])
    batched = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [21]}]}
    (output,) = (await client("POST", "/v2/models/double/infer", json=batched)).json()["outputs"]
    assert (output["shape"], output["data"]) == ([1], [42])
