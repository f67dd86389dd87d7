"""The standalone Batcher: batch formation, deadlines, cancellation, backpressure, close."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import servekit as sk
import servekit.testing
from servekit import _batch_slots, _batcher
from servekit._batch_records import CALLER_THREADS
from servekit._batcher import Batcher

# Generous: these bound a wait that should be near-instant, so a slow CI machine passes.
SLACK_S = 0.5
WAIT_S = 10.0


class Recorder:
    """A batch function that logs every call and can be held at its start by a gate."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: x * 2, *, gated: bool = False) -> None:
        self.fn = fn
        self.calls: list[list[Any]] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self._lock = threading.Lock()
        self._entered = threading.Condition(self._lock)

    def __call__(self, batch: Sequence[Any]) -> list[Any]:
        with self._lock:
            self.calls.append(list(batch))
            self._entered.notify_all()
        assert self.gate.wait(WAIT_S), "the test never released the gate"
        return [self.fn(x) for x in batch]

    def wait_calls(self, n: int) -> None:
        with self._lock:
            assert self._entered.wait_for(lambda: len(self.calls) >= n, timeout=WAIT_S)

    def seen(self) -> list[Any]:
        with self._lock:
            return [x for call in self.calls for x in call]


def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait (in a test only) until ``predicate()`` holds."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def batcher_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("servekit-batcher")]


class GatedDouble:
    """A batch function that doubles its batch, held at ``gate`` while it is clear;
    ``entered`` is set when a batch reaches it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never released the gate"
        return batch * 2


def run_callers(workers: list[threading.Thread]) -> None:
    """Start caller threads and wait for them; fail if one never got its answer."""
    for worker in workers:
        worker.start()
    join_callers(workers)


def join_callers(workers: list[threading.Thread]) -> None:
    """Wait for started caller threads; fail if one never got its answer."""
    for worker in workers:
        worker.join(WAIT_S * 3)
    assert not any(worker.is_alive() for worker in workers), "a caller never got its answer"


def start_blocker(pool: ThreadPoolExecutor, b: Batcher[Any, Any], model: Recorder) -> Future[Any]:
    """Occupy the only slot with one item held at the model's gate."""
    before = len(model.calls)
    future = pool.submit(b.submit, "blocker")
    model.wait_calls(before + 1)
    return future


# -- batch formation ----------------------------------------------------------------


def test_concurrent_callers_are_batched_and_each_gets_its_own_answer() -> None:
    model = Recorder(gated=True)
    with Batcher(model, max_batch_size=32) as b, ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(b.submit, i) for i in range(10)]
        model.wait_calls(1)
        wait_until(lambda: b.statistics().queue_depth == 10 - len(model.calls[0]))
        model.gate.set()
        assert [f.result(WAIT_S) for f in futures] == [2 * i for i in range(10)]
    assert max(len(call) for call in model.calls) > 1
    assert sorted(model.seen()) == list(range(10))
    stats = b.statistics()
    assert stats.items == 10 and stats.succeeded == 10 and stats.mean_batch_size > 1


def test_lone_caller_is_dispatched_at_once_without_waiting_out_max_wait() -> None:
    with Batcher(Recorder(), max_wait_s=10.0) as b:
        started = time.monotonic()
        assert b.submit(21) == 42
        assert time.monotonic() - started < 1.0


def test_max_batch_size_is_respected() -> None:
    model = Recorder(gated=True)
    with Batcher(model, max_batch_size=4) as b, ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(b.submit, i) for i in range(20)]
        model.wait_calls(1)
        wait_until(lambda: b.statistics().queue_depth == 20 - len(model.calls[0]))
        model.gate.set()
        assert [f.result(WAIT_S) for f in futures] == [2 * i for i in range(20)]
    assert all(1 <= len(call) <= 4 for call in model.calls)
    assert sorted(model.seen()) == list(range(20))


def test_wait_for_full_sends_nothing_until_the_batch_is_full() -> None:
    model = Recorder()
    b = Batcher(model, max_batch_size=4, max_wait_s=WAIT_S, wait_for_full=True)
    with b, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(b.submit, i) for i in range(4)]
        assert sorted(f.result(WAIT_S) for f in futures) == [0, 2, 4, 6]
    assert len(model.calls) == 1 and sorted(model.calls[0]) == [0, 1, 2, 3]


def test_wait_for_full_sends_a_partial_batch_after_max_wait() -> None:
    model = Recorder()
    with Batcher(model, max_batch_size=100, max_wait_s=0.05, wait_for_full=True) as b:
        started = time.monotonic()
        assert b.submit(1) == 2
        assert time.monotonic() - started < 0.05 + SLACK_S
    assert model.calls == [[1]]


def test_concurrent_batches_run_at_the_same_time() -> None:
    model = Recorder(gated=True)
    with Batcher(model, max_concurrent_batches=2) as b, ThreadPoolExecutor(2) as pool:
        first = pool.submit(b.submit, 1)
        model.wait_calls(1)
        second = pool.submit(b.submit, 2)
        model.wait_calls(2)
        assert b.statistics().running_batches == 2
        model.gate.set()
        assert (first.result(WAIT_S), second.result(WAIT_S)) == (2, 4)
    assert batcher_threads() == []


def test_async_function_is_batched() -> None:
    async def adouble(xs: list[int]) -> list[int]:
        await anyio.sleep(0)
        return [2 * x for x in xs]

    with Batcher(adouble) as b:
        assert b.submit(4) == 8


@pytest.mark.anyio
async def test_asubmit_many_concurrent_tasks_each_get_their_own_answer() -> None:
    model = Recorder()
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await b.asubmit(i)

    async with Batcher(model, max_batch_size=8) as b, anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
    assert results == {i: 2 * i for i in range(50)}
    assert all(len(call) <= 8 for call in model.calls)


# -- errors -------------------------------------------------------------------------


def test_bq01_one_poisoned_item_fails_only_its_caller() -> None:
    def fail_on_13(x: int) -> int:
        if x == 13:
            raise ValueError("poisoned")
        return x * 2

    # The blocker holds the only slot while the 32 items gather in the queue.
    model = Recorder(fail_on_13, gated=True)
    with Batcher(model, max_batch_size=32) as b, ThreadPoolExecutor(33) as pool:
        blocker = pool.submit(b.submit, 1000)
        model.wait_calls(1)
        futures = [pool.submit(b.submit, i) for i in range(32)]
        wait_until(lambda: b.statistics().queue_depth == 32)
        model.gate.set()
        assert blocker.result(WAIT_S) == 2000
        errors = [f.exception(WAIT_S) for f in futures]
    failed = [i for i, e in enumerate(errors) if e is not None]
    assert failed == [13]
    assert isinstance(errors[13], sk.ModelError)
    assert isinstance(errors[13].__cause__, ValueError)
    assert [f.result() for i, f in enumerate(futures) if i != 13] == [
        2 * i for i in range(32) if i != 13
    ]
    calls_with_the_32 = [call for call in model.calls if 1000 not in call]
    assert len(calls_with_the_32[0]) == 32
    assert len(calls_with_the_32) <= 11
    assert b.statistics().failed == 1


def test_an_exception_returned_in_place_fails_only_that_item() -> None:
    def fn(xs: list[int]) -> list[Any]:
        return [KeyError(x) if x == 2 else x for x in xs]

    with Batcher(fn) as b:
        assert b.submit(1) == 1
        with pytest.raises(sk.ModelError):
            b.submit(2)


# -- backpressure ---------------------------------------------------------------------


