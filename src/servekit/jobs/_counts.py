"""Counters of the job system: what a store did in this process, and a queue's snapshot.

Stores count the transitions they make as they make them (a submit that stored a new
job, a job moved to a final status, an attempt re-queued for another try), so every
cause is counted where it happens, including the ones no queue sees (a queue TTL that
passed, a lost worker's lease). SQLite stores count a write only once its transaction
has committed. Each count is one integer increment under a lock the store already
holds, or one small lock of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..metrics import HistogramSnapshot
from ._records import Job, JobStatus

__all__ = ["JobQueueStatistics", "JobStoreStatistics", "StoreCounts", "transition"]


def transition(old: JobStatus | None, new: Job) -> str | None:
    """What a write of ``new`` over a job that had status ``old`` (None: a new row)
    counts as: ``"submitted"``, ``"retried"``, a final status's value, or None."""
    if old is None:
        return "submitted"
    if old.terminal or old is new.status:
        return None
    if new.status.terminal:
        return new.status.value
    if old is JobStatus.RUNNING and new.status is JobStatus.QUEUED and not new.handed_back:
        return "retried"  # a retryable error, or a lost lease; a hand-back is no attempt
    return None


@dataclass(frozen=True, slots=True)
class JobStoreStatistics:
    """What a store did in this process (see :meth:`SQLiteJobStore.statistics`)."""

    #: New jobs stored (an idempotent resubmit returns the old job and is not counted).
    submitted: int
    #: Attempts re-queued for another try (a retryable error, or a lost lease).
    retried: int
    #: Jobs moved to each final status (``succeeded``, ``failed``, ``cancelled``,
    #: ``expired``), by status value.
    finished: Mapping[str, int]


class StoreCounts:
    """The counters behind :class:`JobStoreStatistics`; thread-safe."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def note(self, old: JobStatus | None, new: Job) -> None:
        """Count one write (see :func:`transition`)."""
        kind = transition(old, new)
        if kind is not None:
            with self._lock:
                self._counts[kind] = self._counts.get(kind, 0) + 1

    def add(self, kinds: Iterable[str]) -> None:
        """Count writes classified already (a committed transaction's)."""
        with self._lock:
            for kind in kinds:
                self._counts[kind] = self._counts.get(kind, 0) + 1

    def snapshot(self) -> JobStoreStatistics:
        """The counts so far."""
        with self._lock:
            counts = dict(self._counts)
        finished = {s.value: counts.get(s.value, 0) for s in JobStatus if s.terminal}
        return JobStoreStatistics(
            submitted=counts.get("submitted", 0),
            retried=counts.get("retried", 0),
            finished=MappingProxyType(finished),
        )


@dataclass(frozen=True, slots=True)
class JobQueueStatistics:
    """A snapshot of a :class:`JobQueue`'s counters (see :meth:`JobQueue.statistics`).

    ``submitted``, ``finished`` and ``retries`` count what this process's store did
    (every JobQueue and worker of the process that shares the store object);
    ``by_status`` is read from the store, so it covers every process sharing it.
    """

    #: The name of the queue's predictor ("" for a submit-only queue).
    model: str
    #: New jobs stored.
    submitted: int
    #: Jobs moved to each final status, by status value.
    finished: Mapping[str, int]
    #: Attempts re-queued for another try.
    retries: int
    #: Jobs in the store now by status value; None if the store cannot count them
    #: (a store without ``count_by_status``, or one unavailable at the moment).
    by_status: Mapping[str, int] | None
    #: Run time of the attempts this queue's runners ran.
    run_time: HistogramSnapshot
    #: Webhook delivery attempts by outcome (``delivered``; ``retrying``: failed, to be
    #: sent again; ``failed``: given up); None without webhooks.
    webhooks: Mapping[str, int] | None = field(default=None)
