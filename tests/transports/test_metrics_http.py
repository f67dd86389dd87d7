"""GET /metrics after real HTTP traffic: predictions, errors, rejected items, jobs; the
text equals what a prometheus_client collector registered on the same app yields."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import servekit as sk
from servekit.jobs import JobQueue, MemoryJobStore
from servekit.metrics import register_prometheus
from servekit.transports import create_asgi_app, create_wsgi_app


@sk.model(per_item=True)
def picky(x: int) -> int:
    if x == 13:
        raise ValueError("unlucky")
    return 2 * x


def slow_batch(batch: list[Any]) -> list[Any]:
    time.sleep(0.02)  # one 20 ms batch at a time (Threads(1)): a queue builds up
    return batch


def series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.mark.anyio
async def test_metrics_after_predictions_errors_rejections_and_jobs() -> None:
    plain = sk.Predictor(picky, name="plain")
    batcher = sk.Batcher(max_batch_size=4, max_queue=8)
    busy = sk.Predictor(slow_batch, name="busy", backend=sk.Threads(1), batcher=batcher)
    queue = JobQueue(plain, store=MemoryJobStore(), workers=2)
    app = create_asgi_app({"plain": plain, "busy": busy}, jobs=queue)
    registry = CollectorRegistry()
    register_prometheus(app, registry=registry)
    statuses: list[int] = []
    await app.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
        ) as http:
            for x in range(6):
                assert (
                    await http.post("/models/plain/predict", json={"input": x})
                ).status_code == 200
            many = await http.post("/models/plain/predict_many", json={"inputs": [1, 13, 3]})
            assert many.json()["errors"][1]["code"] == "model_error"
            bad = await http.post("/models/plain/predict", json={"input": "not a number"})
            assert bad.status_code == 422

            async def one(x: int) -> None:
                r = await http.post("/models/busy/predict", json={"input": x, "timeout_s": 20})
                statuses.append(r.status_code)

            async with anyio.create_task_group() as group:
                for x in range(60):  # far more at once than the queue holds
                    group.start_soon(one, x)

            ids = []
            for x in (1, 13, 5):
                r = await http.post("/models/plain/jobs", json={"input": x})
                assert r.status_code == 202
                ids.append(r.json()["id"])
            for id in ids:
                await anyio.to_thread.run_sync(lambda id=id: queue.wait(id, timeout_s=30))
            response = await http.get("/metrics")
            text = response.text
            from_registry = generate_latest(registry).decode()
    finally:
        await app.shutdown()
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = series(text)
    assert set(statuses) == {200, 429}
    ok, rejected = statuses.count(200), statuses.count(429)
    # plain: 6 predicts + 3 items of predict_many (one failed) + 1 invalid input, then
    # 3 jobs run on the same predictor (one failed).
    assert get(found, "servekit_predictions_total", model="plain", outcome="succeeded") == 6 + 2 + 2
    assert get(found, "servekit_predictions_total", model="plain", outcome="failed") == 1 + 1 + 1
    # Calls timed: an input refused by the signature never reached the queue.
    assert get(found, "servekit_request_duration_seconds_count", model="plain") == 6 + 1 + 3
    assert get(found, "servekit_batch_items_total", model="busy", outcome="rejected") == rejected
    assert get(found, "servekit_batch_items_total", model="busy", outcome="succeeded") == ok
    assert get(found, "servekit_predictions_total", model="busy", outcome="failed") == rejected
    assert get(found, "servekit_batcher_queue_depth", model="busy") == 0
    assert get(found, "servekit_batch_size_items_sum", model="busy") == ok
    assert get(found, "servekit_jobs_submitted_total", model="plain") == 3
    assert get(found, "servekit_jobs_finished_total", model="plain", status="succeeded") == 2
    assert get(found, "servekit_jobs_finished_total", model="plain", status="failed") == 1
    assert get(found, "servekit_jobs", model="plain", status="succeeded") == 2
    assert get(found, "servekit_jobs", model="plain", status="queued") == 0
    assert get(found, "servekit_job_duration_seconds_count", model="plain") == 3
    assert get(found, "servekit_ready") == 1
    # The collector on the host's registry yields the very same series (the ratio moves
    # with the clock between the two scrapes, so it is only checked to be there).
    theirs = series(from_registry)
    clocked = ("servekit_batcher_utilisation_ratio", (("model", "busy"),))
    assert 0 < found.pop(clocked) <= 1 and 0 < theirs.pop(clocked) <= 1
    # The registry was read after the scrape was answered: it has that request more.
    scrape = (
        "servekit_http_requests_total",
        (("method", "GET"), ("route", "metrics"), ("status", "200")),
    )
    assert theirs.pop(scrape) == 1 and scrape not in found
    for key in [k for k in theirs if ("route", "metrics") in k[1]]:
        assert key[0].startswith("servekit_http_request_duration_seconds")
        del theirs[key]
    assert theirs == found


def test_wsgi_metrics_show_readiness_and_the_job_queue() -> None:
    predictor = sk.Predictor(picky, name="m")
    queue = JobQueue(predictor, store=MemoryJobStore(), workers=1)
    app = create_wsgi_app(predictor, jobs=queue)
    app.start()
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
            job = http.post("/jobs", json={"input": 4}).json()
            queue.wait(job["id"], timeout_s=30)
            found = series(http.get("/metrics").text)
            app.service.accepting = False  # what shutdown does first
            closing = series(http.get("/metrics").text)
    finally:
        app.close()
    assert get(found, "servekit_ready") == 1
    assert get(closing, "servekit_ready") == 0
    assert get(found, "servekit_jobs_finished_total", model="m", status="succeeded") == 1
    assert get(found, "servekit_model_info", model="m", version="", backend="Inline") == 1


@pytest.mark.anyio
async def test_one_job_queue_per_model_is_labelled_by_its_model() -> None:
    a = sk.Predictor(picky, name="a")
    b = sk.Predictor(lambda xs: xs, name="b")
    queues = {
        "a": JobQueue(a, store=MemoryJobStore(), workers=1),
        "b": JobQueue(b, store=MemoryJobStore(), workers=1),
    }
    app = create_asgi_app({"a": a, "b": b}, jobs=queues)
    await app.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
        ) as http:
            submitted = {"a": [1, 13], "b": [7]}
            for model, inputs in submitted.items():
                for x in inputs:
                    r = await http.post(f"/models/{model}/jobs", json={"input": x})
                    assert r.status_code == 202
                    job_id = r.json()["id"]
                    queue = queues[model]
                    await anyio.to_thread.run_sync(
                        lambda q=queue, i=job_id: q.wait(i, timeout_s=30)
                    )
            found = series((await http.get("/metrics")).text)
    finally:
        await app.shutdown()
    assert get(found, "servekit_jobs_submitted_total", model="a") == 2
    assert get(found, "servekit_jobs_submitted_total", model="b") == 1
    assert get(found, "servekit_jobs_finished_total", model="a", status="failed") == 1
    assert get(found, "servekit_jobs_finished_total", model="b", status="succeeded") == 1
    assert get(found, "servekit_jobs", model="b", status="succeeded") == 1


# --- HTTP families: servekit_http_requests_total, servekit_http_request_duration_seconds


def http_requests(found: dict[Any, float]) -> dict[tuple[str, str, str], float]:
    """The servekit_http_requests_total series as {(route, method, status): count}."""
    out = {}
    for (name, labels), value in found.items():
        if name == "servekit_http_requests_total":
            d = dict(labels)
            out[(d["route"], d["method"], d["status"])] = value
    return out


def check_http_families(found: dict[Any, float], expected: dict[tuple[str, str, str], int]) -> None:
    assert http_requests(found) == expected
    for route in {r for r, _, _ in expected}:
        count = sum(n for (r, _, _), n in expected.items() if r == route)
        labels = {"route": route}
        assert get(found, "servekit_http_request_duration_seconds_count", **labels) == count
        assert get(found, "servekit_http_request_duration_seconds_bucket", le="+Inf", **labels) == (
            count
        )
        assert get(found, "servekit_http_request_duration_seconds_sum", **labels) > 0


def mixed_service() -> tuple[sk.Predictor[Any, Any], sk.Predictor[Any, Any]]:
    plain = sk.Predictor(picky, name="plain")
    batcher = sk.Batcher(max_batch_size=4, max_queue=8)
    busy = sk.Predictor(slow_batch, name="busy", backend=sk.Threads(1), batcher=batcher)
    return plain, busy


# (method, path, body or None, the status it must get, its route label)
FIXED = [
    ("POST", "/models/plain/predict", {"input": 1}, 200, "predict"),
    ("POST", "/models/plain/predict", {"input": 2}, 200, "predict"),
    ("POST", "/models/plain/predict_many", {"inputs": [1, 13]}, 200, "predict_many"),
    ("POST", "/models/plain/predict", {"input": "not a number"}, 422, "predict"),
    ("POST", "/v2/models/plain/infer", {"inputs": []}, 400, "infer"),
    ("GET", "/no/such/path", None, 404, "unmatched"),
    ("GET", "/v2/models/ghost", None, 404, "model_metadata"),  # a route, no such model
    ("GET", "/models/plain/predict", None, 405, "predict"),
    ("BREW", "/v2/health/live", None, 405, "live"),  # counted as method "other"
    ("GET", "/v2/health/ready", None, 200, "ready"),
    ("DELETE", "/metrics", None, 405, "metrics"),
]


def expected_counts(statuses: list[int]) -> dict[tuple[str, str, str], int]:
    expected: dict[tuple[str, str, str], int] = {}
    for method, _, _, status, route in FIXED:
        key = (route, method if method != "BREW" else "other", str(status))
        expected[key] = expected.get(key, 0) + 1
    for status in statuses:  # the flood of /models/busy/predict
        key = ("predict", "POST", str(status))
        expected[key] = expected.get(key, 0) + 1
    return expected


@pytest.mark.anyio
async def test_asgi_counts_http_requests_by_route_method_and_status() -> None:
    plain, busy = mixed_service()
    app = create_asgi_app({"plain": plain, "busy": busy})
    statuses: list[int] = []
    await app.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
        ) as http:
            for method, path, body, status, _ in FIXED:
                r = await http.request(method, path, json=body)
                assert r.status_code == status, (method, path, r.text)

            async def one(x: int) -> None:
                r = await http.post("/models/busy/predict", json={"input": x, "timeout_s": 20})
                statuses.append(r.status_code)

            async with anyio.create_task_group() as group:
                for x in range(40):  # far more at once than the queue holds
                    group.start_soon(one, x)
            text = (await http.get("/metrics")).text
            again = series((await http.get("/metrics")).text)
    finally:
        await app.shutdown()
    assert set(statuses) == {200, 429}
    expected = expected_counts(statuses)
    check_http_families(series(text), expected)
    # The scrape is counted once it is answered: the next scrape shows it.
    assert http_requests(again) == {**expected, ("metrics", "GET", "200"): 1}


def test_wsgi_counts_http_requests_by_route_method_and_status() -> None:
    from concurrent.futures import ThreadPoolExecutor

    plain, busy = mixed_service()
    app = create_wsgi_app({"plain": plain, "busy": busy})
    app.start()
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
            for method, path, body, status, _ in FIXED:
                r = http.request(method, path, json=body)
                assert r.status_code == status, (method, path, r.text)

            def one(x: int) -> int:
                r = http.post("/models/busy/predict", json={"input": x, "timeout_s": 20})
                return r.status_code

            with ThreadPoolExecutor(32) as pool:  # request threads, as a WSGI server's
                statuses = list(pool.map(one, range(40)))
            found = series(http.get("/metrics").text)
    finally:
        app.close()
    assert set(statuses) == {200, 429}
    check_http_families(found, expected_counts(statuses))


@pytest.mark.anyio
async def test_the_fastapi_router_counts_the_requests_it_routes() -> None:
    from fastapi import FastAPI

    from servekit.transports.fastapi import create_router

    plain = sk.Predictor(picky, name="plain")
    host = FastAPI()
    host.include_router(create_router({"plain": plain}), prefix="/ml")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=host), base_url="http://t", timeout=30
        ) as http:
            assert (await http.post("/ml/models/plain/predict", json={"input": 1})).is_success
            assert (
                await http.post("/ml/models/plain/predict", json={"input": "x"})
            ).status_code == (422)
            assert (await http.get("/ml/v2/models/plain")).status_code == 200
            assert (await http.get("/elsewhere")).status_code == 404  # the host's, not ours
            found = series((await http.get("/ml/metrics")).text)
    finally:
        plain.close()
    assert http_requests(found) == {
        ("predict", "POST", "200"): 1,
        ("predict", "POST", "422"): 1,
        ("model_metadata", "GET", "200"): 1,
    }


def test_route_labels_stay_bounded_and_two_services_add_up() -> None:
    from servekit.metrics import collect, render_text
    from servekit.transports._core import route_name

    apps = [create_wsgi_app(sk.Predictor(picky, name=f"m{i}")) for i in range(2)]
    paths = [f"/random/{i}" for i in range(50)] + ["/v2/models/m0/infer/extra"]
    with httpx.Client(transport=httpx.WSGITransport(app=apps[0]), base_url="http://t") as http:
        for path in paths:
            assert http.get(path).status_code == 404
        assert http.request("PROPFIND", "/predict").status_code == 405
    with httpx.Client(transport=httpx.WSGITransport(app=apps[1]), base_url="http://t") as http:
        assert http.get("/nothing").status_code == 404
    for app in apps:
        app.close()
    found = series(render_text(collect(apps)))
    assert http_requests(found) == {
        ("unmatched", "GET", "404"): len(paths) + 1,
        ("predict", "other", "405"): 1,
    }
    service = apps[0].service
    assert route_name(service.match("GET", "/v2/health/live"), "/v2/health/live") == "live"
    assert route_name(service.match("PUT", "/v2/models/m0/"), "/v2/models/m0/") == (
        "model_metadata"
    )
    assert route_name(service.match("GET", "/x"), "/x") == "unmatched"


def test_the_http_families_reach_opentelemetry_and_prometheus_client() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from servekit.metrics import register_opentelemetry

    app = create_wsgi_app(sk.Predictor(picky, name="m"))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    register_opentelemetry(app, meter_provider=provider)
    registry = CollectorRegistry()
    register_prometheus(app, registry=registry)
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
            for x in (1, 2):
                assert http.post("/predict", json={"input": x}).status_code == 200
            assert http.post("/predict", json={"input": "x"}).status_code == 422
        points = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        points[(metric.name, tuple(sorted(point.attributes.items())))] = point.value
    finally:
        app.close()
        provider.shutdown()
    ok = (("method", "POST"), ("route", "predict"), ("status", "200"))
    invalid = (("method", "POST"), ("route", "predict"), ("status", "422"))
    assert points[("servekit_http_requests", ok)] == 2
    assert points[("servekit_http_requests", invalid)] == 1
    assert points[("servekit_http_request_duration_seconds_count", (("route", "predict"),))] == 3
    found = series(generate_latest(registry).decode())
    assert (
        get(found, "servekit_http_requests_total", route="predict", method="POST", status="200")
        == 2
    )
    assert get(found, "servekit_http_request_duration_seconds_count", route="predict") == 3