def test_bq04_full_queue_raises_overloaded_at_once() -> None:
    model = Recorder(gated=True)
    with Batcher(model, max_queue=3) as b, ThreadPoolExecutor(4) as pool:
        blocker = start_blocker(pool, b, model)
        queued = [pool.submit(b.submit, i) for i in range(3)]
        wait_until(lambda: b.statistics().queue_depth == 3)
        started = time.monotonic()
        with pytest.raises(sk.Overloaded) as info:
            b.submit(99)
        assert time.monotonic() - started < SLACK_S
        assert info.value.retry_after_s > 0
        assert b.statistics().rejected == 1
        model.gate.set()
        assert blocker.result(WAIT_S) == "blockerblocker"
        assert [f.result(WAIT_S) for f in queued] == [0, 2, 4]
    assert 99 not in model.seen()


def test_default_queue_is_bounded() -> None:
    assert Batcher(Recorder()).max_queue == 1024
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(Recorder(), max_queue=0)


# -- deadlines ------------------------------------------------------------------------


def test_bq06_deadline_while_queued_never_reaches_the_model() -> None:
    model = Recorder(gated=True)
    with Batcher(model) as b, ThreadPoolExecutor(1) as pool:
        blocker = start_blocker(pool, b, model)
        started = time.monotonic()
        with pytest.raises(sk.DeadlineExceeded):
            b.submit("late", timeout_s=0.1)
        assert time.monotonic() - started < 0.1 + SLACK_S
        stats = b.statistics()
        assert stats.queue_depth == 0 and stats.expired == 1
        model.gate.set()
        blocker.result(WAIT_S)
        assert b.submit("after") == "afterafter"
    assert "late" not in model.seen()


@pytest.mark.anyio
async def test_bq06_async_deadline_while_queued_never_reaches_the_model() -> None:
    model = Recorder(gated=True)
    with ThreadPoolExecutor(1) as pool:
        async with Batcher(model) as b:
            blocker = start_blocker(pool, b, model)
            started = time.monotonic()
            with pytest.raises(sk.DeadlineExceeded):
                await b.asubmit("late", timeout_s=0.1)
            assert time.monotonic() - started < 0.1 + SLACK_S
            assert b.statistics().queue_depth == 0
            model.gate.set()
            blocker.result(WAIT_S)
    assert "late" not in model.seen()


def test_item_expired_in_the_queue_is_failed_at_batch_formation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A caller whose own timer has not fired yet (a slow thread): the worker must still
    # fail the expired item instead of sending it, and wake its caller.
    class LateWaiter(_batcher.SyncWaiter):
        def wait(self, timeout_s: float | None) -> bool:
            return super().wait(None)

    model = Recorder(gated=True)
    with Batcher(model) as b, ThreadPoolExecutor(2) as pool:
        blocker = start_blocker(pool, b, model)
        monkeypatch.setattr(_batcher, "SyncWaiter", LateWaiter)  # made by submit
        monkeypatch.setattr(_batch_slots, "SyncWaiter", LateWaiter)  # chained by the slot
        late = pool.submit(b.submit, "late", timeout_s=0.01)
        wait_until(lambda: b.statistics().queue_depth == 1)
        time.sleep(0.02)  # past the late item's deadline
        model.gate.set()
        assert isinstance(late.exception(WAIT_S), sk.DeadlineExceeded)
        blocker.result(WAIT_S)
    assert "late" not in model.seen()
    assert b.statistics().expired == 1


def test_a_batch_function_raising_systemexit_fails_its_batch_only() -> None:
    def fn(xs: list[int]) -> list[int]:
        if 0 in xs:
            raise SystemExit(3)
        return xs

    with Batcher(fn) as b:
        with pytest.raises(sk.ModelError):
            b.submit(0)
        assert b.submit(1) == 1


def test_deadline_while_running_drops_the_result() -> None:
    model = Recorder(gated=True)
    with Batcher(model) as b:
        started = time.monotonic()
        with pytest.raises(sk.DeadlineExceeded):
            b.submit("slow", timeout_s=0.1)
        assert time.monotonic() - started < 0.1 + SLACK_S
        model.gate.set()
    stats = b.statistics()
    assert stats.expired == 1 and stats.succeeded == 0 and stats.batches == 1


def test_zero_timeout_fails_at_once_without_queueing() -> None:
    model = Recorder()
    with Batcher(model) as b, pytest.raises(sk.DeadlineExceeded):
        b.submit(1, timeout_s=0)
    assert model.calls == []


# -- cancellation ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_bq09_cancelled_async_caller_never_reaches_the_model() -> None:
    model = Recorder(gated=True)
    with ThreadPoolExecutor(1) as pool:
        async with Batcher(model) as b:
            blocker = start_blocker(pool, b, model)
            with anyio.move_on_after(0.05) as scope:
                await b.asubmit("victim")
            assert scope.cancelled_caught
            stats = b.statistics()
            assert stats.queue_depth == 0 and stats.cancelled == 1
            model.gate.set()
            blocker.result(WAIT_S)
            assert await b.asubmit("after") == "afterafter"
    assert "victim" not in model.seen()


@pytest.mark.anyio
async def test_cancelled_while_running_drops_the_result() -> None:
    model = Recorder(gated=True)
    async with Batcher(model) as b:
        with anyio.move_on_after(0.05):
            await b.asubmit("x")
        model.gate.set()
    stats = b.statistics()
    assert stats.cancelled == 1 and stats.succeeded == 0 and model.calls == [["x"]]


# -- close ----------------------------------------------------------------------------


def test_close_drains_the_queue_then_refuses_with_closed() -> None:
    model = Recorder(gated=True)
    b = Batcher(model)
    b.start()
    with ThreadPoolExecutor(7) as pool:
        blocker = start_blocker(pool, b, model)
        queued = [pool.submit(b.submit, i) for i in range(5)]
        wait_until(lambda: b.statistics().queue_depth == 5)
        closer = pool.submit(b.close, WAIT_S)
        wait_until(lambda: "closing" in repr(b))
        with pytest.raises(sk.Closed):
            b.submit(99)
        model.gate.set()
        closer.result(WAIT_S)
        assert blocker.result(WAIT_S) == "blockerblocker"
        assert [f.result(WAIT_S) for f in queued] == [0, 2, 4, 6, 8]
    with pytest.raises(sk.Closed):
        b.submit(1)
    assert batcher_threads() == []


def test_close_fails_what_is_left_after_the_grace_with_closed() -> None:
    model = Recorder(gated=True)
    b = Batcher(model)
    with ThreadPoolExecutor(5) as pool:
        blocker = start_blocker(pool, b, model)
        queued = [pool.submit(b.submit, i) for i in range(3)]
        wait_until(lambda: b.statistics().queue_depth == 3)
        closer = pool.submit(b.close, 0.05)
        for future in queued:
            assert isinstance(future.exception(WAIT_S), sk.Closed)
        model.gate.set()  # the running batch cannot be interrupted: close waits for it
        closer.result(WAIT_S)
        assert blocker.result(WAIT_S) == "blockerblocker"
    assert b.statistics().closed == 3
    assert not any(isinstance(x, int) for x in model.seen())
    assert batcher_threads() == []


def test_close_is_idempotent_and_works_before_start() -> None:
    b = Batcher(Recorder())
    b.close()
    b.close()
    with pytest.raises(sk.Closed):
        b.submit(1)
    b = Batcher(Recorder())
    assert b.submit(1) == 2  # starts on first use
    b.close()
    b.close()
    assert batcher_threads() == []


@pytest.mark.anyio
async def test_async_with_closes_and_joins_threads() -> None:
    async with Batcher(Recorder(), max_concurrent_batches=3) as b:
        assert await b.asubmit(3) == 6
        assert len(batcher_threads()) == 3
    assert batcher_threads() == []
    with pytest.raises(sk.Closed):
        await b.asubmit(1)


