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

The threads' code is in mixins of :class:`JobQueue`: ``_queue_workers`` (dispatcher,
runners, committer, callbacks) and ``_queue_webhooks`` (deliverer). This module holds
the queue's configuration, its lifecycle and the caller's side.
"""

from __future__ import annotations

import builtins
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread

from .._predictor import Predictor
from ..errors import Closed, DeadlineExceeded, StoreUnavailable
from ..metrics import Histogram
from ._counts import JobQueueStatistics
from ._queue_webhooks import _WebhookDeliverer
from ._queue_workers import _Outcome, _Running, _Workers
from ._records import Job, JobStatus
from ._sqlite import SQLiteJobStore
from ._store import JobStore, check_positive
from ._webhooks import Webhooks

__all__ = ["DEFAULT_STORE_PATH", "JobQueue"]

#: Where ``JobQueue()`` keeps its jobs when no store is given (relative to the
#: current directory).
DEFAULT_STORE_PATH = "servekit-jobs.sqlite3"


class JobQueue(_Workers, _WebhookDeliverer):
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


def _still(job: Job, timeout_s: float | None) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"job {job.id[:6]}... is still {job.status.value} after {timeout_s} s; it goes on: "
        "wait again or poll with get()"
    )
