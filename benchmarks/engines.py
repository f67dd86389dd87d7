"""The Batcher against the least a batcher must do: two minimal reference engines.

``batching.py`` measures the Batcher against the model's own limit (IDEAL). This script
measures what its features cost on the same workload (the MLP of ``batching.py``,
``max_batch_size=32``; 64 concurrent callers, and 256 asyncio callers), against engines
that do only the hand-off:

- asyncio callers: one engine thread; a caller copies its array into the next row of a
  preallocated buffer under one lock and awaits a future; the engine runs the model on
  a view of consecutive rows and sets the batch's futures in one ``call_soon_threadsafe``
  (the design DESIGN.md §5 measured at about 0.95 of IDEAL);
- caller threads: one engine thread; a caller queues its array under one lock and
  blocks on a lock of its own; the engine stacks the batch, runs the model, and wakes
  the first caller, each caller then waking the next (the Batcher's chain).

The engines have none of the Batcher's contracts (no deadlines, cancellation, priorities,
bounded queue, error isolation, statistics). The ratio Batcher ÷ reference, per trial with
both measured back to back, says how much of the gap to IDEAL is the Batcher's own work:
1.0 would mean none. For information: no targets.

Run: ``python benchmarks/engines.py`` (or ``nox -s bench -- engines``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from _thread import allocate_lock
from collections.abc import Callable, Coroutine
from typing import Any

from _util import Table, describe_run, fmt_int, mad, median, paired, run_trials

# isort: split
import numpy as np  # after _util, which pins the BLAS threads
from batching import BATCH, MAX_WAIT_S, make_inputs, mlp

from servekit import Batcher, Stack

TRIALS = 8
ROW_S = 0.8  # seconds of closed-loop load per measurement
CLIENTS = 64
DEEP_CLIENTS = 256  # asyncio callers for a queue that never empties


class _Engine:
    """One engine thread taking batches of up to BATCH records from a locked list."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: list[Any] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._engine, name=type(self).__name__)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop the engine thread (after what is queued)."""
        with self._lock:
            self._stopped = True
            self._ready.notify()
        self._thread.join()

    def _take(self) -> list[Any] | None:
        """The next batch, waiting for one; None once closed and drained."""
        with self._lock:
            while not self._queue and not self._stopped:
                self._ready.wait()
            batch = self._queue[:BATCH]
            del self._queue[:BATCH]
        return batch or None

    def _engine(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[Any]) -> None:
        raise NotImplementedError


class AsyncEngine(_Engine):
    """The reference for asyncio callers (see the module docstring)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> None:
        super().__init__(fn)
        self._shape = shape
        self._rows = 0
        self._size = 4 * BATCH
        self._buf = np.empty((self._size, *shape), np.float32)
        self.start()

    async def asubmit(self, x: np.ndarray) -> Any:
        """The model's output row for ``x``."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            row = self._rows
            if row % self._size == 0:
                self._buf = np.empty((self._size, *self._shape), np.float32)
            self._rows = row + 1
            self._buf[row % self._size] = x
            self._queue.append((future, self._buf, row))
            if len(self._queue) == 1:
                self._ready.notify()
        return await future

    @staticmethod
    def _set(futures: list[asyncio.Future[Any]], outputs: np.ndarray) -> None:
        for future, output in zip(futures, outputs, strict=True):
            if not future.done():
                future.set_result(output)

    def _run(self, batch: list[tuple[asyncio.Future[Any], np.ndarray, int]]) -> None:
        _, buf, row = batch[0]
        low, n = row % self._size, len(batch)
        if batch[-1][1] is buf and low + n <= self._size:
            x = buf[low : low + n]  # consecutive rows of one buffer: a view
        else:
            x = np.stack([b[r % self._size] for _, b, r in batch])
        futures = [future for future, _, _ in batch]
        futures[0].get_loop().call_soon_threadsafe(self._set, futures, self._fn(x))