def test_a_batcher_without_a_function_says_what_to_do() -> None:
    with pytest.raises(TypeError, match="no function"):
        Batcher().submit(1)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0}, {"max_wait_s": -1.0}, {"max_concurrent_batches": 0}],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Batcher(Recorder(), **kwargs)


# -- property -------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    items=st.lists(st.integers(), max_size=200),
    concurrent=st.integers(min_value=1, max_value=3),
)
def test_every_caller_gets_exactly_its_own_input_back(items: list[int], concurrent: int) -> None:
    calls: list[int] = []

    def identity(xs: list[int]) -> list[int]:
        calls.append(len(xs))
        return list(xs)

    b = Batcher(identity, max_batch_size=8, max_concurrent_batches=concurrent)
    with b, ThreadPoolExecutor(32) as pool:
        assert list(pool.map(b.submit, items)) == items
    assert all(n <= 8 for n in calls) and sum(calls) == len(items)


# -- cost, groups, priorities, and the Predictor behind it -----------------------------


def _held(max_batch_size: int = 32, **kwargs: Any) -> tuple[Any, threading.Event, list[list[Any]]]:
    """A batcher whose function blocks on an event, and the log of batches it saw."""
    release = threading.Event()
    calls: list[list[Any]] = []

    def fn(batch: list[Any]) -> list[Any]:
        calls.append(list(batch))
        release.wait()
        return list(batch)

    return sk.Batcher(fn, max_batch_size=max_batch_size, **kwargs), release, calls


def _wait_running(batcher: Any) -> None:
    deadline = time.monotonic() + 5
    while batcher.statistics().running_batches == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def _wait_depth(batcher: Any, depth: int) -> None:
    deadline = time.monotonic() + 5
    while batcher.statistics().queue_depth < depth:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_bq13_priorities_are_strict_and_fifo_within_a_level() -> None:
    batcher, release, calls = _held(max_batch_size=1)
    with batcher, ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.submit, "blocker")
        _wait_running(batcher)
        futures = []
        for name, priority in [("a2", 2), ("b2", 2), ("c1", 1), ("d3", 3), ("e1", 1)]:
            futures.append(pool.submit(batcher.submit, name, priority=priority))
            _wait_depth(batcher, len(futures))
        release.set()
        assert [f.result(timeout=5) for f in futures] == ["a2", "b2", "c1", "d3", "e1"]
        assert first.result(timeout=5) == "blocker"
    assert [c[0] for c in calls] == ["blocker", "c1", "e1", "a2", "b2", "d3"]


def test_a_low_priority_item_is_served_within_the_starvation_bound() -> None:
    seen: list[str] = []
    gate = threading.Event()

    def fn(batch: list[str]) -> list[str]:
        gate.wait()
        seen.extend(batch)
        return batch

    batcher = sk.Batcher(fn, max_batch_size=1, starvation_bound=3)
    with batcher, ThreadPoolExecutor(16) as pool:
        blocker = pool.submit(batcher.submit, "blocker")
        _wait_running(batcher)
        low = pool.submit(batcher.submit, "low", priority=9)
        _wait_depth(batcher, 1)
        highs = [pool.submit(batcher.submit, f"h{i}", priority=0) for i in range(10)]
        _wait_depth(batcher, 11)
        gate.set()
        assert low.result(timeout=5) == "low"
        assert blocker.result(timeout=5) == "blocker"
        for f in highs:
            f.result(timeout=5)
    # blocker, then at most starvation_bound high-priority batches before "low".
    assert seen.index("low") <= 1 + 3 + 1


def test_items_share_a_batch_only_with_their_group() -> None:
    batcher, release, calls = _held(group_key=lambda x: x[0])
    with batcher, ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(batcher.submit, ("z", 0))
        _wait_running(batcher)
        items = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
        futures = []
        for item in items:  # one at a time: queued in this order
            futures.append(pool.submit(batcher.submit, item))
            _wait_depth(batcher, len(futures))
        release.set()
        assert [f.result(timeout=5) for f in futures] == items
        blocker.result(timeout=5)
    assert calls[1:] == [[("a", 1), ("a", 2), ("a", 3)], [("b", 1), ("b", 2)]]


def test_size_fn_bounds_batches_by_cost_and_refuses_an_item_over_budget() -> None:
    batcher, release, calls = _held(max_batch_size=10, size_fn=len)
    with batcher, ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(batcher.submit, "x")
        _wait_running(batcher)
        words = ["aaaa", "bbbb", "cccc", "dd", "eeeeee"]
        futures = []
        for word in words:  # one at a time: queued in this order
            futures.append(pool.submit(batcher.submit, word))
            _wait_depth(batcher, len(futures))
        release.set()
        assert [f.result(timeout=5) for f in futures] == words
        blocker.result(timeout=5)
        with pytest.raises(sk.InvalidInput, match="budget"):
            batcher.submit("k" * 11)
    assert all(sum(map(len, c)) <= 10 for c in calls)
    assert calls[1:] == [["aaaa", "bbbb"], ["cccc", "dd"], ["eeeeee"]]


def test_bq12_a_lone_item_waits_at_most_max_wait_for_company() -> None:
    with sk.Batcher(lambda b: b, max_wait_s=0.01, wait_for_full=True) as batcher:
        started = time.monotonic()
        assert batcher.submit(1) == 1
        assert time.monotonic() - started < 0.01 + 0.5  # generous: the machine is shared


@pytest.mark.parametrize("backend", [sk.Inline, lambda: sk.Threads(2)])
def test_predictor_with_a_batcher_batches_concurrent_callers(backend: Any) -> None:
    model = sk.testing.Slow(0.02)
    with sk.Predictor(model, backend=backend(), batcher=sk.Batcher(max_batch_size=8)) as p:
        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(p.predict, range(64))) == list(range(64))
        assert p.batcher is not None
        stats = p.batcher.statistics()
        assert stats.items == 64 and stats.mean_batch_size > 1
        assert max(len(c) for c in model.calls) <= 8
        assert p.statistics().succeeded == 64


def test_predictor_batcher_slots_follow_the_back_end() -> None:
    batcher = sk.Batcher()
    with sk.Predictor(lambda b: b, backend=sk.Threads(3), batcher=batcher):
        assert batcher.max_concurrent_batches == 3
    with pytest.raises(ValueError, match="already batches"):
        sk.Predictor(lambda b: b, batcher=batcher)


@pytest.mark.anyio
async def test_predictor_with_a_batcher_on_both_loops() -> None:
    model = sk.testing.FailOn({5}, mode="raise")
    async with sk.Predictor(model, batcher=sk.Batcher(max_batch_size=16)) as p:
        out = await p.apredict_many(range(10), return_exceptions=True)
        assert out[:5] == [0, 1, 2, 3, 4] and out[6:] == [6, 7, 8, 9]
        assert isinstance(out[5], sk.ModelError)
        assert await p.apredict(3, priority=1) == 3


def test_bq02_wrong_output_count_fails_every_caller_of_the_batch_then_recovers() -> None:
    short = threading.Event()
    release = threading.Event()

    def fn(batch: list[int]) -> list[int]:
        release.wait()
        return batch[:-1] if short.is_set() and len(batch) > 1 else batch

    with sk.Batcher(fn, max_batch_size=8) as batcher, ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(batcher.submit, -1)
        _wait_running(batcher)
        short.set()
        futures = [pool.submit(batcher.submit, i) for i in range(4)]
        _wait_depth(batcher, 4)
        release.set()
        assert blocker.result(timeout=5) == -1
        for future in futures:
            with pytest.raises(sk.BatchContractError, match="3 outputs for a batch of 4"):
                future.result(timeout=5)
        short.clear()
        assert batcher.submit(7) == 7


