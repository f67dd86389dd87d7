"""JobQueue's background work: the dispatcher, the runners, the committer, and callbacks.

:class:`_Workers` is a mixin of :class:`~servekit.jobs.JobQueue` (see ``_queue`` for how
the parts fit): the dispatcher thread claims jobs, renews their leases, enforces
timeouts, purges and polls for callbacks; runner threads run the jobs; the committer
thread writes their outcomes; in-process callbacks are called when the queue sees a job
finish. :func:`report_progress` is the model's side of a running job.
"""

from __future__ import annotations

import builtins
import contextvars
import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._predictor import Predictor
from ..errors import (
    DeadlineExceeded,
    InvalidJobPayload,
    Overloaded,
    RetryableError,
    ServekitError,
    StoreUnavailable,
    WorkerCrashed,
)
from ..metrics import Histogram
from ._records import Job
from ._store import WORKER_LOST, JobStore

__all__ = ["report_progress"]

_log = logging.getLogger("servekit.jobs")

# The job a runner thread is working on, for report_progress().
_current: contextvars.ContextVar[_Running | None] = contextvars.ContextVar(
    "servekit_current_job", default=None
)

# Errors worth another attempt: the failure was about the moment, not the input.
_RETRYABLE = (RetryableError, WorkerCrashed, Overloaded)


