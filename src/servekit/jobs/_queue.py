"""JobQueue: submit now, run in the background, poll or be called back.

How the parts fit (one queue = one worker identity on the store):

- ``submit`` validates, checks a webhook URL (CB-05), and returns the :class:`Job`
  once the store has committed it (JB-01). It never runs the model.
- A **dispatcher** thread claims queued jobs in batches (one write claims many), never
  more than the runners can start soon, and renews the leases of every job it holds
  in one write (heartbeat) every third of ``lease_s``. It also runs the periodic purge
  of finished jobs past ``result_ttl_s`` and enforces execution timeouts.
- ``workers`` **runner** threads each run one job at a time through the predictor
  (``predictor.predict``): with a :class:`~servekit.Batcher` on the predictor,
  concurrent jobs share model batches like any other requests.
- A **committer** thread writes outcomes: the successes waiting at that moment in one
  ``complete_many`` write (group commit), failures one by one (retry or not).
- A **deliverer** thread (when ``webhooks`` is set) sends due webhooks, at most
  ``max_concurrency`` at once, and records each attempt on the job.

Failure rules: a model's :class:`~servekit.RetryableError`, a crashed worker process
(:class:`~servekit.WorkerCrashed`) and an overloaded predictor are retried with
exponential backoff while attempts remain; any other error fails the job at once. An
attempt that runs past the job's ``timeout_s`` fails with code ``timeout`` and its
runner thread is abandoned and replaced (Python cannot stop a thread; its late result
is dropped by the store, which no longer counts this worker as the job's holder).

Python callables given as ``callback`` live in this process only: they are called once
when this queue sees the job finish (by its own runners, a cancel through it, or by
polling for jobs other processes run) and are lost if the process dies. Webhooks are
durable: the job's delivery state is in the store, so a delivery pending at a crash
is sent after restart (CB-03).
"""

from __future__ import annotations

import builtins
import contextvars
import dataclasses
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.to_thread

from .._predictor import Predictor
from ..errors import (
    Closed,
    DeadlineExceeded,
    InvalidJobPayload,
    Overloaded,
    RetryableError,
    ServekitError,
    StoreUnavailable,
    WorkerCrashed,
)
from ..metrics import Histogram
from ._counts import JobQueueStatistics
from ._records import Job, JobStatus
from ._sqlite import SQLiteJobStore
from ._store import WORKER_LOST, JobStore, check_positive
from ._webhooks import Webhooks, deliver

__all__ = ["DEFAULT_STORE_PATH", "JobQueue", "report_progress"]

_log = logging.getLogger("servekit.jobs")

#: Where ``JobQueue()`` keeps its jobs when no store is given (relative to the
#: current directory).
DEFAULT_STORE_PATH = "servekit-jobs.sqlite3"

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
    queue: JobQueue
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