def test_bq08_a_timeout_above_the_maximum_is_cut_to_it() -> None:
    batcher, release, calls = _held(max_timeout_s=0.05)
    with batcher, ThreadPoolExecutor(2) as pool:
        try:
            pool.submit(batcher.submit, "blocker")
            _wait_running(batcher)
            started = time.monotonic()
            with pytest.raises(sk.DeadlineExceeded):
                batcher.submit("asks for an hour", timeout_s=3600)
            with pytest.raises(sk.DeadlineExceeded):
                batcher.submit("asks for nothing")
            assert time.monotonic() - started < 2 * 0.05 + 1.0
        finally:
            release.set()
    assert ["asks for an hour"] not in calls


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), slots=st.integers(1, 3))
def test_bq03_ten_thousand_concurrent_requests_each_get_their_own_answer(
    seed: int, slots: int
) -> None:
    import asyncio
    import random

    rng = random.Random(seed)
    sizes = [rng.randint(1, 5) for _ in range(10_000)]
    delays = [rng.random() * 0.002 for _ in range(10_000)]
    batch_sizes: list[int] = []

    def identity(batch: list[list[int]]) -> list[list[int]]:
        batch_sizes.append(len(batch))
        return [list(x) for x in batch]

    async def main(batcher: Batcher[Any, Any]) -> list[Any]:
        async def one(i: int) -> Any:
            await asyncio.sleep(delays[i])
            return await batcher.asubmit([i] * sizes[i])

        return await asyncio.gather(*(one(i) for i in range(10_000)))

    batcher = sk.Batcher(
        identity, max_batch_size=32, max_queue=10_000, max_concurrent_batches=slots
    )
    with batcher:
        results = asyncio.run(main(batcher))
    assert results == [[i] * sizes[i] for i in range(10_000)]
    assert sum(batch_sizes) == 10_000 and max(batch_sizes) <= 32
    assert batcher.statistics().succeeded == 10_000


# -- collation ------------------------------------------------------------------------


def test_stack_collation_gives_the_function_one_array_and_splits_rows_back() -> None:
    import numpy as np

    shapes: list[tuple[int, ...]] = []

    def double(batch: Any) -> Any:
        shapes.append(batch.shape)
        return batch * 2

    with (
        sk.Batcher(double, collate=sk.Stack(), max_batch_size=8) as b,
        ThreadPoolExecutor(8) as pool,
    ):
        items = [np.full(3, i, dtype=np.float32) for i in range(6)] + [np.zeros(5)]
        outs = list(pool.map(b.submit, items))
    for item, out in zip(items, outs, strict=True):
        np.testing.assert_array_equal(out, item * 2)
    # Arrays of another shape never share a batch with these.
    assert all(s[1:] in {(3,), (5,)} for s in shapes)


@pytest.mark.parametrize("backend", [sk.Inline, lambda: sk.Threads(2), lambda: sk.Processes(1)])
def test_predictor_collates_where_the_model_runs(backend: Any) -> None:
    import numpy as np

    class Lengths(sk.Model[Any, Any]):
        def predict(self, batch: sk.PaddedBatch) -> Any:
            assert isinstance(batch, sk.PaddedBatch)
            return batch.data + batch.lengths[:, None]

    batcher = sk.Batcher(max_batch_size=4, collate=sk.Pad())
    with sk.Predictor(Lengths(), backend=backend(), batcher=batcher) as p:
        items = [np.arange(n, dtype=np.int64) for n in (1, 3, 2, 4, 0)]
        outs = p.predict_many(items)
    for item, out in zip(items, outs, strict=True):
        np.testing.assert_array_equal(out, item + len(item))


def test_statistics_report_batch_sizes_waits_run_times_and_utilisation() -> None:
    def slow(batch: list[int]) -> list[int]:
        time.sleep(0.01)
        return batch

    with sk.Batcher(slow, max_batch_size=4) as batcher, ThreadPoolExecutor(8) as pool:
        assert list(pool.map(batcher.submit, range(20))) == list(range(20))
        stats = batcher.statistics()
    assert sum(size * count for size, count in stats.batch_sizes.items()) == 20
    assert max(stats.batch_sizes) <= 4
    assert sum(stats.batch_sizes.values()) == stats.batches
    assert stats.run_time.count == stats.batches and stats.run_time.p50_s >= 0.01
    assert stats.queue_wait.count == 20 and stats.queue_wait.max_s >= 0.0
    assert 0.0 < stats.utilisation <= 1.0
    with pytest.raises(TypeError):
        stats.batch_sizes[1] = 5  # type: ignore[index]


@pytest.mark.anyio
async def test_bq11_cancel_during_execution_is_visible_to_the_batch_function() -> None:
    entered = threading.Event()
    release = threading.Event()
    seen: dict[str, bool] = {}

    def fn(batch: list[str]) -> list[str]:
        entered.set()
        release.wait()
        seen.update({x: sk.is_cancelled(x) for x in batch})
        return [x.upper() for x in batch]

    async with sk.Batcher(fn, max_batch_size=8, wait_for_full=True, max_wait_s=0.05) as b:
        results: dict[str, str] = {}

        async def keep(x: str) -> None:
            results[x] = await b.asubmit(x)

        scopes: list[anyio.CancelScope] = []
        left: list[bool] = []

        async def leaver() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await b.asubmit("gone")
            left.append(True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep, "kept")
            tg.start_soon(keep, "other")
            tg.start_soon(leaver)
            while not entered.is_set():
                await anyio.sleep(0.001)
            scopes[0].cancel()  # the caller of "gone" leaves while its batch runs
            await anyio.sleep(0.01)
            assert left == [True]  # resolved at once, while its batch still runs
            release.set()
    assert seen == {"kept": False, "other": False, "gone": True}
    assert results == {"kept": "KEPT", "other": "OTHER"}
    assert sk.is_cancelled("gone") is False  # outside a batch: nothing to ask about


def test_caller_threads_of_a_batch_are_all_woken_even_if_one_left() -> None:
    # The batch forms when its seventh item comes (a full batch), however slow the
    # machine is to start the callers.
    batcher, release, calls = _held(max_batch_size=7, wait_for_full=True, max_wait_s=WAIT_S)
    with batcher, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batcher.submit, i) for i in range(3)]
        leaver = pool.submit(batcher.submit, "leaves", timeout_s=1.0)
        futures += [pool.submit(batcher.submit, i) for i in range(3, 6)]
        _wait_running(batcher)
        with pytest.raises(sk.DeadlineExceeded):
            leaver.result(timeout=5)  # its batch is running; it leaves at its deadline
        release.set()
        assert [f.result(timeout=5) for f in futures] == list(range(6))
    assert sorted(map(str, calls[0])) == sorted(map(str, [*range(6), "leaves"]))


