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