def report_progress(fraction: float) -> bool:
    """Report the progress, 0.0 to 1.0, of the job running on this thread.

    Call it from a model's ``predict`` while it serves a job; :attr:`Job.progress` shows
    the last value. It works when the model runs on the job's runner thread: a predictor
    on the :class:`~servekit.Inline` back end (the default) without a batcher. Writes
    are throttled (one per 0.5 s, plus the final 1.0). Returns False, doing nothing,
    when the thread is not running a job (the same model serving a plain request).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {fraction!r}")
    running = _current.get()
    if running is None:
        return False
    now = time.monotonic()
    if fraction < 1.0 and now - running.progress_written < 0.5:
        return True
    running.progress_written = now
    try:
        running.queue._store.set_progress(running.job.id, running.queue.worker_id, fraction)
    except StoreUnavailable as exc:
        _log.warning("progress of job %s not recorded: %s", running.job.id[:6], exc)
    return True


@dataclasses.dataclass(eq=False)
class _Running:
    """A claimed job on this queue: waiting for a runner, or running."""

    job: Job
    queue: _Workers
    deadline: float | None = None  # monotonic; set when a runner starts it
    runner: threading.Thread | None = None
    progress_written: float = float("-inf")
    cancel: bool = False  # cancelled through this queue before a runner started it
    timed_out: bool = False  # the dispatcher failed it for its timeout
    finished: bool = False  # its runner is done with it (too late to time out)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    running: _Running
    value: Any = None
    error: BaseException | None = None


class _Workers:
    """The background side of a :class:`JobQueue`: claiming, running and committing
    jobs, and calling callbacks. A mixin: ``JobQueue.__init__`` sets the state below."""

    workers: int
    lease_s: float
    result_ttl_s: float
    retry_backoff_s: float
    max_retry_backoff_s: float
    poll_interval_s: float
    worker_id: str
    _predictor: Predictor[Any, Any] | None
    _store: JobStore
    _lock: threading.Lock
    _changed: threading.Condition
    _stop: threading.Event
    _wake: threading.Event
    _held: dict[str, _Running]
    _ready: queue.SimpleQueue[_Running | None]
    _outcomes: queue.SimpleQueue[_Outcome | None]
    _callbacks: dict[str, Callable[[Job], Any]]
    _callback_pool: ThreadPoolExecutor | None
    _run_time: Histogram

    # --- callbacks -----------------------------------------------------------------------

    def _notify(self, job: Job) -> None:
        with self._lock:
            callback = self._callbacks.pop(job.id, None)
            self._changed.notify_all()
        if callback is None:
            return
        pool = self._callback_pool
        if pool is None:
            _call(callback, job)
        else:
            try:
                pool.submit(_call, callback, job)
            except RuntimeError:  # the pool is shut down: closing
                _call(callback, job)

    def _poll_callbacks(self) -> None:
        # Jobs with a callable whose work another process may be doing: look them up.
        with self._lock:
            ids = [id for id in builtins.list(self._callbacks)[:100] if id not in self._held]
        for id in ids:
            try:
                job = self._store.get(id)
            except ServekitError:
                with self._lock:
                    self._callbacks.pop(id, None)
                continue
            if job.status.terminal:
                self._notify(job)

    # --- the worker's side ---------------------------------------------------------------

    def _dispatch(self) -> None:
        """Claim jobs, renew leases, enforce timeouts, purge, poll callbacks."""
        next_heartbeat = next_purge = next_poll = 0.0
        # Claim ahead of the runners, in batches: one write claims many jobs, and the
        # next claim waits until the runners are about to run out of work.
        capacity = max(2 * self.workers, 32)
        while not self._stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            claimed = 0
            try:
                with self._lock:
                    free = capacity - len(self._held)
                if self.workers and free > 0 and self._ready.qsize() < self.workers:
                    jobs = self._store.claim(self.worker_id, self.lease_s, limit=free)
                    claimed = len(jobs)
                    for job in jobs:
                        running = _Running(job, self)
                        with self._lock:
                            self._held[job.id] = running
                        self._ready.put(running)
                if now >= next_heartbeat:
                    next_heartbeat = now + self.lease_s / 3
                    self._heartbeat()
                self._check_timeouts()
                if now >= next_purge:
                    next_purge = now + min(self.result_ttl_s / 10, 60.0)
                    self._store.purge(self.result_ttl_s)
                if now >= next_poll:
                    next_poll = now + self.poll_interval_s
                    self._poll_callbacks()
            except StoreUnavailable as exc:
                _log.warning("job store unavailable, retrying: %s", exc)
                self._stop.wait(min(1.0, self.lease_s / 6))
                continue
            if claimed == 0 or free <= claimed:
                # Nothing queued, no room, or enough work ahead: sleep until a submit,
                # a finished job, or the poll interval.
                self._wake.wait(self.poll_interval_s)

    def _heartbeat(self) -> None:
        with self._lock:
            ids = builtins.list(self._held)
        if not ids:
            return
        kept = self._store.heartbeat_many(self.worker_id, ids, self.lease_s)
        for id, held in zip(ids, kept, strict=True):
            if not held:
                # Re-queued or finished elsewhere (e.g. a lease lost while paused): the
                # runner's result will be refused by the store; stop tracking it.
                with self._lock:
                    self._held.pop(id, None)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [
                r
                for r in self._held.values()
                if r.deadline is not None and r.deadline <= now and not (r.timed_out or r.finished)
            ]
            for running in late:
                running.timed_out = True
        for running in late:
            timeout = running.job.timeout_s
            self._outcomes.put(
                _Outcome(
                    running,
                    error=DeadlineExceeded(
                        f"the job ran longer than its timeout of {timeout} s; raise timeout_s "
                        "or make the model faster"
                    ),
                )
            )
            # The stuck runner cannot be stopped; a new one takes its place.
            self._spawn_runner()

    def _spawn_runner(self) -> None:
        thread = threading.Thread(target=self._run_jobs, name="servekit-job-runner", daemon=True)
        thread.start()

    def _run_jobs(self) -> None:
        assert self._predictor is not None
        predictor = self._predictor
        while True:
            running = self._ready.get()
            if running is None:
                return
            job = running.job
            with self._lock:
                # A job claimed ahead may have been cancelled, or waited past its queue
                # TTL, since; and a stopping queue starts nothing new.
                start = not (
                    running.cancel
                    or self._stop.is_set()
                    or (job.expires_at is not None and job.expires_at <= time.time())
                )
                if start:
                    running.runner = threading.current_thread()
            if not start:
                self._hand_back([running])
                continue
            if job.timeout_s is not None:
                running.deadline = time.monotonic() + job.timeout_s
            token = _current.set(running)
            started = time.perf_counter()
            try:
                value = predictor.predict(job.input, timeout_s=job.timeout_s)
                outcome = _Outcome(running, value=value)
            except Exception as exc:
                outcome = _Outcome(running, error=exc)
            finally:
                _current.reset(token)
                self._run_time.observe(time.perf_counter() - started)
            with self._lock:
                running.finished = True
                timed_out = running.timed_out
            if timed_out:
                return  # replaced by a new runner; the timeout was recorded already
            self._outcomes.put(outcome)

    def _hand_back(self, waiting: builtins.list[_Running]) -> None:
        """Release claimed, unstarted jobs in one write (see :meth:`JobStore.release`)."""
        if not waiting:
            return
        ids = [r.job.id for r in waiting]
        try:
            self._store.release(self.worker_id, ids)
        except ServekitError as exc:
            _log.warning("jobs not handed back (re-queued after their lease): %s", exc)
        self._let_go(ids)

    def _let_go(self, ids: builtins.list[str]) -> None:
        """Stop holding these jobs (written, or handed back); wake waiters, make room to
        claim more, and call the callbacks of those that finished."""
        with self._lock:
            for id in ids:
                self._held.pop(id, None)
            self._changed.notify_all()
            wanted = [id for id in ids if id in self._callbacks]
        self._wake.set()
        for id in wanted:
            try:
                job = self._store.get(id)
            except ServekitError:
                continue
            if job.status.terminal:
                self._notify(job)

    def _commit_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._outcomes.get()
            batch = [] if first is None else [first]
            stopping = first is None
            while True:  # everything that is waiting goes in the same write
                try:
                    item = self._outcomes.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                self._write_outcomes(batch)

    def _write_outcomes(self, batch: builtins.list[_Outcome]) -> None:
        successes = [o for o in batch if o.error is None]
        failures = [o for o in batch if o.error is not None]
        successes = self._store_successes(successes, failures)
        for outcome in failures:
            self._store_failure(outcome)
        self._let_go([o.running.job.id for o in successes + failures])

    def _store_successes(
        self, successes: builtins.list[_Outcome], failures: builtins.list[_Outcome]
    ) -> builtins.list[_Outcome]:
        if not successes:
            return []
        pairs = [(o.running.job.id, o.value) for o in successes]
        try:
            self._store.complete_many(self.worker_id, pairs)
            return successes
        except InvalidJobPayload:
            pass  # one result is not JSON: store them one by one to find it
        except StoreUnavailable as exc:
            _log.error("job results not recorded (re-run after lease): %s", exc)
            return successes
        kept = []
        for outcome in successes:
            try:
                self._store.complete(outcome.running.job.id, self.worker_id, outcome.value)
                kept.append(outcome)
            except InvalidJobPayload as exc:
                failures.append(dataclasses.replace(outcome, value=None, error=exc))
            except ServekitError as exc:
                _log.error("job result not recorded (re-run after lease): %s", exc)
                kept.append(outcome)
        return kept

    def _store_failure(self, outcome: _Outcome) -> None:
        error = outcome.error
        assert error is not None
        job = outcome.running.job
        retry = isinstance(error, _RETRYABLE) and not outcome.running.timed_out
        code = "timeout" if isinstance(error, DeadlineExceeded) else _code(error)
        backoff = min(self.max_retry_backoff_s, self.retry_backoff_s * 2 ** (job.attempts - 1))
        try:
            self._store.fail(
                job.id,
                self.worker_id,
                {"code": code, "message": _message(error)},
                retry=retry,
                backoff_s=backoff * random.uniform(0.5, 1.0),
            )
        except ServekitError as exc:
            _log.error("job failure not recorded (re-run after lease): %s", exc)


def _call(callback: Callable[[Job], Any], job: Job) -> None:
    try:
        callback(job)
    except Exception:
        _log.exception("job callback %r raised for job %s", callback, job.id[:6])


def _code(error: BaseException) -> str:
    if isinstance(error, WorkerCrashed):
        # The same reason as a worker whose lease ran out: the job took its worker down
        # (JB-04), whether a process back end saw it die or the lease told.
        return WORKER_LOST
    return error.code if isinstance(error, ServekitError) else "model_error"


def _message(error: BaseException) -> str:
    # The message only: no traceback, no paths (transports return it as is).
    return str(error) or type(error).__name__
