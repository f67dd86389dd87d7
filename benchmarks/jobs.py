"""End-to-end job throughput against the disk's own commit rate, and submit latency.

- baseline: single-row INSERT transactions, one after the other, on a WAL SQLite file
  with ``synchronous=FULL`` in the same directory: the rate one writer gets from this
  disk when every write is its own durable commit.
- jobs: SUBMITTERS threads each submit JOBS / SUBMITTERS jobs to a :class:`JobQueue`
  (trivial per-item model, ``SQLiteJobStore`` with ``synchronous=FULL``, WORKERS runner
  threads); the figure is jobs per second from the first submit to the last job
  succeeded. Every job costs at least three writes (submit, claim, complete); group
  commit in the store and batched claims and completions are what let it keep up.

The ratio jobs/s ÷ commits/s is taken per trial (both measured back to back) and the
median over trials is reported; target >= 0.5. Submit latency p50/p99 are over every
submit of every trial.

Run: ``python benchmarks/jobs.py`` (or ``nox -s bench -- jobs``).
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _util import (  # first: pins BLAS threads before numpy is imported
    Table,
    describe_run,
    fmt_int,
    mad,
    median,
    paired,
    run_trials,
)

from servekit import Predictor
from servekit.jobs import JobQueue, JobStatus, SQLiteJobStore

TRIALS = 5
COMMITS = 400  # baseline single-row commits per trial
JOBS = 1000  # jobs per trial
SUBMITTERS = 8
WORKERS = 4
TARGET = 0.5


def raw_commits(directory: Path) -> float:
    """Single-row synchronous=FULL commits per second, one writer."""
    path = directory / f"raw-{time.monotonic_ns()}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        started = time.perf_counter()
        for i in range(COMMITS):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (payload) VALUES (?)", (f'{{"i":{i}}}',))
            conn.execute("COMMIT")
        return COMMITS / (time.perf_counter() - started)
    finally:
        conn.close()


def jobs_end_to_end(directory: Path, latencies: list[float]) -> float:
    """Jobs per second, first submit to last success, with SUBMITTERS threads."""
    store = SQLiteJobStore(directory / f"jobs-{time.monotonic_ns()}.db")
    queue = JobQueue(
        Predictor(lambda x: x, per_item=True, validate=False),
        store=store,
        workers=WORKERS,
        poll_interval_s=0.01,
    )
    queue.start()
    ids: list[str] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        mine, times = [], []
        for i in range(n):
            t0 = time.perf_counter()
            mine.append(queue.submit({"i": i}).id)
            times.append(time.perf_counter() - t0)
        with lock:
            ids.extend(mine)
            latencies.extend(times)

    threads = [
        threading.Thread(target=submit, args=(JOBS // SUBMITTERS,)) for _ in range(SUBMITTERS)
    ]
    try:
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for id in ids:
            job = queue.wait(id, timeout_s=120)
            assert job.status is JobStatus.SUCCEEDED, job
        return len(ids) / (time.perf_counter() - started)
    finally:
        queue.close()
        store.close()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    latencies: list[float] = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        directory = Path(tmp)
        samples: Any = run_trials(
            {
                "jobs": {
                    "commits": lambda: raw_commits(directory),
                    "jobs": lambda: jobs_end_to_end(directory, latencies),
                }
            },
            TRIALS,
        )
    commits, jobs = samples["jobs"]["commits"], samples["jobs"]["jobs"]
    ratios = paired(jobs, commits, lambda a, b: a / b)
    ratio = median(ratios)
    table = Table("jobs")
    table.row("raw FULL commits/s", fmt_int(median(commits)), f"±{fmt_int(mad(commits))}")
    table.row("jobs/s end to end", fmt_int(median(jobs)), f"±{fmt_int(mad(jobs))}")
    table.row(
        "jobs/s ÷ commits/s",
        f"{ratio:.2f}",
        f"±{mad(ratios):.2f}",
        target=f">= {TARGET}",
        met=ratio >= TARGET,
    )
    table.row(
        "submit latency",
        f"p50 {percentile(latencies, 0.5) * 1e3:.2f} ms",
        f"p99 {percentile(latencies, 0.99) * 1e3:.2f} ms",
    )
    table.print(
        describe_run(
            TRIALS,
            f"{JOBS} jobs per trial, {SUBMITTERS} submitting threads, {WORKERS} workers, "
            "SQLite WAL synchronous=FULL (the warm-up trial's latencies included)",
        )
    )


if __name__ == "__main__":
    main()