def test_a_caller_thread_interrupted_while_its_batch_runs_leaves_and_the_rest_are_woken(
    interrupt: Any,
) -> None:
    # A signal handler that raises (Ctrl-C's KeyboardInterrupt) interrupts the main
    # thread's wait: it gives its item up, and the other callers of the batch, which
    # the interrupted caller would have woken in turn, still get their results. The
    # batch forms when its fourth item comes, however slow the machine is to start the
    # callers (max_wait_s is what the lone "after" waits for).
    batcher, release, calls = _held(max_batch_size=4, wait_for_full=True, max_wait_s=1.0)
    with batcher, ThreadPoolExecutor(4) as pool:

        def others_then_interrupt() -> list[Future[Any]]:
            _wait_depth(batcher, 1)  # the main thread's item heads the queue
            futures = [pool.submit(batcher.submit, i) for i in range(3)]
            _wait_running(batcher)
            interrupt()
            return futures

        helper = pool.submit(others_then_interrupt)
        with pytest.raises(interrupt.error):
            batcher.submit("interrupted")
        futures = helper.result(timeout=WAIT_S)
        release.set()
        assert [f.result(timeout=WAIT_S) for f in futures] == [0, 1, 2]
        assert batcher.submit("after") == "after"
        stats = batcher.statistics()
    assert calls[0][0] == "interrupted" and sorted(calls[0][1:]) == [0, 1, 2]
    assert stats.cancelled == 1
    assert stats.succeeded == 4  # 0, 1, 2 and "after": the interrupted item's result dropped


def test_a_caller_thread_interrupted_after_its_result_came_still_wakes_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The interruption lands just as the caller is woken: its record was settled and
    # linked to the next caller thread of the batch, whom it must wake on its way out.
    class Raised(Exception):
        pass

    class InterruptedOnWaking(_batcher.SyncWaiter):
        def wait(self, timeout_s: float | None) -> bool:
            woken = super().wait(timeout_s)
            if threading.current_thread().name == "interrupted":
                raise Raised
            return woken

    monkeypatch.setattr(_batcher, "SyncWaiter", InterruptedOnWaking)  # made by submit
    monkeypatch.setattr(_batch_slots, "SyncWaiter", InterruptedOnWaking)  # chained by the slot
    # The batch forms when its seventh item comes, however slow the callers start.
    batcher, release, calls = _held(max_batch_size=7, wait_for_full=True, max_wait_s=WAIT_S)
    with batcher, ThreadPoolExecutor(8) as pool:
        futures = []
        for i in range(3):
            futures.append(pool.submit(batcher.submit, i))
            _wait_depth(batcher, i + 1)
        raised: list[BaseException] = []

        def interrupted() -> None:
            try:
                batcher.submit("interrupted")
            except Raised as exc:
                raised.append(exc)

        thread = threading.Thread(target=interrupted, name="interrupted")
        thread.start()
        _wait_depth(batcher, 4)
        futures += [pool.submit(batcher.submit, i) for i in range(3, 6)]
        _wait_running(batcher)
        release.set()
        assert [f.result(timeout=WAIT_S) for f in futures] == list(range(6))
        thread.join(WAIT_S)
        assert len(raised) == 1
    assert calls[0] == [0, 1, 2, "interrupted", 3, 4, 5]


# -- a lone item runs on its caller's thread --------------------------------------------


def _where(batch: list[Any]) -> list[Any]:
    return [threading.current_thread().name for _ in batch]


def test_a_lone_sync_caller_runs_its_batch_on_its_own_thread() -> None:
    with sk.Batcher(_where) as batcher:
        assert batcher.submit(1) == threading.current_thread().name
        stats = batcher.statistics()
        assert (stats.batches, stats.items, stats.succeeded) == (1, 1, 1)
    with sk.Batcher(_where, inline_max_s=0) as batcher:  # turned off: a slot runs it
        assert batcher.submit(1).startswith("servekit-batcher-")


def test_while_a_caller_runs_its_own_batch_others_queue_and_a_slot_takes_them() -> None:
    entered = threading.Event()
    release = threading.Event()
    ran_on: dict[str, str] = {}

    def fn(batch: list[str]) -> list[str]:
        if "first" in batch:
            entered.set()
            release.wait()
        ran_on.update({x: threading.current_thread().name for x in batch})
        return batch

    with sk.Batcher(fn, max_batch_size=8) as batcher, ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, "first")
        assert entered.wait(5)
        assert batcher.statistics().running_batches == 1  # the caller holds the one slot
        later = [pool.submit(batcher.submit, f"later{i}") for i in range(3)]
        _wait_depth(batcher, 3)  # queued: no second batch while the slot is held
        release.set()
        assert first.result(timeout=5) == "first"
        assert [f.result(timeout=5) for f in later] == ["later0", "later1", "later2"]
    assert ran_on["first"] != ran_on["later0"]
    assert ran_on["later0"].startswith("servekit-batcher-")


@pytest.mark.anyio
async def test_an_event_loop_runs_a_lone_item_only_for_a_fast_model() -> None:
    loop_thread = threading.current_thread().name
    async with sk.Batcher(_where) as fast:
        first = await fast.asubmit(1)  # no batch timed yet: a slot runs it
        assert first.startswith("servekit-batcher-")
        assert await fast.asubmit(2) == loop_thread  # fast and idle: run right here

    def slow(batch: list[Any]) -> list[Any]:
        time.sleep(0.005)  # above inline_max_s: never held on the loop
        return _where(batch)

    async with sk.Batcher(slow) as batcher:
        for i in range(3):
            assert (await batcher.asubmit(i)).startswith("servekit-batcher-")


@pytest.mark.anyio
async def test_a_predictor_on_threads_never_runs_a_batch_on_the_loop() -> None:
    def where(batch: list[int]) -> list[str]:
        return _where(batch)

    loop_thread = threading.current_thread().name
    batcher = sk.Batcher()
    async with sk.Predictor(where, backend=sk.Threads(1), batcher=batcher) as p:
        for i in range(5):
            assert await p.apredict(i) != loop_thread


# -- where batches run: the loop slot -----------------------------------------------------


def _thread_logging(fn: Callable[[Any], Any]) -> tuple[Callable[[list[Any]], list[Any]], list[int]]:
    """A batch function applying ``fn`` per item that logs the thread of every call."""
    threads: list[int] = []

    def batch_fn(xs: list[Any]) -> list[Any]:
        threads.append(threading.get_ident())
        return [fn(x) for x in xs]

    return batch_fn, threads


def test_cheap_batches_of_asyncio_callers_run_on_their_loop() -> None:
    # A batch far cheaper than a thread hand-off runs on the callers' loop, and items
    # still gather into batches there (the woken callers queue again in between).
    import asyncio

    fn, threads = _thread_logging(lambda x: x + 1)

    async def main() -> tuple[int, list[int]]:
        async def client(i: int) -> list[int]:
            return [await b.asubmit(i * 1000 + k) for k in range(20)]

        got = await asyncio.gather(*(client(i) for i in range(64)))
        return threading.get_ident(), [x for g in got for x in g]

    with Batcher(fn, max_batch_size=16) as b:
        loop_thread, got = asyncio.run(main())
        stats = b.statistics()
    assert sorted(got) == sorted(i * 1000 + k + 1 for i in range(64) for k in range(20))
    # Timing decides the mode (a preempted batch may count as slow), so not every batch
    # need run on the loop; most must.
    assert threads.count(loop_thread) > len(threads) // 2
    assert stats.items / stats.batches > 4


def test_slow_batches_run_on_slot_threads() -> None:
    import asyncio

    def slow(x: int) -> int:
        time.sleep(0.002)  # far above the loop slot's bound of 50 µs per batch
        return x + 1

    fn, threads = _thread_logging(slow)

    async def main() -> tuple[int, list[int]]:
        got = await asyncio.gather(*(b.asubmit(i) for i in range(200)))
        return threading.get_ident(), list(got)

    with Batcher(fn, max_batch_size=8) as b:
        loop_thread, got = asyncio.run(main())
    assert got == [i + 1 for i in range(200)]
    # The first batch may run on the loop (nothing was timed yet); none after it.
    assert loop_thread not in threads[1:]


