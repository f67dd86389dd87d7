"""servekit.jobs: asynchronous inference jobs.

This first layer is the durable job store: :class:`SQLiteJobStore` (the default, one
SQLite file shared by threads and processes) and :class:`MemoryJobStore` (tests and
notebooks), both implementing the :class:`JobStore` protocol.

>>> from servekit.jobs import MemoryJobStore
>>> store = MemoryJobStore()
>>> job = store.submit({"text": "hello"})
>>> job.status
<JobStatus.QUEUED: 'queued'>
"""

from __future__ import annotations

from ._records import (
    IdempotencyConflict,
    InvalidJobPayload,
    Job,
    JobNotFound,
    JobStatus,
    StoreUnavailable,
    decode_payload,
    encode_payload,
)
from ._sqlite import SQLiteJobStore
from ._store import JobStore, MemoryJobStore

# Sorted; tests/jobs/test_job_stores.py checks it lists every public name.
__all__ = [
    "IdempotencyConflict",
    "InvalidJobPayload",
    "Job",
    "JobNotFound",
    "JobStatus",
    "JobStore",
    "MemoryJobStore",
    "SQLiteJobStore",
    "StoreUnavailable",
    "decode_payload",
    "encode_payload",
]
