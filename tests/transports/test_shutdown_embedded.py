"""SD-05: embedded use, no signals. The ASGI app's lifespan (driven as a server drives
it), then closing the predictors and the job queue again: every close is idempotent, no
ResourceWarning is raised, and no task or thread of servekit's is left behind."""

from __future__ import annotations

import gc
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

import servekit as sk
from servekit.jobs import JobQueue
from servekit.transports import ASGIApp, create_asgi_app


def double(batch: list[int]) -> list[int]:
    return [2 * x for x in batch]


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[ASGIApp]:
    """Run the app's ASGI lifespan as uvicorn does: startup, then shutdown on exit."""
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    app_outbox, from_app = anyio.create_memory_object_stream[dict[str, Any]](4)

    async def send(message: Any) -> None:
        await app_outbox.send(dict(message))

    async with anyio.create_task_group() as group, to_app, from_app, app_inbox, app_outbox:
        group.start_soon(
            app, {"type": "lifespan", "asgi": {"version": "3.0"}}, app_inbox.receive, send
        )
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        try:
            yield app
        finally:
            await to_app.send({"type": "lifespan.shutdown"})
            assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"


def _servekit_threads() -> set[threading.Thread]:
    """Live threads that are not the runtime's own idle worker pools (anyio's
    ``to_thread`` workers and trio's thread cache are owned by the event loop)."""
    pools = ("AnyIO worker thread", "Trio thread", "asyncio_")
    return {t for t in threading.enumerate() if t.is_alive() and not t.name.startswith(pools)}


def _worker_processes() -> list[list[str]]:
    """Child processes, but multiprocessing's resource tracker (one per interpreter,
    shared by everything that uses multiprocessing, started once and kept)."""
    children = [c.cmdline() for c in psutil.Process().children()]
    return [c for c in children if not any("resource_tracker" in part for part in c)]


def _tasks() -> int:
    """Tasks alive on the current event loop."""
    if _backend() == "trio":
        import trio

        return int(trio.lowlevel.current_statistics().tasks_living)
    import asyncio

    return len(asyncio.all_tasks())


def _backend() -> str:
    import sniffio

    return sniffio.current_async_library()


_BACKENDS: dict[str, Callable[[], Any]] = {
    "inline": sk.Inline,
    "threads": lambda: sk.Threads(2),
    "processes": lambda: sk.Processes(1),
}


@pytest.mark.anyio
@pytest.mark.parametrize("backend", sorted(_BACKENDS))
async def test_lifespan_then_closing_again_is_idempotent_and_leaves_nothing(
    backend: str, tmp_path: Path
) -> None:
    before_threads = _servekit_threads()
    before_tasks = _tasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = sk.Predictor(
            double,
            name="batched",
            backend=_BACKENDS[backend](),
            batcher=sk.Batcher(max_batch_size=8, max_queue=64),
        )
        plain = sk.Predictor(double, name="plain")
        jobs = JobQueue(batched, store=str(tmp_path / "jobs.sqlite3"))
        app = create_asgi_app({"batched": batched, "plain": plain}, jobs=jobs, grace_s=5)
        async with lifespan(app):
            assert batched.ready and plain.ready
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                answer = await http.post("/models/batched/predict", json={"input": 4})
                assert answer.json()["output"] == 8
                answer = await http.post("/models/plain/predict_many", json={"inputs": [1, 2]})
                assert answer.json()["outputs"] == [2, 4]
                submitted = await http.post("/jobs", json={"input": 5})
                assert submitted.status_code == 202
        assert batched.state is sk.PredictorState.CLOSED
        assert plain.state is sk.PredictorState.CLOSED
        # Closing again, every way an embedding host might: nothing happens, nothing hangs.
        with anyio.fail_after(10):
            await app.shutdown(grace_s=1)
            await app.shutdown(grace_s=1)
            batched.close()
            await batched.aclose()
            plain.close()
            jobs.close()
            await jobs.aclose()
        # The app refuses work once shut down, with its typed answer.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            refused = await http.post("/models/batched/predict", json={"input": 1})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "closed"
            assert (await http.get("/v2/health/ready")).status_code == 503
        del app, transport, http, batched, plain, jobs
        gc.collect()
    resource_warnings = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert resource_warnings == []
    assert _servekit_threads() - before_threads == set()
    assert _tasks() == before_tasks
    assert _worker_processes() == []  # Processes' workers are stopped


@pytest.mark.anyio
async def test_predictor_async_with_then_close_twice(tmp_path: Path) -> None:
    before_threads = _servekit_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = sk.Predictor(
            double, backend=sk.Threads(2), batcher=sk.Batcher(max_batch_size=4)
        )
        async with predictor:
            assert await predictor.apredict(3) == 6
        await predictor.aclose()
        predictor.close()
        with pytest.raises(sk.Closed):
            await predictor.apredict(1)
        del predictor
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert _servekit_threads() - before_threads == set()