def test_loop_slot_serves_two_loops_and_caller_threads_at_once() -> None:
    # Each loop drains on itself; items of another loop or of caller threads queued
    # meanwhile are taken by whichever runs next and woken on their own loop or thread.
    import asyncio

    fn, _ = _thread_logging(lambda x: x * 3)
    results: dict[str, list[int]] = {}

    def loop_caller(name: str, base: int) -> None:
        async def main() -> list[int]:
            async def client(i: int) -> list[int]:
                return [await b.asubmit(base + i * 100 + k) for k in range(30)]

            got = await asyncio.gather(*(client(i) for i in range(32)))
            return [x for g in got for x in g]

        results[name] = asyncio.run(main())

    def thread_caller(name: str, base: int) -> None:
        results[name] = [b.submit(base + k) for k in range(200)]

    with Batcher(fn, max_batch_size=16, max_concurrent_batches=2) as b:
        workers = [
            threading.Thread(target=loop_caller, args=("a", 0)),
            threading.Thread(target=loop_caller, args=("b", 10_000)),
            threading.Thread(target=thread_caller, args=("c", 20_000)),
            threading.Thread(target=thread_caller, args=("d", 30_000)),
        ]
        run_callers(workers)
    for name, base in (("a", 0), ("b", 10_000)):
        assert results[name] == [3 * (base + i * 100 + k) for i in range(32) for k in range(30)]
    for name, base in (("c", 20_000), ("d", 30_000)):
        assert results[name] == [3 * (base + k) for k in range(200)]


def test_a_cancelled_caller_on_the_loop_slot_leaves_the_others_their_answers() -> None:
    import asyncio

    seen: list[int] = []

    def fn(xs: list[int]) -> list[int]:
        seen.extend(xs)
        return [-x for x in xs]

    async def main() -> list[int]:
        tasks = [asyncio.ensure_future(b.asubmit(i)) for i in range(100)]
        await asyncio.sleep(0)  # every task has queued its item; no batch has run yet
        assert b.statistics().queue_depth == 100
        tasks[7].cancel()
        tasks[50].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[7], asyncio.CancelledError)
        assert isinstance(done[50], asyncio.CancelledError)
        return [x for i, x in enumerate(done) if i not in (7, 50)]

    with Batcher(fn, max_batch_size=16) as b:
        b.submit(0)  # one batch timed: cheap, so the loop slot serves the asyncio callers
        seen.clear()
        # The slot thread parked first: one still starting up takes whatever is queued
        # when it first looks (correct, but this test needs every item queued at once).
        wait_until(lambda: b._waiting == 1)
        got = asyncio.run(main())
        stats = b.statistics()
    assert got == [-i for i in range(100) if i not in (7, 50)]
    assert sorted(seen) == [i for i in range(100) if i not in (7, 50)]
    assert stats.queue_depth == 0
    assert stats.cancelled == 2


# -- Stack collated at submission ---------------------------------------------------------


def test_stacked_at_submission_every_caller_gets_its_own_row() -> None:
    # The model returns its batch itself (rows are views of the batcher's buffers) and
    # mutates it first: later items written to the same buffers must never show through.
    import asyncio

    import numpy as np

    batches: list[np.ndarray] = []

    def fn(batch: np.ndarray) -> np.ndarray:
        batches.append(batch)
        batch += 1  # in place, on the batch the model was given
        return batch

    async def main() -> list[list[float]]:
        async def client(i: int) -> list[np.ndarray]:
            return [await b.asubmit(np.full(3, 100.0 * i + k, np.float32)) for k in range(40)]

        got = await asyncio.gather(*(client(i) for i in range(48)))
        return [[float(row[0]) for row in rows] for rows in got]

    with Batcher(fn, collate=sk.Stack(), max_batch_size=16) as b:
        got = asyncio.run(main())
    assert got == [[100.0 * i + k + 1 for k in range(40)] for i in range(48)]
    assert all(batch.dtype == np.float32 and batch.shape[1:] == (3,) for batch in batches)
    # Most batches were views of a buffer (no copy on the slot), not all are required.
    assert sum(batch.base is not None for batch in batches) > len(batches) // 2


def test_stacked_at_submission_keeps_shapes_apart_casts_and_isolates_a_bad_item() -> None:
    import asyncio

    import numpy as np

    def fn(batch: np.ndarray) -> list[object]:
        out: list[object] = []
        for row in batch:
            out.append(ValueError("negative") if row[0] < 0 else float(row.sum()))
        return out

    async def main() -> list[object]:
        items: list[np.ndarray] = []
        for i in range(60):
            if i % 5 == 0:
                items.append(np.full(4, float(i)))  # float64: cast to float32, not stacked early
            elif i % 7 == 0:
                items.append(np.full(2, float(i), np.float32))  # another shape: its own batches
            elif i == 13:
                items.append(np.full(3, -1.0, np.float32))  # fails alone
            else:
                items.append(np.full(3, float(i), np.float32))
        return list(await asyncio.gather(*(b.asubmit(x) for x in items), return_exceptions=True))

    with Batcher(fn, collate=sk.Stack(dtype="float32"), max_batch_size=8) as b:
        b.submit(np.zeros(3, np.float32))  # the first array sets the stacked shape
        got = asyncio.run(main())
    for i, value in enumerate(got):
        if i == 13:
            assert isinstance(value, sk.ModelError)
        elif i % 5 == 0:
            assert value == 4.0 * i
        elif i % 7 == 0:
            assert value == 2.0 * i
        else:
            assert value == 3.0 * i


@pytest.mark.parametrize("output", ["short", "objects", "scalar"])
def test_stacked_at_submission_outputs_that_are_not_one_row_per_item(output: str) -> None:
    # An array of one row per item is handed back as it is (its rows are the outputs);
    # anything else is checked as ever: a wrong count fails the batch naming both counts,
    # an exception in an object array fails only its item.
    import asyncio

    import numpy as np

    def fn(batch: np.ndarray) -> object:
        if output == "short":
            return batch[:-1] * 2
        if output == "scalar":
            return np.asarray(batch.sum())  # 0-d
        out = np.empty(len(batch), dtype=object)
        for i, row in enumerate(batch):
            out[i] = ValueError("negative") if row[0] < 0 else float(row[0])
        return out

    async def main() -> list[object]:
        with contextlib.suppress(sk.BatchContractError):
            await b.asubmit(np.zeros(2, np.float32))  # sets the shape stacked at submission
        items = [np.full(2, -1.0 if i == 5 else float(i), np.float32) for i in range(16)]
        return list(await asyncio.gather(*(b.asubmit(x) for x in items), return_exceptions=True))

    # inline_max_s=0: no item runs alone on the loop, so every one is stacked as it queues.
    with Batcher(fn, collate=sk.Stack(), max_batch_size=16, inline_max_s=0) as b:
        got = asyncio.run(main())
    if output == "objects":
        assert isinstance(got[5], sk.ModelError)
        assert isinstance(got[5].__cause__, ValueError)
        assert [value for i, value in enumerate(got) if i != 5] == [
            float(i) for i in range(16) if i != 5
        ]
        return
    assert all(isinstance(value, sk.BatchContractError) for value in got)
    if output == "short":  # whatever batches formed, each was answered one row short
        for value in got:
            counts = re.search(r"returned (\d+) outputs for a batch of (\d+) inputs", str(value))
            assert counts is not None
            assert int(counts[1]) == int(counts[2]) - 1


