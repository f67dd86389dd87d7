from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pydantic
import pytest

import servekit as sk
from servekit.testing import Echo, FailOn, Slow


class Customer(pydantic.BaseModel):
    age: int


class AgeModel(sk.Model[Customer, int]):
    def __init__(self) -> None:
        self.seen: list[Customer] = []

    def predict(self, batch: list[Customer]) -> list[int]:
        self.seen.extend(batch)
        return [c.age for c in batch]


class AsyncDouble(sk.Model[int, int]):
    async def predict(self, batch: list[int]) -> list[int]:
        await anyio.sleep(0)
        return [2 * x for x in batch]


def test_predict_starts_on_first_use_and_close_is_idempotent() -> None:
    p = sk.Predictor(Echo())
    assert p.state is sk.PredictorState.NEW
    assert p.predict(5) == 5
    assert p.state is sk.PredictorState.RUNNING
    p.close()
    p.close()
    assert p.state is sk.PredictorState.CLOSED
    with pytest.raises(sk.Closed):
        p.predict(1)
    with pytest.raises(sk.Closed):
        p.start()


def test_close_before_start_loads_nothing() -> None:
    loaded = []

    class Model(Echo):
        def load(self) -> None:
            loaded.append(1)

    p = sk.Predictor(Model())
    p.close()
    assert loaded == []
    assert p.state is sk.PredictorState.CLOSED


def test_invalid_input_is_rejected_before_the_model_sees_it() -> None:
    model = AgeModel()
    with sk.Predictor(model) as p:
        assert p.predict({"age": "30"}) == 30
        with pytest.raises(sk.InvalidInput) as info:
            p.predict({"age": "thirty"})
        assert info.value.errors[0]["loc"] == "age"
        assert [c.age for c in model.seen] == [30]
        stats = p.statistics()
        assert (stats.requests, stats.succeeded, stats.errors) == (2, 1, 1)


def test_validate_false_passes_items_through() -> None:
    model = AgeModel()
    with sk.Predictor(model, validate=False) as p:
        assert p.predict(Customer(age=3)) == 3
        with pytest.raises(sk.ModelError):
            p.predict({"age": 3})  # the model itself fails on a dict


def test_predict_many_finishes_every_item_before_raising_the_first_failure() -> None:
    model = FailOn({2, 4}, mode="return")
    with sk.Predictor(model) as p:
        with pytest.raises(sk.ModelError, match="bad item 2"):
            p.predict_many([1, 2, 3, 4, 5])
        assert sorted(x for call in model.calls for x in call) == [1, 2, 3, 4, 5]
        out = p.predict_many([1, 2, 3], return_exceptions=True)
        assert out[0] == 1 and out[2] == 3
        assert isinstance(out[1], sk.ModelError)
        assert isinstance(out[1].__cause__, ValueError)


def test_predict_many_with_an_invalid_item_runs_the_others() -> None:
    model = AgeModel()
    with sk.Predictor(model) as p:
        out = p.predict_many([{"age": 1}, {"age": "x"}, {"age": 3}], return_exceptions=True)
        assert out[0] == 1 and out[2] == 3
        assert isinstance(out[1], sk.InvalidInput)
        assert out[1].errors[0]["loc"] == "[1].age"
        assert [c.age for c in model.seen] == [1, 3]


def test_model_error_chains_the_original_exception() -> None:
    with sk.Predictor(FailOn({7})) as p:
        with pytest.raises(sk.ModelError) as info:
            p.predict(7)
        assert isinstance(info.value.__cause__, ValueError)
        assert info.value.error_type == "ValueError"
        assert p.predict(8) == 8


def test_sync_predict_inside_a_running_event_loop() -> None:
    """A notebook cell: predict() called synchronously from a coroutine on a running loop."""
    results: dict[str, Any] = {}

    async def cell() -> None:
        with sk.Predictor(Echo()) as inline:
            results["inline"] = inline.predict(1)
        with sk.Predictor(Echo(), backend=sk.Threads(2)) as threads:
            results["threads"] = threads.predict(2)
        with sk.Predictor(AsyncDouble()) as async_model:
            results["async"] = async_model.predict(3)
            results["async_many"] = async_model.predict_many([4, 5])

    asyncio.run(cell())
    assert results == {"inline": 1, "threads": 2, "async": 6, "async_many": [8, 10]}


@pytest.mark.anyio
@pytest.mark.parametrize("backend", [sk.Inline, lambda: sk.Threads(2)])
async def test_apredict_on_asyncio_and_trio(backend: Any) -> None:
    async with sk.Predictor(AsyncDouble(), backend=backend()) as p:
        assert await p.apredict(4) == 8
        assert await p.apredict_many([1, 2, 3]) == [2, 4, 6]
    async with sk.Predictor(Echo(), backend=backend()) as p:
        results = [None] * 20

        async def one(i: int) -> None:
            results[i] = await p.apredict(i)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
        assert results == list(range(20))


def test_many_threads_each_get_their_own_answer() -> None:
    with sk.Predictor(Echo(), backend=sk.Threads(2)) as p:

        def work(base: int) -> list[int]:
            return [p.predict(base * 1000 + i) for i in range(200)]

        with ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(work, range(16)))
        assert outs == [[b * 1000 + i for i in range(200)] for b in range(16)]
        assert p.statistics().requests == 16 * 200


