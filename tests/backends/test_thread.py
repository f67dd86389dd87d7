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
