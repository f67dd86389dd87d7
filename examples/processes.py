"""Worker processes: a GIL-bound model on Processes(2), and a worker crash survived.

Run it from the root of a clone:

    python examples/processes.py

The Processes back end starts its workers with the "spawn" method, which imports this
file again in every worker; the ``if __name__ == "__main__":`` guard keeps the workers
from running the demo themselves.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import servekit as sk
from servekit.testing import Crash


class PrimeCounter(sk.Model):
    """Counts the primes below each input by trial division: pure Python, holds the GIL."""

    def predict(self, batch: list[int]) -> list[int]:
        return [self._count(limit) for limit in batch]

    @staticmethod
    def _count(limit: int) -> int:
        count = 0
        for candidate in range(2, limit):
            divisor = 2
            while divisor * divisor <= candidate:
                if candidate % divisor == 0:
                    break
                divisor += 1
            else:
                count += 1
        return count


LIMITS = [25_000] * 8


def run_on(backend: sk.Backend) -> tuple[list[int], float]:
    """Score LIMITS from 4 caller threads; return the results and the seconds it took."""
    with sk.Predictor(PrimeCounter(), backend=backend) as predictor:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(predictor.predict, LIMITS))
        return results, time.perf_counter() - started


def gil_bound() -> None:
    print(f"== a GIL-bound model, 8 requests from 4 threads ({os.cpu_count()} CPUs here)")
    on_threads, threads_s = run_on(sk.Threads(2))
    on_processes, processes_s = run_on(sk.Processes(2))
    assert on_threads == on_processes
    print(f"primes below {LIMITS[0]:,}: {on_processes[0]:,}")
    print(f"Threads(2):   {threads_s:.2f} s (the two threads take turns holding the GIL)")
    print(f"Processes(2): {processes_s:.2f} s (each worker has its own interpreter and GIL)")
    # Near 2 with two idle cores; near 1 when the machine has only one core to give.
    print(f"speed-up of Processes(2) over Threads(2): {threads_s / processes_s:.2f}x")


def crash_survived() -> None:
    print('== a worker that dies: Crash("boom") calls os._exit(13) when it sees "boom"')
    backend = sk.Processes(2)
    with sk.Predictor(Crash("boom"), backend=backend) as predictor:
        print("worker pids:", backend.worker_pids())
        print("before the crash:", predictor.predict("hello"))
        try:
            predictor.predict("boom")
        except sk.WorkerCrashed as exc:
            print(f"WorkerCrashed (code {exc.code!r}, exit code {exc.exitcode})")

        # Only the request the dead worker held failed; the other worker keeps serving
        # while the supervisor starts a replacement.
        print("right after:", predictor.predict_many(["a", "b", "c"]))
        deadline = time.monotonic() + 10.0
        while len(backend.worker_pids()) < backend.n and time.monotonic() < deadline:
            time.sleep(0.05)
        print("worker pids:", backend.worker_pids())
        print(f"restarts: {backend.restarts}, healthy: {backend.healthy}, ready: {predictor.ready}")

        # In predict_many the crash fails the items that shared the dead worker's batch.
        results = predictor.predict_many(["x", "boom", "y", "z"], return_exceptions=True)
        print("mixed:", [type(r).__name__ if isinstance(r, Exception) else r for r in results])
        stats = predictor.statistics()
        print(f"statistics: {stats.succeeded} succeeded, {stats.errors} failed")


def main() -> None:
    # servekit logs a warning when it replaces a worker; show it on the terminal.
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s")
    gil_bound()
    crash_survived()
    print("done")


if __name__ == "__main__":
    main()
