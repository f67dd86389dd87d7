"""The JobStore protocol, the state transitions every store applies, and MemoryJobStore.

Both stores apply the same pure functions below to a :class:`Job` snapshot and persist
what they return, so the rules (JB-06) live in one place:

- **claim** sweeps first: a running job whose lease ran out goes back to queued (at
  least once delivery), or fails with ``worker_lost`` once it used all its attempts, or
  becomes cancelled if a cancel was requested; a queued job past its queue TTL expires.
  Then the oldest available queued jobs become running with ``attempts + 1``.
- **complete / fail / heartbeat / set_progress** count only from the worker that holds
  the job; a worker whose job was re-queued or re-claimed gets ``False`` and its result
  is dropped (another attempt owns the job now).
- **cancel** of a queued job cancels it; of a running job sets ``cancel_requested``,
  which the worker's ``complete`` or ``fail`` resolves to cancelled (the result of a
  cancelled job is dropped: the caller asked for it not to be done).
- A terminal job is never changed again; ``purge`` deletes it after its retention.

Expiry and lost leases are applied by ``claim`` (and queue TTLs also by ``purge``); a
store runs no background thread, so ``get`` between sweeps can still show a job queued
past its TTL.
"""

from __future__ import annotations

import builtins
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ._counts import JobStoreStatistics, StoreCounts
from ._records import (
    CallbackState,
    IdempotencyConflict,
    Job,
    JobNotFound,
    JobStatus,
    StoreUnavailable,
    decode_payload,
    encode_payload,
    payload_hash,
)

__all__ = ["JobStore", "MemoryJobStore"]

#: Error code of a job whose worker's lease ran out on its last attempt.
WORKER_LOST = "worker_lost"


