"""Batching efficiency, overhead and latency of :class:`servekit.Batcher` under load.

The workload is a numpy MLP (256 -> 1024 ReLU -> 16, float32, fixed random weights) on
1-D float32 inputs of shape (256,); ``max_batch_size=32``. The Batcher is given the MLP
itself with ``collate=Stack()``, the configuration docs/batching.md recommends for
fixed-shape arrays: asyncio callers' items are copied into the batch array as they are
submitted, and the model gets that array. The rows marked "list" give the Batcher a batch
function that takes a list of inputs, stacks them itself (``np.stack``) and returns a list
of output rows, for contrast.

IDEAL is the limit: items/s of calling the MLP directly on full batches of 32 (input
stacked beforehand, in a tight loop). Each row is measured back to back with its own IDEAL
measurement in every trial (in an order that rotates), and its ratio is the median over
trials of the per-trial ratio, so the ratio holds on a noisy machine where items/s alone
do not. Latency is the time of each request as its caller sees it (``perf_counter``
around one ``submit`` / ``asubmit``), pooled over all requests of all trials of a row.

Rows (DESIGN.md §5):

- asyncio callers, C = 1, 16, 64, 256 tasks on one event loop, each sending one item at a
  time in a closed loop. Targets: ratio >= 0.85 at C = 64 and C = 256; at C = 1, p50 within
  0.1 ms of calling the batch function directly on a batch of one (measured here too); at
  C = 64, p99 <= 3 x the full-batch model time + ``max_wait_s``;
- sync callers: 64 threads calling ``submit``. Target: ratio >= 0.55;
- overhead: a trivial identity model, 256 asyncio callers; µs per request = 1e6 / items/s.
  Target: <= 5 µs;
- no batching: ``max_batch_size=1``, 64 asyncio callers, for contrast;
- thread hand-off: a baton (a lock) passed round a ring of 32 threads, each blocking on
  a lock of its own until the one before releases it: what the scheduler and the GIL
  charge now for waking a thread, with no other work. A batch's caller threads are
  woken in such a chain, one hand-off each, so 1e6 / (µs per hand-off) items/s bounds
  caller threads through any batcher; the row gives that bound and its ratio to IDEAL.

Run: ``python benchmarks/batching.py`` (or ``nox -s bench -- batching``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from _thread import allocate_lock
from collections.abc import Callable
from itertools import repeat
from typing import Any

from _util import (  # first: pins BLAS threads before numpy is imported
    Table,
    describe_run,
    fmt_int,
    fmt_us,
    mad,
    median,
    paired,
    run_trials,
)

# isort: split
import numpy as np  # after _util, which pins the BLAS threads

from servekit import Batcher, Predictor, Processes, Stack

TRIALS = 5
ROW_S = 0.8  # seconds of closed-loop load per row and trial
IDEAL_S = 0.25  # seconds of direct full-batch calls per IDEAL measurement
DIRECT_CALLS = 3_000  # direct batch-of-one calls per measurement (for the C = 1 row)
BATCH = 32
MAX_WAIT_S = 0.002

RATIO_TARGET = 0.85
SYNC_RATIO_TARGET = 0.55
LONE_P50_TARGET_US = 100.0  # C = 1: p50 at most this much above a direct batch-of-one call
P99_MODEL_FACTOR = 3.0  # C = 64: p99 <= this x full-batch model time + max_wait_s
IDENT_TARGET_US = 5.0
HANDOFF_THREADS = 32  # threads in the hand-off ring
HANDOFF_LAPS = 60  # times the baton goes round per measurement (about 30 ms)
CORES_WARNING = 1.7  # below this many free cores, say that the figures are disturbed

# -- the model --------------------------------------------------------------------------------

_rng = np.random.default_rng(0)
W1 = (_rng.standard_normal((256, 1024)) / 16).astype(np.float32)
B1 = (_rng.standard_normal(1024) / 16).astype(np.float32)
W2 = (_rng.standard_normal((1024, 16)) / 32).astype(np.float32)
B2 = (_rng.standard_normal(16) / 32).astype(np.float32)


def mlp(x: np.ndarray) -> np.ndarray:
    """The MLP on a stacked (n, 256) float32 batch."""
    h = x @ W1
    h += B1
    np.maximum(h, 0.0, out=h)
    out = h @ W2
    out += B2
    return out


def stacked(**options: Any) -> Batcher[Any, Any]:
    """The Batcher of the headline rows: the MLP on arrays stacked at submission."""
    return Batcher(mlp, collate=Stack(), max_batch_size=BATCH, max_wait_s=MAX_WAIT_S, **options)


def mlp_batch(batch: list[np.ndarray]) -> list[np.ndarray]:
    """The batch function: a list of (256,) inputs to a list of (16,) output rows."""
    return list(mlp(np.stack(batch)))


def ident(batch: list[Any]) -> list[Any]:
    return batch


def make_inputs(n: int) -> list[np.ndarray]:
    return list(_rng.standard_normal((n, 256)).astype(np.float32))


# -- measurements -----------------------------------------------------------------------------


class Row:
    """What one row's measurements collected beyond their items/s: latencies, batch sizes."""

    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, every request of every trial
        self.items = 0  # items and batches the Batcher sent to the function in those trials
        self.batches = 0

    def reset(self) -> None:
        """Forget what the warm-up collected."""
        self.latencies.clear()
        self.items = self.batches = 0

    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile latency in µs (nearest rank)."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index] * 1e6