class ThreadEngine(_Engine):
    """The reference for caller threads (see the module docstring)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__(fn)  # records: [item, own lock, output, next caller's lock]
        self.start()

    def submit(self, x: np.ndarray) -> Any:
        """The model's output row for ``x``."""
        waiter = allocate_lock()
        waiter.acquire()
        record = [x, waiter, None, None]
        with self._lock:
            self._queue.append(record)
            if len(self._queue) == 1:
                self._ready.notify()
        waiter.acquire()
        if record[3] is not None:
            record[3].release()
        return record[2]

    def _run(self, batch: list[list[Any]]) -> None:
        outputs = self._fn(np.stack([record[0] for record in batch]))
        for record, following, output in zip(batch, [*batch[1:], None], outputs, strict=True):
            record[2] = output
            record[3] = None if following is None else following[1]
        batch[0][1].release()


def async_load(
    asubmit: Callable[[np.ndarray], Coroutine[Any, Any, Any]], clients: int = CLIENTS
) -> Callable[[], float]:
    """Items/s of ``clients`` asyncio tasks on one new loop, each awaiting one item at a time."""
    inputs = make_inputs(clients)

    async def load() -> float:
        end = time.perf_counter() + ROW_S
        counts = [0] * clients

        async def client(i: int) -> None:
            x, done, clock = inputs[i], 0, time.perf_counter
            while clock() < end:
                await asubmit(x)
                done += 1
            counts[i] = done

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return sum(counts) / (time.perf_counter() - start)

    return lambda: asyncio.run(load())


def thread_load(submit: Callable[[np.ndarray], Any]) -> Callable[[], float]:
    """Items/s of CLIENTS threads, each calling ``submit`` one item at a time."""
    inputs = make_inputs(CLIENTS)

    def load() -> float:
        counts = [0] * CLIENTS
        barrier = threading.Barrier(CLIENTS + 1)
        end = [0.0]

        def client(i: int) -> None:
            x, done, clock = inputs[i], 0, time.perf_counter
            barrier.wait()
            while clock() < end[0]:
                submit(x)
                done += 1
            counts[i] = done

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        start = time.perf_counter()
        end[0] = start + ROW_S
        barrier.wait()
        for thread in threads:
            thread.join()
        return sum(counts) / (time.perf_counter() - start)

    return load


def main() -> None:
    """Measure both pairs and print the table."""
    async_engine = AsyncEngine(mlp, (256,))
    thread_engine = ThreadEngine(mlp)
    batchers = [
        Batcher(mlp, collate=Stack(), max_batch_size=BATCH, max_wait_s=MAX_WAIT_S) for _ in range(3)
    ]
    try:
        for batcher in batchers:
            batcher.start()
        samples = run_trials(
            {
                "asyncio": {
                    "reference": async_load(async_engine.asubmit),
                    "Batcher": async_load(batchers[0].asubmit),
                },
                "asyncio deep": {
                    "reference": async_load(async_engine.asubmit, DEEP_CLIENTS),
                    "Batcher": async_load(batchers[2].asubmit, DEEP_CLIENTS),
                },
                "threads": {
                    "reference": thread_load(thread_engine.submit),
                    "Batcher": thread_load(batchers[1].submit),
                },
            },
            TRIALS,
        )
    finally:
        async_engine.close()
        thread_engine.close()
        for batcher in batchers:
            batcher.close()
    table = Table("engines")
    for group, label in (
        ("asyncio", f"asyncio C={CLIENTS}"),
        ("asyncio deep", f"asyncio C={DEEP_CLIENTS}"),
        ("threads", f"threads C={CLIENTS} submit"),
    ):
        reference, batcher = samples[group]["reference"], samples[group]["Batcher"]
        ratios = paired(batcher, reference, lambda a, b: a / b)
        table.row(
            label,
            f"reference {fmt_int(median(reference))}/s",
            f"Batcher {fmt_int(median(batcher))}/s",
            f"Batcher ÷ reference {median(ratios):.2f} ±{mad(ratios):.2f}",
        )
    table.print(describe_run(TRIALS, "items/s of concurrent callers, the MLP of batching.py"))


if __name__ == "__main__":
    main()
