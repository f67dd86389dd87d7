"""What the metrics cost: on the request path, in the job store, and per scrape.

Every figure is a ratio against a baseline measured in the same run, trial by trial
(baseline and contender back to back), median over trials:

- record: ``LatencyWindow.record`` (the ring, plus the all-time histogram it feeds in
  bulk) against a ring-only window, the way it was before the histogram; per
  observation. Predictors record once per call, batchers once per item.
- store: submit + claim + complete of JOBS jobs on a ``SQLiteJobStore``
  (``synchronous=NORMAL``, so the disk's fsync does not hide the CPU cost) with its
  transition counters, against the same store with counting switched off.
- count: ``count_by_status()`` (one GROUP BY on the status index) on a store of ROWS
  jobs, against reading every row's status (the full scan a scrape would otherwise do).
- scrape: ``render_text(collect(queue))`` for a job queue over that store, in ms.

Run: ``python benchmarks/metrics.py`` (or ``nox -s bench -- metrics``). Bounded: a few
seconds of work per trial.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from _util import median  # first: pins BLAS threads before numpy is imported

import servekit as sk
from servekit.jobs import JobQueue, SQLiteJobStore
from servekit.metrics import LatencyWindow, collect, render_text

TRIALS = 5
JOBS = 2000
ROWS = 200_000


class RingOnly:
    """The window as it was before the histogram: the ring and a count."""

    __slots__ = ("_count", "_size", "_values")

    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._values: list[float] = []
        self._count = 0

    def record(self, seconds: float) -> None:
        if len(self._values) < self._size:
            self._values.append(seconds)
        else:
            self._values[self._count % self._size] = seconds
        self._count += 1


VALUES = [0.0003 * (i % 97) for i in range(20_000)]


def per_record_ns(factory: Any) -> float:
    def run() -> None:
        record = factory().record
        for v in VALUES:
            record(v)

    return min(timeit.repeat(run, number=5, repeat=3)) / (5 * len(VALUES)) * 1e9


def store_round(path: Path, counting: bool) -> float:
    store = SQLiteJobStore(path, synchronous="NORMAL")
    if not counting:
        store._note = lambda old, new: None  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        for i in range(JOBS):
            store.submit({"i": i})
        done = 0
        while done < JOBS:
            jobs = store.claim("w", lease_s=60, limit=256)
            store.complete_many("w", [(j.id, {"ok": True}) for j in jobs])
            done += len(jobs)
        return time.perf_counter() - started
    finally:
        store.close()


def big_store(path: Path) -> None:
    SQLiteJobStore(path).close()  # the schema
    conn = sqlite3.connect(path)
    statuses = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, status, input, attempts, max_attempts, created_at, "
        "payload_hash, cancel_requested, available_at, callback_attempts) "
        "VALUES (?, ?, '{}', 0, 3, 0, '', 0, 0, 0)",
        ((f"job{i}", statuses[i % 7 % 6]) for i in range(ROWS)),
    )
    conn.execute("COMMIT")
    conn.close()


def main() -> None:
    rec, store, count, scrape = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        big = root / "big.db"
        big_store(big)
        model = sk.Predictor(lambda xs: xs, name="m")
        for trial in range(TRIALS):
            before, now = per_record_ns(RingOnly), per_record_ns(LatencyWindow)
            rec.append((now / before, now - before))
            off = store_round(root / f"off{trial}.db", counting=False)
            on = store_round(root / f"on{trial}.db", counting=True)
            store.append(on / off)
            s = SQLiteJobStore(big)
            try:
                t0 = time.perf_counter()
                by_status = s.count_by_status()
                t1 = time.perf_counter()
                conn = sqlite3.connect(big)
                scanned: dict[str, int] = {}
                for (status,) in conn.execute("SELECT status FROM jobs"):
                    scanned[status] = scanned.get(status, 0) + 1
                conn.close()
                t2 = time.perf_counter()
                assert sum(by_status.values()) == sum(scanned.values()) == ROWS
                count.append((t1 - t0) / (t2 - t1))
                queue = JobQueue(model, store=s, workers=0)
                t3 = time.perf_counter()
                text = render_text(collect(queue))
                scrape.append((time.perf_counter() - t3) * 1e3)
                assert "servekit_jobs{" in text
            finally:
                s.close()
        model.close()
    print(f"metrics  trials {TRIALS}")
    ratio, extra = median([r for r, _ in rec]), median([d for _, d in rec])
    print(f"record   LatencyWindow / ring only      ratio {ratio:.2f}  (+{extra:.0f} ns per call)")
    print(f"store    counting / not counting        ratio {median(store):.3f}  ({JOBS} jobs)")
    print(f"count    count_by_status / full scan    ratio {median(count):.3f}  ({ROWS:,} rows)")
    print(f"scrape   render_text(collect(queue))    {median(scrape):.1f} ms  ({ROWS:,} rows)")


if __name__ == "__main__":
    main()