def ideal(x32: np.ndarray) -> Callable[[], float]:
    """Items/s of the MLP called directly on full, pre-stacked batches."""
    calls = max(1, round(IDEAL_S / _full_batch_s(x32)))

    def measure() -> float:
        f, x = mlp, x32
        start = time.perf_counter()
        for _ in repeat(None, calls):
            f(x)
        return calls * BATCH / (time.perf_counter() - start)

    return measure


def two_threads(x32: np.ndarray) -> Callable[[], float]:
    """Items/s of the MLP on full batches in two threads at once (BLAS releases the GIL).

    Divided by IDEAL it says how many cores the machine gives this process right now:
    near 2 on an idle 2-core machine. The Batcher overlaps its own work with the model on
    the second core; when there is no second core to be had, no ratio target can be met.
    """
    calls = max(1, round(IDEAL_S / _full_batch_s(x32)))

    def measure() -> float:
        barrier = threading.Barrier(2)

        def work() -> None:
            f, x = mlp, x32
            barrier.wait()
            for _ in repeat(None, calls):
                f(x)

        thread = threading.Thread(target=work)
        thread.start()
        start = time.perf_counter()
        work()
        thread.join()
        return 2 * calls * BATCH / (time.perf_counter() - start)

    return measure


def handoff() -> float:
    """Hand-offs per second in a ring of threads passing one baton (see the module docstring)."""
    locks = [allocate_lock() for _ in range(HANDOFF_THREADS)]
    for lock in locks:
        lock.acquire()
    done = allocate_lock()
    done.acquire()

    def member(i: int) -> None:
        mine, following = locks[i], locks[(i + 1) % HANDOFF_THREADS]
        last = i == HANDOFF_THREADS - 1
        for lap in range(HANDOFF_LAPS):
            mine.acquire()
            if last and lap == HANDOFF_LAPS - 1:
                done.release()  # the final hand-off: back to the timing thread
                return
            following.release()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(HANDOFF_THREADS)]
    for thread in threads:
        thread.start()
    time.sleep(0.01)  # every member blocked on its lock
    start = time.perf_counter()
    locks[0].release()
    done.acquire()
    elapsed = time.perf_counter() - start
    for thread in threads:
        thread.join()
    return HANDOFF_THREADS * HANDOFF_LAPS / elapsed


def _full_batch_s(x32: np.ndarray) -> float:
    for _ in range(20):
        mlp(x32)
    start = time.perf_counter()
    for _ in range(200):
        mlp(x32)
    return (time.perf_counter() - start) / 200