class JobQueue:
    """Durable background jobs over one predictor: submit, then poll or be called back.

    ``predictor`` is a :class:`~servekit.Predictor` (the queue uses it, the host owns
    it) or anything a Predictor accepts (a :class:`~servekit.Model` or a batch function:
    the queue makes the predictor and closes it). It may be None with ``workers=0``: a
    web process that only submits, while ``servekit jobs worker`` processes run them.

    ``store`` is a :class:`JobStore`, or a path for a :class:`SQLiteJobStore` (default
    ``servekit-jobs.sqlite3`` in the current directory); the queue closes a store it
    opened. ``workers`` runner threads run jobs, one each at a time. ``max_attempts``,
    ``ttl_s`` (queue TTL: a job not started in time expires and never runs) and
    ``timeout_s`` (execution timeout of one attempt) are defaults each ``submit`` may
    override. A worker holds a job under a lease of ``lease_s``, renewed every
    ``lease_s / 3``; a job held by a worker that died is re-queued after its lease
    (at least once) and fails with ``worker_lost`` after ``max_attempts``. Finished jobs
    are purged ``result_ttl_s`` after they end. Retries wait ``retry_backoff_s``,
    doubling each attempt up to ``max_retry_backoff_s``, with jitter.

    ``webhooks`` (:class:`Webhooks`: the signing secret and the delivery policy)
    enables ``submit(..., webhook=url)``.

    Workers start with :meth:`start`, ``with queue:``, or the first :meth:`submit`;
    :meth:`close` stops claiming, lets running jobs finish for ``grace_s``, and leaves
    what is left to be re-queued after its lease.

    >>> import servekit as sk
    >>> from servekit.jobs import JobQueue, MemoryJobStore
    >>> with JobQueue(sk.Predictor(lambda xs: [x * 2 for x in xs]),
    ...               store=MemoryJobStore()) as jobs:
    ...     job = jobs.submit(21)
    ...     jobs.wait(job.id, timeout_s=10).result
    42
    """

    def __init__(
        self,
        predictor: Predictor[Any, Any] | Any = None,
        *,
        store: JobStore | str | os.PathLike[str] | None = None,
        workers: int = 1,
        max_attempts: int = 3,
        lease_s: float = 30.0,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        result_ttl_s: float = 7 * 24 * 3600.0,
        retry_backoff_s: float = 1.0,
        max_retry_backoff_s: float = 300.0,
        webhooks: Webhooks | None = None,
        poll_interval_s: float = 0.05,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        if predictor is None and workers > 0:
            raise ValueError(
                "a JobQueue with workers needs a predictor; pass workers=0 for a queue "
                "that only submits (with workers running elsewhere)"
            )
        for name, value in (
            ("lease_s", lease_s),
            ("result_ttl_s", result_ttl_s),
            ("retry_backoff_s", retry_backoff_s),
            ("max_retry_backoff_s", max_retry_backoff_s),
            ("poll_interval_s", poll_interval_s),
        ):
            check_positive(name, value)
        if webhooks is not None and not isinstance(webhooks, Webhooks):
            raise TypeError(f"webhooks must be a servekit.jobs.Webhooks, got {webhooks!r}")
        self._owns_predictor = predictor is not None and not isinstance(predictor, Predictor)
        self._predictor: Predictor[Any, Any] | None = (
            Predictor(predictor) if self._owns_predictor else predictor
        )
        self._owns_store = not isinstance(store, JobStore)
        self._store: JobStore = (
            store
            if isinstance(store, JobStore)
            else SQLiteJobStore(store if store is not None else DEFAULT_STORE_PATH)
        )
        self.workers = workers
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.result_ttl_s = result_ttl_s
        self.retry_backoff_s = retry_backoff_s
        self.max_retry_backoff_s = max_retry_backoff_s
        self.webhooks = webhooks
        self.poll_interval_s = poll_interval_s
        #: This queue's identity on the store (host, process id and a random part).
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job this queue saw finish
        self._state = "new"  # new -> started -> closing -> closed
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by submit: something may be claimable
        self._held: dict[str, _Running] = {}  # claimed by this queue, not yet written
        self._ready: queue.SimpleQueue[_Running | None] = queue.SimpleQueue()
        self._outcomes: queue.SimpleQueue[_Outcome | None] = queue.SimpleQueue()
        self._callbacks: dict[str, Callable[[Job], Any]] = {}
        self._threads: list[threading.Thread] = []
        self._dispatcher: threading.Thread | None = None
        self._callback_pool: ThreadPoolExecutor | None = None
        self._run_time = Histogram()  # run time of each attempt on this queue's runners
        self._deliveries = {"delivered": 0, "retrying": 0, "failed": 0}
        self._deliveries_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        """The job store."""
        return self._store

    @property
    def predictor(self) -> Predictor[Any, Any] | None:
        """The predictor jobs run on (None for a submit-only queue)."""
        return self._predictor

    def statistics(self) -> JobQueueStatistics:
        """A snapshot of the job counters (see :class:`JobQueueStatistics`): the store's
        counts of what this process did, jobs in the store by status (read from the
        store: one indexed count for SQLite), run times and webhook deliveries."""
        counts = getattr(self._store, "statistics", None)
        done = counts() if callable(counts) else None
        by_status = None
        count_by_status = getattr(self._store, "count_by_status", None)
        if callable(count_by_status):
            try:
                by_status = {s.value: n for s, n in count_by_status().items()}
            except StoreUnavailable:
                pass  # no gauge this time rather than a failed scrape
        deliveries = None
        if self.webhooks is not None:
            with self._deliveries_lock:
                deliveries = dict(self._deliveries)
        return JobQueueStatistics(
            model=self._predictor.name if self._predictor is not None else "",
            submitted=done.submitted if done is not None else 0,
            finished=done.finished if done is not None else {},
            retries=done.retried if done is not None else 0,
            by_status=by_status,
            run_time=self._run_time.snapshot(),
            webhooks=deliveries,
        )

    def start(self) -> None:
        """Start the worker threads (and webhook delivery); idempotent."""
        with self._lock:
            if self._state == "started":
                return
            if self._state != "new":
                raise Closed("the job queue is closed; make a new JobQueue")
            self._state = "started"
        if self._predictor is not None and self.workers:
            self._predictor.start()
        self._callback_pool = ThreadPoolExecutor(1, thread_name_prefix="servekit-job-callback")
        self._dispatcher = self._spawn(self._dispatch, "servekit-job-dispatcher")
        if self.workers:
            self._spawn(self._commit_loop, "servekit-job-committer")
            for _ in range(self.workers):
                self._spawn_runner()
        if self.webhooks is not None:
            self._spawn(self._deliver_loop, "servekit-job-webhooks")

    async def astart(self) -> None:
        """:meth:`start` from async code."""
        await anyio.to_thread.run_sync(self.start)

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _spawn_runner(self) -> None:
        thread = threading.Thread(target=self._run_jobs, name="servekit-job-runner", daemon=True)
        thread.start()

    def close(self, grace_s: float = 30.0) -> None:
        """Stop claiming jobs, wait up to ``grace_s`` for running ones, and stop.

        Jobs still running after the grace stay running in the store and are re-queued
        once their lease runs out; pending webhooks stay pending for the next queue.
        Closing twice does nothing.
        """
        with self._lock:
            if self._state in ("closing", "closed"):
                return
            started, self._state = self._state == "started", "closing"
        if started:
            deadline = time.monotonic() + grace_s
            self._stop.set()
            self._wake.set()
            if self._dispatcher is not None:
                self._dispatcher.join(max(0.1, deadline - time.monotonic()))
            # Jobs claimed ahead and not started go back to the queue now, for other
            # workers, instead of waiting out their lease.
            waiting = []
            while True:
                try:
                    item = self._ready.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    waiting.append(item)
            self._hand_back(waiting)
            with self._lock:
                while self._held and time.monotonic() < deadline:
                    self._changed.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            for _ in range(self.workers):
                self._ready.put(None)
            self._outcomes.put(None)
            for thread in self._threads:
                thread.join(max(0.1, deadline - time.monotonic()))
            if self._callback_pool is not None:
                self._callback_pool.shutdown(wait=True)
        if self._owns_predictor and self._predictor is not None:
            self._predictor.close()
        if self._owns_store:
            self._store.close()
        with self._lock:
            self._state = "closed"

    async def aclose(self, grace_s: float = 30.0) -> None:
        """:meth:`close` from async code."""
        await anyio.to_thread.run_sync(self.close, grace_s)

    def __enter__(self) -> JobQueue:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> JobQueue:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the caller's side -------------------------------------------------------------

    def submit(
        self,
        x: Any,
        *,
        callback: Callable[[Job], Any] | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
    ) -> Job:
        """Store a job for ``x`` and return it (queued) once it is committed.

        ``callback(job)`` is called in this process with the finished job; ``webhook``
        is a URL the outcome is posted to, signed (needs ``webhooks=`` on the queue).
        With ``idempotency_key`` a resubmit of the same input returns the same job, and
        a different input raises :class:`~servekit.IdempotencyConflict`. ``timeout_s``,
        ``ttl_s`` and ``max_attempts`` override the queue's defaults for this job.

        Raises :class:`~servekit.InvalidInput` if the predictor validates inputs and
        ``x`` fails its signature, :class:`~servekit.InvalidJobPayload` if ``x`` is not
        JSON (numpy arrays allowed), :class:`~servekit.WebhookRefused` for a URL that is
        not allowed, :class:`~servekit.StoreUnavailable` if the store cannot take it.
        """
        if self._state in ("closing", "closed"):
            raise Closed("the job queue is closed; make a new JobQueue")
        if webhook is not None:
            if self.webhooks is None:
                raise ValueError(
                    "submit(webhook=...) needs JobQueue(webhooks=Webhooks(secret=...)) to "
                    "sign deliveries"
                )
            self.webhooks.check_url(webhook)
        if self._predictor is not None:
            self._predictor.signature.validate(x)  # InvalidInput now, not in the worker
        job = self._store.submit(
            x,
            idempotency_key=idempotency_key,
            max_attempts=self.max_attempts if max_attempts is None else max_attempts,
            ttl_s=self.ttl_s if ttl_s is None else ttl_s,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            webhook_url=webhook,
        )
        if callback is not None:
            with self._lock:
                self._callbacks[job.id] = callback
            if job.status.terminal:  # an idempotent resubmit of a finished job
                self._notify(job)
        if self._state == "new" and self.workers:
            self.start()
        self._wake.set()
        return job

    async def asubmit(
        self,
        x: Any,
        *,
        callback: Callable[[Job], Any] | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
    ) -> Job:
        """:meth:`submit` from async code (the commit runs on a worker thread)."""
        return await anyio.to_thread.run_sync(
            lambda: self.submit(
                x,
                callback=callback,
                webhook=webhook,
                idempotency_key=idempotency_key,
                timeout_s=timeout_s,
                ttl_s=ttl_s,
                max_attempts=max_attempts,
            )
        )

    def get(self, job_id: str) -> Job:
        """The job as it is now; :class:`~servekit.JobNotFound` for an unknown id."""
        return self._store.get(job_id)

    async def aget(self, job_id: str) -> Job:
        """:meth:`get` from async code."""
        return await anyio.to_thread.run_sync(self._store.get, job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one never runs; a running one ends cancelled when its
        attempt ends (its result is dropped), or succeeded if it finished first. The
        job as it is after the request is returned; a finished job is left alone."""
        job = self._store.cancel(job_id)
        with self._lock:
            running = self._held.get(job_id)
            if running is not None and running.runner is None:
                running.cancel = True  # claimed ahead by this queue: it will not start
        if job.status.terminal:
            self._notify(job)
        return job

    async def acancel(self, job_id: str) -> Job:
        """:meth:`cancel` from async code."""
        return await anyio.to_thread.run_sync(self.cancel, job_id)

    def list(self, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        """Up to ``limit`` jobs, oldest first, optionally only those with ``status``."""
        return self._store.list(status, limit)

    async def alist(self, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        """:meth:`list` from async code."""
        return await anyio.to_thread.run_sync(self._store.list, status, limit)

    def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """Block until the job is finished and return it; raises
        :class:`~servekit.DeadlineExceeded` if ``timeout_s`` passes first (the job goes
        on; wait again or poll). Jobs this queue runs wake the waiter at once; jobs run
        elsewhere are polled every ``poll_interval_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self._store.get(job_id)
            if job.status.terminal:
                return job
            remaining = self.poll_interval_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _still(job, timeout_s)
                remaining = min(remaining, left)
            with self._lock:
                self._changed.wait(remaining)

    async def await_job(self, job_id: str, timeout_s: float | None = None) -> Job:
        """:meth:`wait` from async code (``await`` is a keyword, hence the name); polls
        every ``poll_interval_s`` and can be cancelled."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = min(0.005, self.poll_interval_s)
        while True:
            job = await anyio.to_thread.run_sync(self._store.get, job_id)
            if job.status.terminal:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise _still(job, timeout_s)
            sleep = delay if deadline is None else min(delay, deadline - time.monotonic())
            await anyio.sleep(max(0.0, sleep))
            delay = min(delay * 2, self.poll_interval_s)

    def purge(self) -> int:
        """Delete finished jobs older than ``result_ttl_s`` now (the dispatcher also
        does it periodically); return how many."""
        return self._store.purge(self.result_ttl_s)

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

    # --- webhooks ------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        webhooks = self.webhooks
        assert webhooks is not None
        # A delivery is held for longer than one attempt can take, then due again.
        hold_s = webhooks.connect_timeout_s + webhooks.read_timeout_s + 5.0
        # At most max_concurrency deliveries in flight; a slot is refilled as soon as it
        # frees, so a slow receiver takes one slot (for at most its timeouts) and the
        # other receivers keep being served (CB-02).
        slots = threading.Semaphore(webhooks.max_concurrency)
        freed = threading.Event()

        def run(job: Job) -> None:
            try:
                self._deliver_one(job)
            finally:
                slots.release()
                freed.set()

        with ThreadPoolExecutor(
            webhooks.max_concurrency, thread_name_prefix="servekit-webhook"
        ) as pool:
            while not self._stop.is_set():
                free = 0
                while slots.acquire(blocking=False):
                    free += 1
                due: builtins.list[Job] = []
                if free:
                    try:
                        due = self._store.claim_deliveries(hold_s, limit=free)
                    except StoreUnavailable as exc:
                        _log.warning("job store unavailable for webhooks, retrying: %s", exc)
                for job in due:
                    pool.submit(run, job)
                for _ in range(free - len(due)):
                    slots.release()
                if len(due) < free or free == 0:
                    freed.wait(self.poll_interval_s)
                    freed.clear()

    def _deliver_one(self, job: Job) -> None:
        webhooks = self.webhooks
        assert webhooks is not None
        assert job.webhook_url is not None
        body = webhook_body(job)
        error: str | None
        try:
            result = deliver(webhooks, job.webhook_url, webhook_id(job), body)
        except Exception as exc:  # never let one delivery stop the loop
            _log.exception("webhook delivery of job %s raised", job.id[:6])
            delivered, error, retryable = False, f"{type(exc).__name__}: {exc}", True
        else:
            delivered, error, retryable = result.delivered, result.error, result.retryable
        attempts = job.callback_attempts + 1
        retry_in = None
        if not delivered and retryable and attempts < webhooks.max_attempts:
            retry_in = webhooks.backoff(attempts)
        kind = "delivered" if delivered else "retrying" if retry_in is not None else "failed"
        with self._deliveries_lock:
            self._deliveries[kind] += 1
        try:
            self._store.record_delivery(
                job.id, delivered=delivered, error=error, retry_in_s=retry_in
            )
        except ServekitError as exc:
            _log.error("webhook delivery of job %s not recorded: %s", job.id[:6], exc)


def webhook_id(job: Job) -> str:
    """The ``webhook-id`` of a job's notification: the same on every retry, so a
    receiver can drop duplicates."""
    return f"msg_{job.id}"


def webhook_body(job: Job) -> bytes:
    """The JSON body posted for a finished job, in the Standard Webhooks shape
    ``{"type", "timestamp", "data"}``; ``data`` is what polling shows."""
    finished = job.finished_at if job.finished_at is not None else time.time()
    payload = {
        "type": f"job.{job.status.value}",
        "timestamp": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
        "data": job_dict(job),
    }
    from ._records import encode_payload

    return encode_payload(payload).encode("utf-8")


def job_dict(job: Job) -> dict[str, Any]:
    """The public fields of a job as a JSON-ready dict (numpy arrays left as arrays;
    :func:`encode_payload` encodes them)."""
    return {
        "id": job.id,
        "status": job.status.value,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "progress": job.progress,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


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


def _still(job: Job, timeout_s: float | None) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"job {job.id[:6]}... is still {job.status.value} after {timeout_s} s; it goes on: "
        "wait again or poll with get()"
    )