def test_timeout_raises_deadline_exceeded_and_the_expired_item_never_runs() -> None:
    release = threading.Event()
    model = Slow(release=release)
    with sk.Predictor(model, backend=sk.Threads(1)) as p:
        with ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(p.predict, "first")
            assert model.entered.wait(5)
            started = time.monotonic()
            with pytest.raises(sk.DeadlineExceeded) as info:
                p.predict("late", timeout_s=0.05)
            assert isinstance(info.value, TimeoutError)
            assert time.monotonic() - started < 0.05 + 0.5
            release.set()
            assert blocker.result() == "first"
        assert p.predict("after") == "after"
    assert ["late"] not in model.calls


@pytest.mark.parametrize("way", ["predict", "predict_many", "batched predict_many"])
def test_an_interrupted_caller_thread_drops_its_queued_items(interrupt: Any, way: str) -> None:
    # Ctrl-C in a script waiting on predict: nothing it sent runs after it left, and the
    # predictor serves the next caller as usual.
    release = threading.Event()
    model = Slow(release=release)
    batcher = sk.Batcher(max_batch_size=8) if way.startswith("batched") else None
    with sk.Predictor(model, backend=sk.Threads(1), batcher=batcher) as p:
        with ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(p.predict, "blocker")
            assert model.entered.wait(5)
            threading.Thread(target=interrupt).start()
            call = (
                (lambda: p.predict("interrupted"))
                if way == "predict"
                else (lambda: p.predict_many(["interrupted", "too"]))
            )
            with pytest.raises(interrupt.error):
                call()
            release.set()
            assert blocker.result(timeout=5) == "blocker"
        assert p.predict("after") == "after"
        if batcher is not None:
            assert batcher.statistics().cancelled == 2
    assert model.calls == [["blocker"], ["after"]]


@pytest.mark.anyio
async def test_cancelled_async_caller_drops_its_queued_item() -> None:
    release = threading.Event()
    model = Slow(release=release)
    async with sk.Predictor(model, backend=sk.Threads(1)) as p:
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.apredict, "blocker")
            while not model.entered.is_set():
                await anyio.sleep(0.001)
            with anyio.move_on_after(0.05):
                await p.apredict("cancelled")
            release.set()
        assert await p.apredict("next") == "next"
    assert ["cancelled"] not in model.calls
    assert ["blocker"] in model.calls


@pytest.mark.anyio
async def test_async_timeout() -> None:
    release = threading.Event()
    async with (
        sk.Predictor(Slow(release=release), backend=sk.Threads(1)) as p,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(p.apredict, "blocker")
        while not p.statistics().in_flight:
            await anyio.sleep(0.001)
        with pytest.raises(sk.DeadlineExceeded):
            await p.apredict("late", timeout_s=0.05)
        release.set()


def test_close_drains_in_flight_work_within_the_grace() -> None:
    model = Slow(0.2)
    p = sk.Predictor(model, backend=sk.Threads(1))
    p.start()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(p.predict, "running")
        while not p.statistics().in_flight:
            time.sleep(0.001)
        p.close(grace_s=5.0)
        assert running.result() == "running"
    with pytest.raises(sk.Closed):
        p.predict("late")


def test_close_fails_what_is_left_after_the_grace_with_closed() -> None:
    release = threading.Event()
    model = Slow(release=release)
    p = sk.Predictor(model, backend=sk.Threads(1))
    p.start()
    with ThreadPoolExecutor(3) as pool:
        try:
            first = pool.submit(p.predict, "running")
            assert model.entered.wait(5)
            queued = pool.submit(p.predict, "queued")
            while p.statistics().in_flight < 2:
                time.sleep(0.001)
            closer = pool.submit(p.close, 0.1)
            with pytest.raises(sk.Closed):
                queued.result(timeout=5)
        finally:
            release.set()
        closer.result(timeout=5)
        assert first.result(timeout=5) == "running"
    assert p.state is sk.PredictorState.CLOSED


def test_no_thread_outlives_close() -> None:
    def ours() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("servekit-")]

    with sk.Predictor(AsyncDouble(), backend=sk.Threads(3)) as p:
        p.predict_many(range(10))
        assert len(ours()) == 3
    with sk.Predictor(AsyncDouble()) as p:  # Inline with an async model: a loop thread
        p.predict(1)
        assert len(ours()) == 1
    assert ours() == []


def test_load_failure_makes_start_fail_loudly() -> None:
    class Broken(Echo):
        def load(self) -> None:
            raise FileNotFoundError("weights.bin")

    for backend in (sk.Inline(), sk.Threads(2), sk.Threads(2, share_model=False)):
        p = sk.Predictor(Broken(), backend=backend)
        with pytest.raises(sk.ModelLoadError, match=r"weights\.bin"):
            p.start()


def test_statistics_and_html_repr() -> None:
    with sk.Predictor(FailOn({0}), name="demo") as p:
        p.predict_many([0, 1, 2], return_exceptions=True)
        stats = p.statistics()
        assert stats.name == "demo"
        assert (stats.requests, stats.succeeded, stats.errors, stats.in_flight) == (3, 2, 1, 0)
        assert stats.latency.count == 1
        assert 0 < stats.latency.p50_s <= stats.latency.max_s
        with pytest.raises(AttributeError):
            stats.requests = 5  # type: ignore[misc]
        html = p._repr_html_()
        assert "demo" in html and "<table>" in html
        assert "demo" in repr(p)
