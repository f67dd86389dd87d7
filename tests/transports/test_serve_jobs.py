"""Job routes with several models: one JobQueue per model.

In process (ASGI and WSGI over the same core): ``/models/NAME/jobs`` submits to that
model's queue, the Location names the model, ``/jobs/ID`` finds a job in whichever
queue holds it, and a model without a queue, an unknown model, or ``/jobs`` without a
model (when there are several) is a 404 that says what to do. Then `servekit serve`
with a dict of two models and ``--jobs FILE``: a store file per model, each job run by
its own model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import servekit as sk
from servekit.jobs import JobQueue, MemoryJobStore, SQLiteJobStore
from servekit.transports import Service, create_asgi_app, create_wsgi_app


def double(batch: list[int]) -> list[int]:
    return [2 * x for x in batch]


def negate(batch: list[int]) -> list[int]:
    return [-x for x in batch]


def square(batch: list[int]) -> list[int]:
    return [x * x for x in batch]


async def _finished(http: httpx.AsyncClient, location: str) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            job: dict[str, Any] = (await http.get(location)).json()
            if job["status"] not in ("queued", "running"):
                return job
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_each_model_has_its_own_queue_over_http() -> None:
    predictors = {
        "double": sk.Predictor(double, name="double"),
        "negate": sk.Predictor(negate, name="negate"),
        "square": sk.Predictor(square, name="square"),  # no job queue
    }
    queues = {
        "double": JobQueue(predictors["double"], store=MemoryJobStore()),
        "negate": JobQueue(predictors["negate"], store=MemoryJobStore()),
    }
    app = create_asgi_app(predictors, jobs=queues)
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            ids = {}
            for name, x, want in (("double", 5, 10), ("negate", 5, -5)):
                submitted = await http.post(f"/models/{name}/jobs", json={"input": x})
                assert submitted.status_code == 202
                job_id = submitted.json()["id"]
                location = submitted.headers["location"]
                assert location == f"/models/{name}/jobs/{job_id}"
                job = await _finished(http, location)
                assert (job["status"], job["result"]) == ("succeeded", want)
                # The unqualified route finds it too (ids are unique across queues).
                assert (await http.get(f"/jobs/{job_id}")).json()["result"] == want
                ids[name] = job_id
            # Each queue holds only its own jobs.
            wrong = await http.get(f"/models/negate/jobs/{ids['double']}")
            assert wrong.status_code == 404
            assert (await http.get(f"/models/double/jobs/{ids['double']}")).status_code == 200
            assert queues["negate"].store.get(ids["negate"]) is not None
            with pytest.raises(sk.JobNotFound):
                queues["negate"].store.get(ids["double"])

            unnamed = await http.post("/jobs", json={"input": 1})
            assert unnamed.status_code == 404
            assert "/models/NAME/jobs" in unnamed.json()["error"]["message"]
            assert "['double', 'negate']" in unnamed.json()["error"]["message"]
            no_queue = await http.post("/models/square/jobs", json={"input": 1})
            assert no_queue.status_code == 404
            assert "has no job queue" in no_queue.json()["error"]["message"]
            unknown = await http.post("/models/nope/jobs", json={"input": 1})
            assert unknown.status_code == 404
            assert (await http.get("/jobs/not-a-job")).status_code == 404

            # Cancel through the model's route: a queued job (no worker free yet).
            slow = await http.post("/models/double/jobs", json={"input": 1})
            cancelled = await http.delete(slow.headers["location"])
            assert cancelled.status_code == 200
            openapi = (await http.get("/openapi.json")).json()
            assert "/jobs" in openapi["paths"]
    finally:
        await app.shutdown()
    assert all(q._state == "closed" for q in queues.values())  # lifespan closed both


def test_the_wsgi_app_serves_the_same_job_routes() -> None:
    predictors = {"double": sk.Predictor(double), "negate": sk.Predictor(negate)}
    queues = {name: JobQueue(p, store=MemoryJobStore()) for name, p in predictors.items()}
    wsgi = create_wsgi_app(predictors, jobs=queues)
    wsgi.start()
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=wsgi), base_url="http://t") as http:
            submitted = http.post("/models/negate/jobs", json={"input": 3})
            assert submitted.status_code == 202
            job_id = submitted.json()["id"]
            assert queues["negate"].wait(job_id, timeout_s=20).result == -3
            assert http.get(submitted.headers["location"]).json()["result"] == -3
            assert http.get(f"/jobs/{job_id}").json()["result"] == -3
            assert http.post("/jobs", json={"input": 3}).status_code == 404
    finally:
        wsgi.close(5)


def test_a_mapping_must_name_served_models() -> None:
    predictor = sk.Predictor(double, name="double")
    with pytest.raises(ValueError, match="names no model"):
        Service({"double": predictor}, jobs={"other": JobQueue(predictor, store=MemoryJobStore())})


def test_a_single_queue_keeps_the_plain_routes() -> None:
    predictors = {"double": sk.Predictor(double), "negate": sk.Predictor(negate)}
    queue = JobQueue(predictors["double"], store=MemoryJobStore())
    service = Service(predictors, jobs=queue)
    assert service.jobs is queue
    assert service.distinct_job_queues() == [queue]
    route, params = service.match("GET", "/models/double/jobs/abc")  # type: ignore[misc]
    assert (route, params) == ("job", {"model": "double", "job": "abc"})


_APP = textwrap.dedent(
    """
    import servekit as sk

    def double(batch):
        return [2 * x for x in batch]

    def negate(batch):
        return [-x for x in batch]

    models = {"double": double, "negate": negate}
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_servekit_serve_runs_a_queue_per_model_on_its_own_store(tmp_path: Path) -> None:
    (tmp_path / "jobs_app.py").write_text(_APP)
    port = _free_port()
    command = [sys.executable, "-m", "servekit", "serve", "jobs_app:models", "--port", str(port)]
    command += ["--jobs", str(tmp_path / "jobs.sqlite3"), "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None
            try:
                if httpx.get(f"{base}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        locations = {}
        for name in ("double", "negate"):
            submitted = httpx.post(f"{base}/models/{name}/jobs", json={"input": 7})
            assert submitted.status_code == 202, submitted.text
            locations[name] = submitted.headers["location"]
        results = {}
        deadline = time.monotonic() + 30
        for name, location in locations.items():
            while True:
                job = httpx.get(base + location).json()
                if job["status"] == "succeeded":
                    results[name] = job["result"]
                    break
                assert job["status"] in ("queued", "running"), job
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert results == {"double": 14, "negate": -7}
        assert httpx.post(f"{base}/jobs", json={"input": 1}).status_code == 404
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    # One store file per model, each holding only its model's job.
    for name in ("double", "negate"):
        store = SQLiteJobStore(tmp_path / f"jobs.{name}.sqlite3")
        try:
            jobs = store.list()
            assert len(jobs) == 1
            assert jobs[0].result == results[name]
        finally:
            store.close()
    assert not (tmp_path / "jobs.sqlite3").exists()


@pytest.mark.anyio
async def test_a_batch_run_started_over_http_as_a_job(tmp_path: Path) -> None:
    # A batch run is a job of a BatchJob model: POST the run's spec, poll, read the report.
    # A notification at the end would be the queue's webhook; here the poll shows the end.
    from servekit.batch import BatchJob

    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}, "x": {i}}}\n' for i in range(40)))
    runs = sk.Predictor(BatchJob(double, root=tmp_path), name="batch")
    predictors = {"double": sk.Predictor(double, name="double"), "batch": runs}
    app = create_asgi_app(predictors, jobs={"batch": JobQueue(runs, store=MemoryJobStore())})
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            spec = {"input": "in.jsonl", "output": "out.jsonl", "key": ["id"], "columns": "x"}
            submitted = await http.post("/models/batch/jobs", json={"input": spec})
            assert submitted.status_code == 202
            job = await _finished(http, submitted.headers["location"])
            assert job["status"] == "succeeded", job
            assert job["result"]["rows_succeeded"] == 40
            assert job["result"]["status"] == "completed"
            # A spec that leaves the root is refused by the run, as a failed job.
            bad = await http.post(
                "/models/batch/jobs", json={"input": {"input": "in.jsonl", "output": "../o.jsonl"}}
            )
            failed = await _finished(http, bad.headers["location"])
            assert (failed["status"], failed["error"]["code"]) == ("failed", "unsafe_path")
            # A spec without an output is invalid input, refused at submission.
            missing = await http.post("/models/batch/jobs", json={"input": {"input": "in.jsonl"}})
            assert missing.status_code == 422
    finally:
        await app.shutdown()
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["prediction"] for line in lines) == [2 * i for i in range(40)]
