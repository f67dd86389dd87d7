"""The thread back end under load: row EX-01 of the reliability catalog, and its queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import servekit as sk
from servekit.testing import Slow


class TenthFails(sk.Model[int, int]):
    def predict(self, batch: list[int]) -> list[Any]:
        return [KeyError(x) if x % 10 == 0 else x for x in batch]


def _ours() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("servekit-")]


def test_ex01_a_thousand_calls_with_one_in_ten_failing() -> None:
    with sk.Predictor(TenthFails(), backend=sk.Threads(4)) as p:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(p.predict, i) for i in range(1000)]
        failed = [i for i, f in enumerate(futures) if f.exception() is not None]
        assert failed == list(range(0, 1000, 10))
        for i, future in enumerate(futures):
            error = future.exception()
            if error is None:
                assert future.result() == i
            else:
                assert isinstance(error, sk.ModelError)
                assert isinstance(error.__cause__, KeyError)
        assert len(_ours()) == 4  # the pool kept its size
        assert p.predict(7) == 7
    assert _ours() == []


def test_a_full_thread_queue_rejects_at_once_with_a_retry_hint() -> None:
    release = threading.Event()
    model = Slow(release=release)
    with (
        sk.Predictor(model, backend=sk.Threads(1, max_queue=2)) as p,
        ThreadPoolExecutor(4) as pool,
    ):
        try:
            running = pool.submit(p.predict, "running")
            assert model.entered.wait(5)
            queued = [pool.submit(p.predict, f"q{i}") for i in range(2)]
            backend: Any = p.backend
            while len(backend._queue) < 2:  # both are waiting for the one thread
                time.sleep(0.001)
            with pytest.raises(sk.Overloaded) as info:
                p.predict("one too many")
            assert info.value.retry_after_s > 0
        finally:
            release.set()
        assert running.result(timeout=5) == "running"
        assert [f.result(timeout=5) for f in queued] == ["q0", "q1"]


class HangsUntilReleased(sk.Model[Any, Any]):
    """Blocks on a batch holding "hang" until ``release`` is set; echoes the others."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.returned: list[list[Any]] = []

    def predict(self, batch: list[Any]) -> list[Any]:
        if "hang" in batch:
            self.entered.set()
            self.release.wait()
            self.returned.append(list(batch))
        return list(batch)


def test_bq15_a_batch_past_batch_timeout_fails_on_time_and_marks_the_pool_unhealthy() -> None:
    model = HangsUntilReleased()
    backend = sk.Threads(2, batch_timeout_s=0.2)
    with sk.Predictor(model, backend=backend) as p, ThreadPoolExecutor(2) as pool:
        try:
            _a_stuck_batch_times_out(model, backend, p, pool)
        finally:
            model.release.set()  # never leave a thread inside the model
    assert model.returned == [["hang"]]


def _a_stuck_batch_times_out(
    model: HangsUntilReleased, backend: sk.Threads, p: sk.Predictor[Any, Any], pool: Any
) -> None:
    stuck = pool.submit(p.predict, "hang")
    assert model.entered.wait(5)
    with pytest.raises(sk.ExecutionTimeout) as info:
        stuck.result(timeout=10)
    error = info.value
    assert isinstance(error, TimeoutError) and error.code == "execution_timeout"
    assert error.exitcode is None
    assert "batch_timeout_s=0.2" in error.message
    assert not backend.healthy and not p.ready  # its thread is still inside
    assert p.predict("other") == "other"  # the other thread serves meanwhile
    model.release.set()  # the stuck batch returns; its result reaches nobody
    deadline = time.monotonic() + 10
    while not backend.healthy:
        assert time.monotonic() < deadline, "the pool never became healthy again"
        time.sleep(0.01)
    assert p.ready
    assert p.predict("after") == "after"


def test_batches_under_batch_timeout_are_untouched_and_close_stops_the_watchdog() -> None:
    backend = sk.Threads(2, batch_timeout_s=5.0)
    with sk.Predictor(Slow(delay_s=0.01), backend=backend) as p:
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(p.predict, range(20))) == list(range(20))
        assert backend.healthy
    assert not [t for t in threading.enumerate() if t.name.startswith("servekit-watchdog")]


def test_threads_batch_timeout_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_timeout_s"):
        sk.Threads(1, batch_timeout_s=-1.0)
