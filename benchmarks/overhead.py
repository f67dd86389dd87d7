"""Per-call overhead of ``Predictor.predict`` and ``apredict`` over calling a trivial model.

The model returns its batch unchanged, so whatever a call costs beyond ``ident([x])[0]``
is servekit's: admission and accounting, the hand-off to the back end, error isolation.

- sync: ``predict`` on ``Inline`` with ``validate=False`` vs ``ident([x])[0]``;
- async: ``await apredict`` vs ``ident([x])[0]``, both inside one running asyncio loop;
- validation: the same predictor with ``validate=True`` vs ``validate=False``, for a
  ``float`` input and for a small pydantic model built from a dict;
- Threads(1): a sync round trip through one worker thread, vs a direct call and vs a
  bare hand-off to a thread (a condition-guarded queue and a pre-acquired lock, the
  least any thread pool must do), for information.

Run: ``python benchmarks/overhead.py`` (or ``nox -s bench -- overhead``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from _thread import allocate_lock
from collections import deque
from collections.abc import Callable, Coroutine
from itertools import repeat
from typing import Any

from _util import (  # first: pins BLAS threads before numpy is imported
    Table,
    describe_run,
    fmt_us,
    mad,
    median,
    paired,
    run_trials,
)
from pydantic import BaseModel

import servekit as sk

TRIALS = 9
N_INLINE = 50_000  # calls per measurement on the Inline back end
N_THREADS = 4_000  # calls per measurement through a worker thread

SYNC_TARGET_US = 5.0
ASYNC_TARGET_US = 15.0

X = 1.0


def ident(batch: list[Any]) -> list[Any]:
    return batch


def ident_float(batch: list[float]) -> list[float]:
    return batch


class Point(BaseModel):
    x: float
    y: float
    label: str


def ident_point(batch: list[Point]) -> list[Point]:
    return batch


POINT = {"x": 1.0, "y": 2.0, "label": "a"}


# -- measurements: each runs n calls and returns µs per call -------------------------------


def direct_sync(n: int) -> Callable[[], float]:
    def measure() -> float:
        x, f = X, ident
        start = time.perf_counter_ns()
        for _ in repeat(None, n):
            f([x])[0]
        return (time.perf_counter_ns() - start) / n / 1e3

    return measure


def predict_sync(predictor: sk.Predictor[Any, Any], x: Any, n: int) -> Callable[[], float]:
    def measure() -> float:
        predict = predictor.predict
        start = time.perf_counter_ns()
        for _ in repeat(None, n):
            predict(x)
        return (time.perf_counter_ns() - start) / n / 1e3

    return measure


async def _direct_async(n: int) -> float:
    x, f = X, ident
    start = time.perf_counter_ns()
    for _ in repeat(None, n):
        f([x])[0]
    return (time.perf_counter_ns() - start) / n / 1e3


async def _predict_async(predictor: sk.Predictor[Any, Any], n: int) -> float:
    x, apredict = X, predictor.apredict
    start = time.perf_counter_ns()
    for _ in repeat(None, n):
        await apredict(x)
    return (time.perf_counter_ns() - start) / n / 1e3


def on_loop(
    loop: asyncio.AbstractEventLoop, make: Callable[[], Coroutine[Any, Any, float]]
) -> Callable[[], float]:
    """A measurement that runs (and times itself) inside the running loop ``loop``."""
    return lambda: loop.run_until_complete(make())


class BareHandOff:
    """The least a thread pool does per call: queue under a condition, wake by a lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[list[Any], Any] | None] = deque()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                job = self._queue.popleft()
            if job is None:
                return
            batch, lock = job
            batch[:] = ident(batch)
            lock.release()

    def call(self, x: Any) -> Any:
        batch = [x]
        lock = allocate_lock()
        lock.acquire()
        with self._cond:
            self._queue.append((batch, lock))
            self._cond.notify()
        lock.acquire()
        return batch[0]

    def close(self) -> None:
        with self._cond:
            self._queue.append(None)
            self._cond.notify()
        self._thread.join()


def bare_hand_off(bare: BareHandOff, n: int) -> Callable[[], float]:
    def measure() -> float:
        call, x = bare.call, X
        start = time.perf_counter_ns()
        for _ in repeat(None, n):
            call(x)
        return (time.perf_counter_ns() - start) / n / 1e3

    return measure


def main() -> None:
    inline = sk.Predictor(ident, backend=sk.Inline(), validate=False)
    float_off = sk.Predictor(ident_float, validate=False)
    float_on = sk.Predictor(ident_float, validate=True)
    point_off = sk.Predictor(ident_point, validate=False)
    point_on = sk.Predictor(ident_point, validate=True)
    threaded = sk.Predictor(ident, backend=sk.Threads(1), validate=False)
    predictors = [inline, float_off, float_on, point_off, point_on, threaded]
    assert float_on.signature.validates
    assert point_on.signature.validates
    for predictor in predictors:
        predictor.start()
    bare = BareHandOff()
    loop = asyncio.new_event_loop()
    try:
        samples = run_trials(
            {
                "sync": {
                    "direct": direct_sync(N_INLINE),
                    "predictor": predict_sync(inline, X, N_INLINE),
                },
                "async": {
                    "direct": on_loop(loop, lambda: _direct_async(N_INLINE)),
                    "predictor": on_loop(loop, lambda: _predict_async(inline, N_INLINE)),
                },
                "float": {
                    "off": predict_sync(float_off, X, N_INLINE),
                    "on": predict_sync(float_on, X, N_INLINE),
                },
                "pydantic": {
                    "off": predict_sync(point_off, POINT, N_INLINE),
                    "on": predict_sync(point_on, POINT, N_INLINE),
                },
                "threads": {
                    "direct": direct_sync(N_THREADS),
                    "bare": bare_hand_off(bare, N_THREADS),
                    "predictor": predict_sync(threaded, X, N_THREADS),
                },
            },
            TRIALS,
        )
    finally:
        loop.close()
        bare.close()
        for predictor in predictors:
            predictor.close()

    def cells(group: str, base: str, other: str, added: str) -> tuple[list[str], float]:
        """Best-of figures (noise only adds time), then the median paired difference."""
        a, b = samples[group][base], samples[group][other]
        best = min(b) - min(a)
        values = paired(b, a, lambda x, y: x - y)
        return [
            f"{base} {fmt_us(min(a))} µs",
            f"{other} {fmt_us(min(b))} µs",
            f"{added} {fmt_us(best)} µs",
            f"(median {fmt_us(median(values))} ±{fmt_us(mad(values))})",
        ], best

    table = Table("overhead")
    for group, label, target in (
        ("sync", "sync predict", SYNC_TARGET_US),
        ("async", "async apredict", ASYNC_TARGET_US),
    ):
        row, best = cells(group, "direct", "predictor", "overhead")
        table.row(label, *row, target=f"<= {target:g} µs", met=best <= target)
    for group, label in (("float", "validate float"), ("pydantic", "validate pydantic")):
        row, _ = cells(group, "off", "on", "added")
        table.row(label, *row)
    row, _ = cells("threads", "direct", "predictor", "overhead")
    table.row("Threads(1) sync predict", *row)
    row, _ = cells("threads", "bare", "predictor", "added")
    table.row("Threads(1) vs bare hand-off", *row)
    table.print(describe_run(TRIALS, "µs per call on a trivial model, best-of trials"))


if __name__ == "__main__":
    main()
