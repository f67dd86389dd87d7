"""servekit.jobs: asynchronous inference with durable jobs.

Submit now, get a job id, poll it or be called back; the work runs in the background,
in this process or in ``servekit jobs worker`` processes sharing the store.

- :class:`JobQueue` submits jobs and runs workers over a predictor.
- :class:`SQLiteJobStore` (the default, one SQLite file shared by threads and
  processes) and :class:`MemoryJobStore` (tests and notebooks) keep the jobs; both
  implement the :class:`JobStore` protocol.
- :class:`Webhooks` signs and delivers job outcomes to URLs (Standard Webhooks).

>>> import servekit as sk
>>> from servekit.jobs import JobQueue, MemoryJobStore
>>> with JobQueue(sk.Predictor(lambda xs: [x + 1 for x in xs]), store=MemoryJobStore()) as q:
...     job = q.submit(1)
...     q.wait(job.id, timeout_s=10).status
<JobStatus.SUCCEEDED: 'succeeded'>
"""

from __future__ import annotations

from ._counts import JobQueueStatistics, JobStoreStatistics
from ._queue import JobQueue
from ._queue_webhooks import webhook_body
from ._queue_workers import report_progress
from ._records import (
    CallbackState,
    IdempotencyConflict,
    InvalidJobPayload,
    Job,
    JobNotFound,
    JobStatus,
    StoreUnavailable,
    decode_payload,
    encode_payload,
    job_dict,
)
from ._sqlite import SQLiteJobStore
from ._store import JobStore, MemoryJobStore
from ._webhooks import DeliveryResult, Webhooks, deliver, generate_secret, sign

# Sorted; tests/jobs/test_job_stores.py checks it lists every public name.
__all__ = [
    "CallbackState",
    "DeliveryResult",
    "IdempotencyConflict",
    "InvalidJobPayload",
    "Job",
    "JobNotFound",
    "JobQueue",
    "JobQueueStatistics",
    "JobStatus",
    "JobStore",
    "JobStoreStatistics",
    "MemoryJobStore",
    "SQLiteJobStore",
    "StoreUnavailable",
    "Webhooks",
    "decode_payload",
    "deliver",
    "encode_payload",
    "generate_secret",
    "job_dict",
    "report_progress",
    "sign",
    "webhook_body",
]