def direct_one(row: Row, x: np.ndarray) -> Callable[[], float]:
    """Items/s of the batch function called directly on batches of one; records latencies."""

    def measure() -> float:
        f, pc = mlp_batch, time.perf_counter
        lat = row.latencies
        start = pc()
        for _ in repeat(None, DIRECT_CALLS):
            t0 = pc()
            f([x])[0]
            lat.append(pc() - t0)
        return DIRECT_CALLS / (pc() - start)

    return measure


def _counted(batcher: Batcher[Any, Any], row: Row, run: Callable[[], tuple[int, float]]) -> float:
    """Run ``run`` (returns items and seconds), add the Batcher's batch counts to ``row``."""
    before = batcher.statistics()
    items, elapsed = run()
    after = batcher.statistics()
    row.items += after.items - before.items
    row.batches += after.batches - before.batches
    return items / elapsed


class _ViaPredictor:
    """A Predictor seen through the two Batcher methods the callers use."""

    def __init__(self, predictor: Predictor[Any, Any]) -> None:
        assert predictor.batcher is not None
        self.asubmit = predictor.apredict
        self.statistics = predictor.batcher.statistics


def async_callers(
    loop: asyncio.AbstractEventLoop,
    batcher: Batcher[Any, Any],
    row: Row,
    inputs: list[np.ndarray],
    clients: int,
) -> Callable[[], float]:
    """Items/s of ``clients`` asyncio tasks, each awaiting one ``asubmit`` at a time."""

    async def client(x: np.ndarray, end: float, lat: list[float]) -> None:
        submit, pc = batcher.asubmit, time.perf_counter
        while True:
            t0 = pc()
            await submit(x)
            t1 = pc()
            lat.append(t1 - t0)
            if t1 >= end:
                return

    async def run() -> tuple[int, float]:
        lats: list[list[float]] = [[] for _ in range(clients)]
        start = time.perf_counter()
        end = start + ROW_S
        await asyncio.gather(
            *(client(inputs[i % len(inputs)], end, lats[i]) for i in range(clients))
        )
        elapsed = time.perf_counter() - start
        for lat in lats:
            row.latencies.extend(lat)
        return sum(map(len, lats)), elapsed

    return lambda: _counted(batcher, row, lambda: loop.run_until_complete(run()))