@runtime_checkable
class JobStore(Protocol):
    """Durable storage of jobs: what the job queue and its workers call.

    ``submit`` returns only after the job is stored (for SQLite: committed to disk, JB-01).
    Every method is safe to call from several threads; SQLite stores are also safe from
    several processes sharing one file.
    """

    def submit(
        self,
        input: Any,
        *,
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        webhook_url: str | None = None,
    ) -> Job:
        """Store a new queued job and return it.

        With ``idempotency_key``, a resubmit of the same input returns the existing job
        (while it is retained); a different input raises :class:`IdempotencyConflict`.
        ``ttl_s`` is how long the job may wait unclaimed before it expires; ``timeout_s``
        how long one attempt may run (the worker enforces it). ``webhook_url`` (already
        checked by the caller) makes the job's callback pending when it finishes.
        """
        ...

    def get(self, id: str) -> Job:
        """The job with this id; :class:`JobNotFound` if there is none."""
        ...

    def claim(self, worker_id: str, lease_s: float, limit: int = 1) -> builtins.list[Job]:
        """Move up to ``limit`` available queued jobs, oldest first, to running for
        ``worker_id`` with a lease of ``lease_s`` seconds; return them (maybe none)."""
        ...

    def heartbeat(self, id: str, worker_id: str, lease_s: float) -> bool:
        """Extend the lease to ``lease_s`` from now; False if the worker lost the job."""
        ...

    def heartbeat_many(
        self, worker_id: str, ids: Sequence[str], lease_s: float
    ) -> builtins.list[bool]:
        """:meth:`heartbeat` for several jobs in one write; one bool per id."""
        ...

    def complete(self, id: str, worker_id: str, result: Any) -> bool:
        """Record the result (succeeded, or cancelled if a cancel was requested); False
        if the worker no longer holds the job, in which case nothing changes."""
        ...

    def complete_many(
        self, worker_id: str, results: Sequence[tuple[str, Any]]
    ) -> builtins.list[bool]:
        """:meth:`complete` for several ``(id, result)`` pairs in one write (one commit:
        what lets a worker keep up with many small jobs); one bool per pair. A result
        that cannot be stored raises :class:`InvalidJobPayload` before anything is
        written."""
        ...

    def fail(
        self, id: str, worker_id: str, error: dict[str, str], *, retry: bool, backoff_s: float
    ) -> bool:
        """Record an error ``{"code", "message"}``. With ``retry`` and attempts left the job
        is re-queued, claimable after ``backoff_s``; else it fails. False if the worker no
        longer holds the job."""
        ...

    def cancel(self, id: str) -> Job:
        """Cancel a queued job, or request cancellation of a running one; a terminal job
        is returned unchanged."""
        ...

    def set_progress(self, id: str, worker_id: str, progress: float) -> bool:
        """Record progress in [0, 1]; False if the worker no longer holds the job."""
        ...

    def release(self, worker_id: str, ids: Sequence[str]) -> builtins.list[bool]:
        """Hand back jobs the worker claimed but never started (it is stopping, or the
        job's queue TTL passed while it waited): they are queued again at once,
        claimable by any worker. ``attempts`` is left as it is (it never decreases) and
        the next claim does not add one: a job handed back is not charged an attempt
        for a run that never happened. A cancel requested meanwhile cancels the job,
        and a passed queue TTL expires it. One bool per id: False if the worker did not hold it."""
        ...

    def list(self, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        """Up to ``limit`` jobs, oldest first, optionally only those with ``status``."""
        ...

    def purge(self, older_than_s: float) -> int:
        """Delete terminal jobs finished more than ``older_than_s`` ago; return how many.
        A job whose webhook is still pending is kept until the delivery ends."""
        ...

    def claim_deliveries(self, lease_s: float, limit: int = 1) -> builtins.list[Job]:
        """Up to ``limit`` finished jobs whose webhook is due, oldest first; each is held
        back from other callers for ``lease_s`` (a sender that dies mid-delivery leaves
        it due again after that: at least once, CB-03)."""
        ...

    def record_delivery(
        self, id: str, *, delivered: bool, error: str | None, retry_in_s: float | None
    ) -> None:
        """Record one delivery attempt: delivered; or failed, due again in
        ``retry_in_s`` seconds, or failed for good when ``retry_in_s`` is None."""
        ...

    def close(self) -> None:
        """Release the store's resources; calling it again does nothing."""
        ...


# --- validation shared by the stores -------------------------------------------------


def new_job_id() -> str:
    """A fresh job id: 128 random bits, URL-safe, 22 characters (SEC-10), never
    starting with ``-``: such an id reads as an option on a command line
    (``servekit jobs show -AbC...`` fails), one id in 64 before this rule."""
    while True:
        job_id = secrets.token_urlsafe(16)
        if not job_id.startswith("-"):
            return job_id


def check_positive(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0."""
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def check_submit(max_attempts: int, ttl_s: float | None, timeout_s: float | None = None) -> None:
    """Validate ``submit``'s options."""
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    if ttl_s is not None:
        check_positive("ttl_s", ttl_s)
    if timeout_s is not None:
        check_positive("timeout_s", timeout_s)


def check_limit(limit: int) -> None:
    """Raise ValueError unless ``limit`` is an int >= 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")


def check_error(error: dict[str, str]) -> dict[str, str]:
    """Return a copy of a job error; it must hold string ``code`` and ``message``."""
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ValueError(f"a job error needs string 'code' and 'message', got {error!r}")
    return {"code": code, "message": message}


def check_progress(progress: float) -> None:
    """Raise ValueError unless 0 <= ``progress`` <= 1."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")


def not_found(id: str) -> JobNotFound:
    """The one error for an unknown or purged id (they must look alike: SEC-10)."""
    # Ids are capabilities; echo only a prefix so logs do not hold whole ids.
    return JobNotFound(f"no job with id {id[:6]!r}...; it never existed or was purged")


def idempotency_conflict(key: str) -> IdempotencyConflict:
    """The error for a reused idempotency key with a different input."""
    return IdempotencyConflict(
        f"idempotency key {key!r} was already used with a different input; use a new key "
        "for a new input",
        idempotency_key=key,
    )


# --- state transitions: pure functions of a snapshot ---------------------------------
# ``input`` and ``result`` are carried through unchanged (stores keep them encoded).


def new_job(
    id: str,
    *,
    now: float,
    max_attempts: int,
    ttl_s: float | None,
    idempotency_key: str | None,
    digest: str,
    timeout_s: float | None = None,
    webhook_url: str | None = None,
) -> Job:
    """A freshly submitted queued job (input left as None: stores keep it encoded)."""
    return Job(
        id=id,
        status=JobStatus.QUEUED,
        input=None,
        result=None,
        error=None,
        attempts=0,
        max_attempts=max_attempts,
        created_at=now,
        started_at=None,
        finished_at=None,
        lease_expires_at=None,
        progress=None,
        idempotency_key=idempotency_key,
        payload_hash=digest,
        available_at=now,
        expires_at=None if ttl_s is None else now + ttl_s,
        timeout_s=timeout_s,
        webhook_url=webhook_url,
    )


def finish(job: Job, status: JobStatus, now: float, **changes: Any) -> Job:
    """``job`` moved to terminal ``status`` at ``now`` (lease and worker cleared). Its
    webhook, if it has one, becomes due in the same write: a crash right after cannot
    lose the notification (CB-03)."""
    # max(): the clock may step back (NTP); finished_at >= started_at must hold anyway.
    floor = job.started_at if job.started_at is not None else job.created_at
    if job.webhook_url is not None:
        changes.update(callback_state=CallbackState.PENDING, callback_next_at=now)
    return dataclasses.replace(
        job,
        status=status,
        finished_at=max(now, floor),
        lease_expires_at=None,
        worker_id=None,
        **changes,
    )


def swept(job: Job, now: float) -> Job | None:
    """What ``claim``'s sweep makes of ``job`` at ``now``; None if it stays as it is."""
    if job.status is JobStatus.QUEUED and job.expires_at is not None and job.expires_at <= now:
        return finish(job, JobStatus.EXPIRED, now)
    if (
        job.status is JobStatus.RUNNING
        and job.lease_expires_at is not None
        and job.lease_expires_at <= now
    ):
        if job.cancel_requested:
            return finish(job, JobStatus.CANCELLED, now)
        if job.attempts >= job.max_attempts:
            error = {
                "code": WORKER_LOST,
                "message": f"the worker's lease ran out on attempt {job.attempts} of "
                f"{job.max_attempts} (the worker died or stopped heartbeating)",
            }
            return finish(job, JobStatus.FAILED, now, error=error, progress=job.progress)
        # Re-queued, claimable at once; its queue TTL counted from submit still applies.
        return dataclasses.replace(
            job, status=JobStatus.QUEUED, lease_expires_at=None, worker_id=None, available_at=now
        )
    return None


def claimable(job: Job, now: float) -> bool:
    """True if a (swept) job may be claimed at ``now``."""
    return job.status is JobStatus.QUEUED and job.available_at <= now


def claimed(job: Job, worker_id: str, now: float, lease_s: float) -> Job:
    """``job`` claimed by ``worker_id``: running, one more attempt, a fresh lease."""
    return dataclasses.replace(
        job,
        status=JobStatus.RUNNING,
        attempts=job.attempts if job.handed_back else job.attempts + 1,
        handed_back=False,
        started_at=max(now, job.created_at),
        lease_expires_at=now + lease_s,
        worker_id=worker_id,
        progress=None,
    )


def held_by(job: Job, worker_id: str) -> bool:
    """True if ``worker_id`` holds ``job`` (running under its lease or past it, as long
    as no sweep has taken the job back)."""
    return job.status is JobStatus.RUNNING and job.worker_id == worker_id


def completed(job: Job, now: float) -> Job:
    """A held job finished with a result (the caller stores the result itself)."""
    if job.cancel_requested:
        return finish(job, JobStatus.CANCELLED, now)
    return finish(job, JobStatus.SUCCEEDED, now, error=None)


def failed(job: Job, now: float, error: dict[str, str], retry: bool, backoff_s: float) -> Job:
    """A held job whose attempt failed: re-queued for a retry, else failed."""
    if job.cancel_requested:
        return finish(job, JobStatus.CANCELLED, now, error=error)
    if retry and job.attempts < job.max_attempts:
        return dataclasses.replace(
            job,
            status=JobStatus.QUEUED,
            error=error,
            lease_expires_at=None,
            worker_id=None,
            available_at=now + backoff_s,
        )
    return finish(job, JobStatus.FAILED, now, error=error)


def released(job: Job, now: float) -> Job:
    """A held job handed back unstarted (see :meth:`JobStore.release`): queued again,
    or cancelled if a cancel was requested, or expired if its queue TTL has passed (it
    never ran, so the queue TTL still applies)."""
    if job.cancel_requested:
        return finish(job, JobStatus.CANCELLED, now)
    if job.expires_at is not None and job.expires_at <= now:
        return finish(job, JobStatus.EXPIRED, now)
    return dataclasses.replace(
        job,
        status=JobStatus.QUEUED,
        lease_expires_at=None,
        worker_id=None,
        available_at=now,
        progress=None,
        handed_back=True,
    )


def cancelled(job: Job, now: float) -> Job | None:
    """What ``cancel`` makes of ``job``; None if nothing changes."""
    if job.status is JobStatus.QUEUED:
        return finish(job, JobStatus.CANCELLED, now)
    if job.status is JobStatus.RUNNING and not job.cancel_requested:
        return dataclasses.replace(job, cancel_requested=True)
    return None


def purgeable(job: Job, cutoff: float) -> bool:
    """True if ``job`` is terminal, finished at or before ``cutoff``, and has no webhook
    still to deliver."""
    return (
        job.status.terminal
        and job.finished_at is not None
        and job.finished_at <= cutoff
        and job.callback_state is not CallbackState.PENDING
    )


def delivery_due(job: Job, now: float) -> bool:
    """True if ``job``'s webhook should be sent at ``now``."""
    return (
        job.callback_state is CallbackState.PENDING
        and job.callback_next_at is not None
        and job.callback_next_at <= now
    )


def delivery_recorded(
    job: Job, now: float, delivered: bool, error: str | None, retry_in_s: float | None
) -> Job:
    """``job`` after one delivery attempt (see :meth:`JobStore.record_delivery`)."""
    if job.callback_state is not CallbackState.PENDING:
        return job  # recorded already (two senders raced past a lease): first one wins
    if delivered:
        state, next_at = CallbackState.DELIVERED, None
    elif retry_in_s is None:
        state, next_at = CallbackState.FAILED, None
    else:
        state, next_at = CallbackState.PENDING, now + max(0.0, retry_in_s)
    return dataclasses.replace(
        job,
        callback_state=state,
        callback_attempts=job.callback_attempts + 1,
        callback_next_at=next_at,
        callback_error=None if delivered else error,
    )


# --- the in-memory store ---------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Entry:
    job: Job  # with input and result None: the encoded texts below are the truth
    input_text: str
    result_text: str | None = None


class MemoryJobStore:
    """A :class:`JobStore` in this process's memory, for tests and notebooks.

    Jobs are lost when the process exits. Inputs and results are encoded as JSON exactly
    as the SQLite store encodes them, so both accept and return the same values, and a
    caller mutating its input after ``submit`` does not change the stored job.

    ``clock`` returns the time in epoch seconds (tests pass a fake one).

    >>> store = MemoryJobStore()
    >>> job = store.submit({"x": 1})
    >>> [j.id for j in store.claim("w1", lease_s=30)] == [job.id]
    True
    >>> store.complete(job.id, "w1", {"y": 2}), store.get(job.id).result
    (True, {'y': 2})
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # One lock over everything: every operation is a few dict operations, so a
        # finer scheme would buy nothing and risk torn multi-job updates (claim, purge).
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}  # insertion order = submission order
        self._keys: dict[str, str] = {}  # idempotency key -> job id
        self._closed = False
        self._counts = StoreCounts()

    def _put(self, entry: _Entry, new: Job) -> None:
        # Caller holds self._lock. Every status change goes through here, to be counted.
        self._counts.note(entry.job.status, new)
        entry.job = new

    def statistics(self) -> JobStoreStatistics:
        """What this store did so far: jobs stored, re-queued, moved to a final status."""
        return self._counts.snapshot()

    def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs the store holds in each status (a pass over the jobs in
        memory)."""
        with self._lock:
            self._check_open()
            counts = dict.fromkeys(JobStatus, 0)
            for entry in self._entries.values():
                counts[entry.job.status] += 1
            return counts

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the job store is closed; open a new one")

    def _entry(self, id: str) -> _Entry:
        entry = self._entries.get(id)
        if entry is None:
            raise not_found(id)
        return entry

    @staticmethod
    def _public(entry: _Entry) -> Job:
        # Decode on every read so no two callers share a mutable input or result.
        result = None if entry.result_text is None else decode_payload(entry.result_text)
        return dataclasses.replace(entry.job, input=decode_payload(entry.input_text), result=result)

    def submit(
        self,
        input: Any,
        *,
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        webhook_url: str | None = None,
    ) -> Job:
        """See :meth:`JobStore.submit`."""
        check_submit(max_attempts, ttl_s, timeout_s)
        text = encode_payload(input)
        digest = payload_hash(text)
        with self._lock:
            self._check_open()
            if idempotency_key is not None and idempotency_key in self._keys:
                entry = self._entries[self._keys[idempotency_key]]
                if entry.job.payload_hash != digest:
                    raise idempotency_conflict(idempotency_key)
                return self._public(entry)
            job = new_job(
                new_job_id(),
                now=self._clock(),
                max_attempts=max_attempts,
                ttl_s=ttl_s,
                idempotency_key=idempotency_key,
                digest=digest,
                timeout_s=timeout_s,
                webhook_url=webhook_url,
            )
            self._entries[job.id] = _Entry(job, text)
            self._counts.note(None, job)
            if idempotency_key is not None:
                self._keys[idempotency_key] = job.id
            return self._public(self._entries[job.id])

    def get(self, id: str) -> Job:
        """See :meth:`JobStore.get`."""
        with self._lock:
            self._check_open()
            return self._public(self._entry(id))

    def _sweep(self, now: float) -> None:
        for entry in self._entries.values():
            new = swept(entry.job, now)
            if new is not None:
                self._put(entry, new)

    def claim(self, worker_id: str, lease_s: float, limit: int = 1) -> builtins.list[Job]:
        """See :meth:`JobStore.claim`."""
        check_positive("lease_s", lease_s)
        check_limit(limit)
        with self._lock:
            self._check_open()
            now = self._clock()
            self._sweep(now)
            out: builtins.list[Job] = []
            for entry in self._entries.values():
                if len(out) >= limit:
                    break
                if claimable(entry.job, now):
                    entry.job = claimed(entry.job, worker_id, now, lease_s)
                    out.append(self._public(entry))
            return out

    def heartbeat(self, id: str, worker_id: str, lease_s: float) -> bool:
        """See :meth:`JobStore.heartbeat`."""
        check_positive("lease_s", lease_s)
        with self._lock:
            self._check_open()
            entry = self._entry(id)
            if not held_by(entry.job, worker_id):
                return False
            entry.job = dataclasses.replace(entry.job, lease_expires_at=self._clock() + lease_s)
            return True

    def heartbeat_many(
        self, worker_id: str, ids: Sequence[str], lease_s: float
    ) -> builtins.list[bool]:
        """See :meth:`JobStore.heartbeat_many`."""
        check_positive("lease_s", lease_s)
        return self._each_held(
            worker_id,
            ids,
            lambda job: dataclasses.replace(job, lease_expires_at=self._clock() + lease_s),
        )

    def _each_held(
        self, worker_id: str, ids: Sequence[str], change: Callable[[Job], Job]
    ) -> builtins.list[bool]:
        """Apply ``change`` to each job of ``ids`` the worker holds; one bool per id."""
        with self._lock:
            self._check_open()
            out = []
            for id in ids:
                entry = self._entries.get(id)
                if entry is not None and held_by(entry.job, worker_id):
                    self._put(entry, change(entry.job))
                    out.append(True)
                else:
                    out.append(False)
            return out

    def complete(self, id: str, worker_id: str, result: Any) -> bool:
        """See :meth:`JobStore.complete`."""
        with self._lock:
            self._check_open()
            self._entry(id)  # unknown id: JobNotFound, as the protocol says
        return self.complete_many(worker_id, [(id, result)])[0]

    def complete_many(
        self, worker_id: str, results: Sequence[tuple[str, Any]]
    ) -> builtins.list[bool]:
        """See :meth:`JobStore.complete_many`."""
        texts = [(id, encode_payload(result)) for id, result in results]
        with self._lock:
            self._check_open()
            out = []
            for id, text in texts:
                entry = self._entries.get(id)
                if entry is None or not held_by(entry.job, worker_id):
                    out.append(False)
                    continue
                self._put(entry, completed(entry.job, self._clock()))
                if entry.job.status is JobStatus.SUCCEEDED:
                    entry.result_text = text
                out.append(True)
            return out

    def fail(
        self, id: str, worker_id: str, error: dict[str, str], *, retry: bool, backoff_s: float
    ) -> bool:
        """See :meth:`JobStore.fail`."""
        error = check_error(error)
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        with self._lock:
            self._check_open()
            entry = self._entry(id)
            if not held_by(entry.job, worker_id):
                return False
            self._put(entry, failed(entry.job, self._clock(), error, retry, backoff_s))
            return True

    def cancel(self, id: str) -> Job:
        """See :meth:`JobStore.cancel`."""
        with self._lock:
            self._check_open()
            entry = self._entry(id)
            new = cancelled(entry.job, self._clock())
            if new is not None:
                self._put(entry, new)
            return self._public(entry)

    def set_progress(self, id: str, worker_id: str, progress: float) -> bool:
        """See :meth:`JobStore.set_progress`."""
        check_progress(progress)
        with self._lock:
            self._check_open()
            entry = self._entry(id)
            if not held_by(entry.job, worker_id):
                return False
            entry.job = dataclasses.replace(entry.job, progress=float(progress))
            return True

    def list(self, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        """See :meth:`JobStore.list`."""
        check_limit(limit)
        with self._lock:
            self._check_open()
            out: builtins.list[Job] = []
            for entry in self._entries.values():
                if len(out) >= limit:
                    break
                if status is None or entry.job.status is status:
                    out.append(self._public(entry))
            return out

    def purge(self, older_than_s: float) -> int:
        """See :meth:`JobStore.purge`."""
        if not older_than_s >= 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s!r}")
        with self._lock:
            self._check_open()
            now = self._clock()
            for entry in self._entries.values():
                if entry.job.status is JobStatus.QUEUED and swept(entry.job, now) is not None:
                    self._put(entry, finish(entry.job, JobStatus.EXPIRED, now))
            cutoff = now - older_than_s
            doomed = [id for id, e in self._entries.items() if purgeable(e.job, cutoff)]
            for id in doomed:
                key = self._entries.pop(id).job.idempotency_key
                if key is not None:
                    del self._keys[key]
            return len(doomed)

    def release(self, worker_id: str, ids: Sequence[str]) -> builtins.list[bool]:
        """See :meth:`JobStore.release`."""
        return self._each_held(worker_id, ids, lambda job: released(job, self._clock()))

    def claim_deliveries(self, lease_s: float, limit: int = 1) -> builtins.list[Job]:
        """See :meth:`JobStore.claim_deliveries`."""
        check_positive("lease_s", lease_s)
        check_limit(limit)
        with self._lock:
            self._check_open()
            now = self._clock()
            due = [e for e in self._entries.values() if delivery_due(e.job, now)]
            due.sort(key=lambda e: e.job.callback_next_at or 0.0)
            out = []
            for entry in due[:limit]:
                entry.job = dataclasses.replace(entry.job, callback_next_at=now + lease_s)
                out.append(self._public(entry))
            return out

    def record_delivery(
        self, id: str, *, delivered: bool, error: str | None, retry_in_s: float | None
    ) -> None:
        """See :meth:`JobStore.record_delivery`."""
        with self._lock:
            self._check_open()
            entry = self._entry(id)
            entry.job = delivery_recorded(entry.job, self._clock(), delivered, error, retry_in_s)

    def close(self) -> None:
        """See :meth:`JobStore.close`. Drops every job."""
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._keys.clear()