def test_stacked_at_submission_a_cancelled_item_leaves_a_hole_that_is_not_sent() -> None:
    import asyncio

    import numpy as np

    # The slot is held busy by a blocker's batch while the 40 items are queued and two
    # of them cancelled: an idle slot would take the first items as they arrive, and a
    # cancelled item already in a running batch is sent (its result dropped), which is
    # the other half of the contract and not what this test is about.
    seen: list[float] = []
    running = threading.Event()
    release = threading.Event()

    def fn(batch: np.ndarray) -> np.ndarray:
        if batch[0, 0] < 0:
            running.set()
            release.wait(WAIT_S)
        else:
            seen.extend(float(row[0]) for row in batch)
        return batch * 2

    async def main() -> list[float]:
        tasks = [
            asyncio.ensure_future(b.asubmit(np.full(2, float(i), np.float32))) for i in range(40)
        ]
        await asyncio.sleep(0)  # all queued, in consecutive buffer rows
        tasks[3].cancel()
        tasks[20].cancel()
        release.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return [float(x[0]) for i, x in enumerate(done) if i not in (3, 20)]

    with Batcher(fn, collate=sk.Stack(), max_batch_size=16) as b:
        b.submit(np.zeros(2, np.float32))
        seen.clear()
        blocker = threading.Thread(target=b.submit, args=(np.full(2, -1.0, np.float32),))
        blocker.start()
        assert running.wait(WAIT_S)
        got = asyncio.run(main())
        blocker.join(WAIT_S)
    assert got == [2.0 * i for i in range(40) if i not in (3, 20)]
    assert sorted(seen) == [float(i) for i in range(40) if i not in (3, 20)]


def test_caller_threads_on_a_stacking_batcher_share_batches_and_get_their_own_rows() -> None:
    # Caller threads' arrays of the stacked shape take submit's inlined path; arrays of
    # another dtype (cast) or shape, and another priority level, take the general one.
    # All share the queue, and each caller gets its own row back.
    import numpy as np

    gate = threading.Event()
    gate.set()
    batches: list[tuple[int, ...]] = []

    def fn(batch: np.ndarray) -> np.ndarray:
        gate.wait(WAIT_S)
        batches.append(batch.shape)
        return batch * 2

    def item(i: int) -> np.ndarray:
        if i % 9 == 0:
            return np.full(3, float(i))  # float64: cast at formation
        if i % 11 == 0:
            return np.full(2, float(i), np.float32)  # another shape: its own batches
        return np.full(3, float(i), np.float32)

    with (
        Batcher(fn, collate=sk.Stack(dtype="float32"), max_batch_size=8) as b,
        ThreadPoolExecutor(16) as pool,
    ):
        b.submit(np.zeros(3, np.float32))  # runs alone; sets the stacked shape
        gate.clear()
        first = pool.submit(b.submit, np.full(3, -1.0, np.float32))  # holds the slot
        wait_until(lambda: b.statistics().running_batches == 1)
        futures = [
            pool.submit(b.submit, item(i), priority=1 if i % 13 == 0 else 0) for i in range(64)
        ]
        wait_until(lambda: b.statistics().queue_depth == 15)  # every other pool thread waits
        gate.set()
        got = [f.result(WAIT_S) for f in futures]
        np.testing.assert_array_equal(first.result(WAIT_S), np.full(3, -2.0))
    for i, out in enumerate(got):
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, 2 * item(i).astype(np.float32))
    assert all(shape[1:] in {(3,), (2,)} for shape in batches)
    assert max(shape[0] for shape in batches) > 1


def test_stacked_at_submission_two_loops_threads_and_deadlines_share_one_queue() -> None:
    # Records queued by asubmit's hot path on one loop form batches with no check per
    # record (Pending.odd); a second loop's records, caller threads' and items with a
    # deadline queued among them are odd and take the checked formation. Batches mix
    # both kinds, and two priority levels leave holes in each other's buffer rows;
    # each caller gets its own row, and the odd count goes back to 0.
    import asyncio

    import numpy as np

    def fn(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.0005)  # too slow for the loop slot: batches run on the slot thread
        return batch * 2

    results: dict[str, list[float]] = {}

    def loop_caller(name: str, base: float) -> None:
        async def client(i: int) -> list[float]:
            out = []
            for k in range(20):
                x = np.full(3, base + 100 * i + k, np.float32)
                timeout_s = 30.0 if k % 7 == 3 else None  # a deadline: not plain
                priority = i % 2  # level 1 exists: plain records go there too
                out.append(float((await b.asubmit(x, timeout_s=timeout_s, priority=priority))[0]))
            return out

        async def main() -> list[float]:
            got = await asyncio.gather(*(client(i) for i in range(24)))
            return [x for rows in got for x in rows]

        results[name] = asyncio.run(main())

    def thread_caller(name: str, base: float) -> None:
        results[name] = [float(b.submit(np.full(3, base + k, np.float32))[0]) for k in range(60)]

    with Batcher(fn, collate=sk.Stack(), max_batch_size=16) as b:
        b.submit(np.zeros(3, np.float32))  # runs alone; sets the stacked shape
        b.submit(np.zeros(3, np.float32), priority=1)  # makes level 1
        workers = [
            threading.Thread(target=loop_caller, args=("a", 0.0)),
            threading.Thread(target=loop_caller, args=("b", 10_000.0)),
            threading.Thread(target=thread_caller, args=("c", 20_000.0)),
        ]
        run_callers(workers)
        stats = b.statistics()
        assert (b._depth, b._odd) == (0, 0)  # the counters of the invariants, back to 0
    for name, base in (("a", 0.0), ("b", 10_000.0)):
        assert results[name] == [2 * (base + 100 * i + k) for i in range(24) for k in range(20)]
    assert results["c"] == [2 * (20_000.0 + k) for k in range(60)]
    assert stats.succeeded == 2 + 2 * 24 * 20 + 60
    assert stats.mean_batch_size > 2


def test_stacked_at_submission_records_turn_plain_while_only_odd_ones_are_queued() -> None:
    # Under a load that never lets the queue empty, asubmit's hot-path records become
    # plain (formed with no check per record, Pending.odd) as soon as every queued
    # record is odd; they used to wait for an empty queue, and stayed odd for good.
    import asyncio

    import numpy as np

    fn = GatedDouble()
    gate, entered = fn.gate, fn.entered

    async def main() -> list[float]:
        odd = asyncio.ensure_future(b.asubmit(np.full(3, 1.0, np.float32), timeout_s=30.0))
        while b._depth < 1:  # a deadline: the general path, an odd record
            await asyncio.sleep(0.001)
        plain = [asyncio.ensure_future(b.asubmit(np.full(3, k, np.float32))) for k in range(2, 8)]
        while b._depth < 7:
            await asyncio.sleep(0.001)
        counts.append((b._depth, b._odd))
        gate.set()
        return [float(out[0]) for out in await asyncio.gather(odd, *plain)]

    counts: list[tuple[int, int]] = []
    with Batcher(fn, collate=sk.Stack(), max_batch_size=4) as b:
        b.submit(np.zeros(3, np.float32))  # runs alone; sets the stacked shape
        gate.clear()
        entered.clear()
        blocker = threading.Thread(target=b.submit, args=(np.zeros(3, np.float32),))
        blocker.start()  # runs alone on its thread, held by the gate: the queue fills
        assert entered.wait(WAIT_S)
        got = asyncio.run(main())
        blocker.join(WAIT_S)
        assert (b._depth, b._odd) == (0, 0)
    assert counts == [(7, 1)]  # only the record with a deadline is odd
    assert got == [2.0 * k for k in range(1, 8)]