def thread_callers(
    batcher: Batcher[Any, Any], row: Row, inputs: list[np.ndarray], clients: int
) -> Callable[[], float]:
    """Items/s of ``clients`` threads, each calling ``submit`` one item at a time."""

    def run() -> tuple[int, float]:
        lats: list[list[float]] = [[] for _ in range(clients)]
        barrier = threading.Barrier(clients + 1)
        end = [0.0]

        def client(x: np.ndarray, lat: list[float]) -> None:
            submit, pc = batcher.submit, time.perf_counter
            barrier.wait()
            stop = end[0]
            while True:
                t0 = pc()
                submit(x)
                t1 = pc()
                lat.append(t1 - t0)
                if t1 >= stop:
                    return

        threads = [
            threading.Thread(target=client, args=(inputs[i % len(inputs)], lats[i]))
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        start = time.perf_counter()
        end[0] = start + ROW_S
        barrier.wait()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        for lat in lats:
            row.latencies.extend(lat)
        return sum(map(len, lats)), elapsed

    return lambda: _counted(batcher, row, run)


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    inputs = make_inputs(256)
    x32 = np.stack(inputs[:BATCH])
    model_s = _full_batch_s(x32)
    ideal_measure = ideal(x32)

    async_counts = (1, 16, 64, 256)
    batchers: dict[str, Batcher[Any, Any]] = {
        **{f"asyncio C={c}": stacked() for c in async_counts},
        "list asyncio C=64": Batcher(mlp_batch, max_batch_size=BATCH, max_wait_s=MAX_WAIT_S),
        "threads C=64": stacked(),
        "list threads C=64": Batcher(mlp_batch, max_batch_size=BATCH, max_wait_s=MAX_WAIT_S),
        "identity asyncio C=256": Batcher(ident, max_batch_size=BATCH, max_wait_s=MAX_WAIT_S),
        "no batching asyncio C=64": Batcher(mlp_batch, max_batch_size=1, max_wait_s=MAX_WAIT_S),
    }
    rows = {label: Row() for label in batchers}
    direct = Row()
    loop = asyncio.new_event_loop()
    groups: dict[str, dict[str, Callable[[], float]]] = {
        "cores": {"ideal": ideal_measure, "two threads": two_threads(x32)},
        "hand-off": {"ideal": ideal_measure, "hand-offs": handoff},
    }
    for c in async_counts:
        label = f"asyncio C={c}"
        groups[label] = {
            "ideal": ideal_measure,
            "batcher": async_callers(loop, batchers[label], rows[label], inputs, c),
        }
        if c == 1:
            groups[label]["direct"] = direct_one(direct, inputs[0])
    for label in ("threads C=64", "list threads C=64"):
        groups[label] = {
            "ideal": ideal_measure,
            "batcher": thread_callers(batchers[label], rows[label], inputs, 64),
        }
    label = "list asyncio C=64"
    groups[label] = {
        "ideal": ideal_measure,
        "batcher": async_callers(loop, batchers[label], rows[label], inputs, 64),
    }
    label = "identity asyncio C=256"
    groups[label] = {"batcher": async_callers(loop, batchers[label], rows[label], inputs, 256)}
    label = "no batching asyncio C=64"
    groups[label] = {
        "ideal": ideal_measure,
        "batcher": async_callers(loop, batchers[label], rows[label], inputs, 64),
    }
    # The MLP in two worker processes behind the Batcher (the model runs in the
    # workers; the callers' event loop and the batcher stay in this process).
    processes = Predictor(
        mlp_batch,
        backend=Processes(2),
        batcher=Batcher(max_batch_size=BATCH, max_wait_s=MAX_WAIT_S),
    )
    processes.start()
    label = "Processes(2) asyncio C=64"
    rows[label] = Row()
    groups[label] = {
        "ideal": ideal_measure,
        "batcher": async_callers(loop, _ViaPredictor(processes), rows[label], inputs, 64),
    }

    for batcher in batchers.values():
        batcher.start()
    try:
        # A short warm-up (threads started, loop and BLAS warm), then the trials proper;
        # the warm-up's latencies and batch counts are dropped.
        for measure in (m for g in groups.values() for m in g.values()):
            measure()
        for row in (*rows.values(), direct):
            row.reset()
        samples = run_trials(groups, TRIALS, warmup=0)
    finally:
        for batcher in batchers.values():
            batcher.close()
        processes.close()
        loop.close()

    ideals = [v for g in samples.values() for v in g.get("ideal", [])]
    ideal_ips = median(ideals)
    print(
        "# columns: row; items/s (median over trials); ratio = items/s / IDEAL in the same "
        "trial (median ± MAD); p50 / p99 = latency per request as the caller sees it, over "
        "all requests; batch = mean batch size from Batcher.statistics(); target; verdict"
    )
    print(
        f"# IDEAL = MLP 256->1024->16 float32 called directly on pre-stacked batches of "
        f"{BATCH}: {fmt_int(ideal_ips)} items/s (median of {len(ideals)}, range "
        f"{fmt_int(min(ideals))}-{fmt_int(max(ideals))}); one full batch "
        f"{fmt_us(model_s * 1e6)} µs; max_wait_s = {MAX_WAIT_S * 1e3:g} ms"
    )

    cores = paired(samples["cores"]["two threads"], samples["cores"]["ideal"], lambda a, b: a / b)
    print(
        f"# cores this process gets now: {median(cores):.2f} ±{mad(cores):.2f} (MLP on two "
        "threads at once / on one; 2.0 = both cores free)"
        + (
            ""
            if median(cores) >= CORES_WARNING
            else "; the machine is busy: ratios are held down by the lack of a second core"
        )
    )

    table = Table("batching")
    table.row("IDEAL full batches", f"{fmt_int(ideal_ips)}/s", "1.00")
    direct_p50 = direct.percentile(50)
    table.row(
        "direct batch of 1",
        f"{fmt_int(median(samples['asyncio C=1']['direct']))}/s",
        "",
        f"p50 {fmt_us(direct_p50)} µs",
        f"p99 {fmt_us(direct.percentile(99))} µs",
    )

    def cells(label: str) -> tuple[list[str], float]:
        row, got = rows[label], samples[label]["batcher"]
        ratios = paired(got, samples[label]["ideal"], lambda a, b: a / b)
        ratio = median(ratios)
        return [
            f"{fmt_int(median(got))}/s",
            f"{ratio:.2f} ±{mad(ratios):.2f}",
            f"p50 {fmt_us(row.percentile(50))} µs",
            f"p99 {fmt_us(row.percentile(99))} µs",
            f"batch {row.mean_batch_size():.1f}",
        ], ratio

    for c in async_counts:
        label = f"asyncio C={c}"
        row_cells, ratio = cells(label)
        if c == 1:
            p50 = rows[label].percentile(50)
            table.row(
                label,
                *row_cells,
                target=f"p50 <= direct {fmt_us(direct_p50)} + {LONE_P50_TARGET_US:g} µs",
                met=p50 <= direct_p50 + LONE_P50_TARGET_US,
            )
        elif c == 64:
            limit_us = (P99_MODEL_FACTOR * model_s + MAX_WAIT_S) * 1e6
            table.row(
                label,
                *row_cells,
                target=f"ratio >= {RATIO_TARGET}",
                met=ratio >= RATIO_TARGET,
            )
            table.row(
                f"{label} p99",
                "",
                "",
                "",
                f"p99 {fmt_us(rows[label].percentile(99))} µs",
                "",
                target=f"p99 <= {fmt_us(limit_us)} µs",
                met=rows[label].percentile(99) <= limit_us,
            )
        elif c == 256:
            table.row(
                label, *row_cells, target=f"ratio >= {RATIO_TARGET}", met=ratio >= RATIO_TARGET
            )
        else:
            table.row(label, *row_cells)
    row_cells, _ = cells("list asyncio C=64")
    table.row("list asyncio C=64", *row_cells)
    row_cells, ratio = cells("threads C=64")
    table.row(
        "threads C=64 submit",
        *row_cells,
        target=f"ratio >= {SYNC_RATIO_TARGET}",
        met=ratio >= SYNC_RATIO_TARGET,
    )
    row_cells, _ = cells("list threads C=64")
    table.row("list threads C=64 submit", *row_cells)
    rates = samples["hand-off"]["hand-offs"]
    bound_ratios = paired(rates, samples["hand-off"]["ideal"], lambda a, b: a / b)
    table.row(
        f"thread hand-off, ring of {HANDOFF_THREADS}",
        f"{fmt_int(median(rates))}/s",
        f"{median(bound_ratios):.2f} ±{mad(bound_ratios):.2f}",
        f"{fmt_us(1e6 / median(rates))} µs/hand-off",
    )
    label = "identity asyncio C=256"
    ident_ips = median(samples[label]["batcher"])
    per_request_us = 1e6 / ident_ips
    row = rows[label]
    table.row(
        label,
        f"{fmt_int(ident_ips)}/s",
        f"{fmt_us(per_request_us)} µs/req",
        f"p50 {fmt_us(row.percentile(50))} µs",
        f"p99 {fmt_us(row.percentile(99))} µs",
        f"batch {row.mean_batch_size():.1f}",
        target=f"<= {IDENT_TARGET_US:g} µs/req",
        met=per_request_us <= IDENT_TARGET_US,
    )
    row_cells, _ = cells("Processes(2) asyncio C=64")
    table.row("Processes(2) asyncio C=64", *row_cells)
    row_cells, _ = cells("no batching asyncio C=64")
    table.row("no batching asyncio C=64", *row_cells)
    table.print(describe_run(TRIALS, "Batcher items/s and latency vs the MLP on full batches"))


if __name__ == "__main__":
    main()
