"""LD-02 (short): overload is refused fast and typed while accepted requests finish;
SD-02: a drain that outlasts its grace ends callers with a typed error, not a hang."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import httpx
import pytest

import servekit as sk
from servekit.transports import create_asgi_app


def slow_batch(batch: list[Any]) -> list[Any]:
    time.sleep(0.02)  # 20 ms a batch, one batch at a time (Threads(1))
    return batch


@pytest.mark.anyio
async def test_overload_rejects_the_excess_with_429_and_serves_the_rest() -> None:
    batcher = sk.Batcher(max_batch_size=4, max_queue=8)
    predictor = sk.Predictor(slow_batch, backend=sk.Threads(1), batcher=batcher)
    app = create_asgi_app(predictor)
    statuses: list[int] = []
    retry_after: set[str] = set()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
        ) as http:

            async def one(x: int) -> None:
                response = await http.post("/predict", json={"input": x, "timeout_s": 5})
                statuses.append(response.status_code)
                if response.status_code == 429:
                    retry_after.add(response.headers["retry-after"])
                else:
                    assert response.json()["output"] == x

            async with anyio.create_task_group() as group:
                for x in range(120):  # far more at once than the queue holds
                    group.start_soon(one, x)
            assert (await http.get("/v2/health/live")).status_code == 200
            after = await http.post("/predict", json={"input": 7})
            assert after.status_code == 200  # back to normal once the load stops
    finally:
        await predictor.aclose()
    assert set(statuses) == {200, 429}
    assert statuses.count(200) >= 8
    assert all(value.isdigit() and int(value) >= 1 for value in retry_after)
    stats = batcher.statistics()
    assert stats.rejected == statuses.count(429)
    assert stats.queue_depth == 0


@pytest.mark.anyio
async def test_shutdown_past_its_grace_ends_callers_with_closed() -> None:
    release = threading.Event()

    def stuck(batch: list[Any]) -> list[Any]:
        release.wait(30)
        return batch

    predictor = sk.Predictor(stuck, backend=sk.Threads(1), batcher=sk.Batcher(max_batch_size=1))
    app = create_asgi_app(predictor)
    responses: list[httpx.Response] = []
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
        ) as http:

            async def one(x: int) -> None:
                responses.append(await http.post("/predict", json={"input": x}))

            async with anyio.create_task_group() as group:
                group.start_soon(one, 1)  # runs (stuck in the model)
                group.start_soon(one, 2)  # waits in the queue
                await anyio.sleep(0.2)
                started = time.monotonic()
                await app.shutdown(grace_s=0.3)
                assert time.monotonic() - started < 5  # no hang on the stuck model
                assert not app.service.ready()
                refused = await http.post("/predict", json={"input": 3})
                assert refused.status_code == 503
                release.set()
    finally:
        release.set()
        await predictor.aclose()
    codes = sorted(r.json()["error"]["code"] for r in responses if r.status_code != 200)
    assert codes and set(codes) <= {"closed"}