def test_caller_threads_records_are_plain_until_a_loops_or_a_deadline_joins_them() -> None:
    # submit's hot-path records (no deadline, an array of the stacked shape) are plain
    # when every queued record is odd: batches of caller threads are formed with no
    # check per record and stacked at formation (they have no buffer rows). A loop's
    # record and one with a deadline queued behind them are odd; everyone gets their
    # own row, alone in a batch or together.
    import asyncio

    import numpy as np

    fn = GatedDouble()
    gate, entered = fn.gate, fn.entered

    def item(k: int) -> np.ndarray:
        return np.full(3, float(k), np.float32)

    got: dict[int, float] = {}

    def call(k: int, timeout_s: float | None = None) -> None:
        got[k] = float(b.submit(item(k), timeout_s=timeout_s)[0])

    def on_loop(k: int) -> None:
        async def main() -> None:
            got[k] = float((await b.asubmit(item(k)))[0])

        asyncio.run(main())

    def hold(k: int) -> threading.Thread:
        """A caller running alone on its own thread, held by the gate: the queue fills."""
        gate.clear()
        entered.clear()
        blocker = threading.Thread(target=call, args=(k,))
        blocker.start()
        assert entered.wait(WAIT_S)
        return blocker

    def start(target: Callable[..., None], *args: Any) -> threading.Thread:
        depth = b._depth
        thread = threading.Thread(target=target, args=args)
        thread.start()
        wait_until(lambda: b._depth == depth + 1)  # queued in this order
        return thread

    counts = []
    with Batcher(fn, collate=sk.Stack(), max_batch_size=4) as b:
        b.submit(item(0))  # runs alone; sets the stacked shape
        blocker = hold(1)
        callers = [start(call, k) for k in range(2, 7)]
        counts.append((b._depth, b._odd, b._plain_loop is CALLER_THREADS))
        gate.set()
        join_callers([blocker, *callers])  # 2-5 (checked: 2 is odd), then 6 (plain)
        blocker = hold(11)
        callers = [start(call, 12), start(call, 13), start(call, 14, 30.0), start(on_loop, 15)]
        counts.append((b._depth, b._odd, b._plain_loop is CALLER_THREADS))
        gate.set()
        join_callers([blocker, *callers])  # 12-15: a checked batch
        assert (b._depth, b._odd) == (0, 0)
        stats = b.statistics()
    # Odd: the first record queued at level 0 (it makes the level: the general path),
    # and the records with a deadline and of a loop. (Before, every caller thread's
    # record was odd: (5, 5, False), (4, 3, False).)
    assert counts == [(5, 1, True), (4, 2, True)]
    assert got == {k: 2.0 * k for k in [*range(1, 7), *range(11, 16)]}
    assert stats.succeeded == 12
    assert stats.batches == 6  # 0, 1, 2-5, 6, 11, 12-15


def test_asubmit_from_loops_one_after_another_on_one_thread_and_then_trio() -> None:
    # asubmit knows the loop it found running last (no _get_running_loop call while
    # that loop runs). A finished loop's successor on the same thread, and a trio run
    # after it (no asyncio loop at all), must not be taken for it.
    import asyncio

    import numpy as np
    import trio

    def fn(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.0005)  # too slow for the loop slot: batches go to the slot thread
        return batch + 1

    async def callers(base: float) -> list[float]:
        async def one(k: int) -> float:
            return float((await b.asubmit(np.full(2, base + k, np.float32)))[0])

        return list(await asyncio.gather(*(one(k) for k in range(40))))

    async def trio_callers(base: float) -> list[float]:
        got: dict[int, float] = {}

        async def one(k: int) -> None:
            got[k] = float((await b.asubmit(np.full(2, base + k, np.float32)))[0])

        async with trio.open_nursery() as nursery:
            for k in range(40):
                nursery.start_soon(one, k)
        return [got[k] for k in range(40)]

    with Batcher(fn, collate=sk.Stack(), max_batch_size=8) as b:
        b.submit(np.zeros(2, np.float32), timeout_s=WAIT_S)  # sets the stacked shape
        first = asyncio.run(callers(0.0))
        second = asyncio.run(callers(1000.0))
        third = trio.run(trio_callers, 2000.0)
        fourth = asyncio.run(callers(3000.0))
        assert b.statistics().succeeded == 1 + 4 * 40
    for base, got in ((0.0, first), (1000.0, second), (2000.0, third), (3000.0, fourth)):
        assert got == [base + k + 1 for k in range(40)]


def test_stacked_at_submission_holes_in_the_rows_of_a_plain_batch() -> None:
    # One loop's hot-path records (no check per record at formation) in two priority
    # levels, so each level's rows have holes where the other's are, and two callers
    # cancelled while queued leave two more: each batch is made of the right rows.
    import asyncio

    import numpy as np

    gate = threading.Event()
    gate.set()
    seen: list[float] = []

    def fn(batch: np.ndarray) -> np.ndarray:
        gate.wait(WAIT_S)
        seen.extend(float(row[0]) for row in batch)
        return batch * 2

    def item(i: int) -> np.ndarray:
        return np.full(3, float(i), np.float32)

    async def main() -> list[Any]:
        tasks = [asyncio.ensure_future(b.asubmit(item(i), priority=i % 2)) for i in range(48)]
        await asyncio.sleep(0)  # all queued, behind the batch holding the slot
        assert b.statistics().queue_depth == 48
        tasks[6].cancel()
        tasks[31].cancel()
        await asyncio.sleep(0)  # the cancelled tasks give their records up
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    # inline_max_s=0: every batch runs on the slot thread, none on the loop.
    with (
        Batcher(fn, collate=sk.Stack(), max_batch_size=16, inline_max_s=0) as b,
        ThreadPoolExecutor(1) as pool,
    ):
        b.submit(item(-1))  # sets the stacked shape
        b.submit(item(-1), priority=1)  # makes level 1
        gate.clear()
        holder = pool.submit(b.submit, item(-2))
        wait_until(lambda: b.statistics().running_batches == 1)
        seen.clear()
        done = asyncio.run(main())
        np.testing.assert_array_equal(holder.result(WAIT_S), 2 * item(-2))
    for i, out in enumerate(done):
        if i in (6, 31):
            assert isinstance(out, asyncio.CancelledError)
        else:
            np.testing.assert_array_equal(out, 2 * item(i))
    assert seen[0] == -2.0
    # Level 0 first (strict priorities), in batches of 16 and the rest; then level 1.
    evens = [float(i) for i in range(0, 48, 2) if i != 6]
    odds = [float(i) for i in range(1, 48, 2) if i != 31]
    assert seen[1:] == evens + odds


def test_statistics_count_batches_settled_on_the_callers_loop() -> None:
    # Batches whose callers all await on one loop are counted there without the lock
    # (a tally folded every few batches); statistics() folds what is pending first.
    import asyncio

    def fn(xs: list[int]) -> list[Any]:
        time.sleep(0.0002)  # too slow for the loop slot: settled on the loop from a slot
        return [ValueError("bad") if x == 13 else x + 1 for x in xs]

    async def main() -> list[Any]:
        return await asyncio.gather(*(b.asubmit(i) for i in range(300)), return_exceptions=True)

    with Batcher(fn, max_batch_size=8) as b:
        b.submit(0)  # one batch timed
        got = asyncio.run(main())
        stats = b.statistics()
    assert [x for i, x in enumerate(got) if i != 13] == [i + 1 for i in range(300) if i != 13]
    assert isinstance(got[13], sk.ModelError)
    assert stats.items == 301
    assert stats.succeeded == 300 and stats.failed == 1
    assert sum(size * count for size, count in stats.batch_sizes.items()) == 301
    assert stats.batches == sum(stats.batch_sizes.values())
    assert stats.queue_wait.count == 301
    assert stats.run_time.count == stats.batches
