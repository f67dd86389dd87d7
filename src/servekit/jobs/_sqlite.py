"""SQLiteJobStore: the default durable job store, one SQLite file shared by processes.

Decisions:

- **Durability (JB-01, JB-10).** WAL journal with ``synchronous=FULL``: a transaction is
  on disk (fsynced) when COMMIT returns, so a job ``submit`` acknowledged survives a
  process kill *and* a power loss. ``synchronous="NORMAL"`` is an opt-in that survives a
  process crash but may lose the last commits on power loss.
- **Writers (JB-09).** Every write is one ``BEGIN IMMEDIATE`` transaction: it takes the
  database's write lock up front, so two processes never both read a queued job and
  claim it (a deferred transaction would find out only at its first write, with a
  SQLITE_BUSY that retrying cannot fix). Waiting for the lock is bounded by
  ``busy_timeout`` (``busy_timeout_s``, 5 s by default).
- **One connection per store, guarded by a lock**, rather than one per thread. SQLite
  admits one writer at a time anyway and every transaction here is short, so
  per-thread connections would add no write throughput; a single connection is closed
  deterministically by :meth:`close` (thread-local connections of finished threads
  would be left to the garbage collector, unclosed), and threads of one process never
  contend on the file lock, only on a Python lock. Processes each open their own store.
- **Failures (JB-11).** ``sqlite3.OperationalError`` (disk full, read-only file, lock
  held beyond the timeout, I/O error) rolls the transaction back and raises
  :class:`StoreUnavailable`, whose message names the cause and the fix: no job is ever
  half-written, and the store works again once the cause is gone.
- **Schema.** ``PRAGMA user_version`` holds the schema version; a file from a newer
  servekit is refused at open rather than misread.
- **Payloads (JB-14).** Inputs and results are JSON text columns; a row holding anything
  else (a pickle) is refused on read. ``claim`` fails such a job with ``invalid_payload``
  instead of handing it to a worker or stalling the queue on it.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._records import (
    InvalidJobPayload,
    Job,
    JobStatus,
    StoreUnavailable,
    decode_payload,
    encode_payload,
    payload_hash,
)
from ._store import cancelled as _cancelled
from ._store import (
    check_error,
    check_limit,
    check_positive,
    check_progress,
    check_submit,
    claimable,
    claimed,
    completed,
    failed,
    finish,
    held_by,
    idempotency_conflict,
    new_job,
    new_job_id,
    not_found,
    purgeable,
    swept,
)

__all__ = ["SCHEMA_VERSION", "SQLiteJobStore"]

#: Version of the table layout, kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order (FIFO claims)
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    input TEXT NOT NULL,                    -- JSON (never pickle)
    result TEXT,                            -- JSON, set only when succeeded
    error TEXT,                             -- JSON {"code", "message"}
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    lease_expires_at REAL,
    progress REAL,
    idempotency_key TEXT UNIQUE,            -- NULLs never collide
    payload_hash TEXT NOT NULL,
    worker_id TEXT,
    cancel_requested INTEGER NOT NULL,
    available_at REAL NOT NULL,
    expires_at REAL
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_by_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
"""

# Every column but input and result, in the order _job() reads them.
_META = (
    "id, status, error, attempts, max_attempts, created_at, started_at, finished_at, "
    "lease_expires_at, progress, idempotency_key, payload_hash, worker_id, cancel_requested, "
    "available_at, expires_at"
)
_UPDATE = (
    "UPDATE jobs SET status=?, error=?, attempts=?, started_at=?, finished_at=?, "
    "lease_expires_at=?, progress=?, worker_id=?, cancel_requested=?, available_at=? "
    "WHERE id=?"
)
_SYNCHRONOUS = ("FULL", "NORMAL")


def _job(row: tuple[Any, ...], input: Any = None, result: Any = None) -> Job:
    error = None if row[2] is None else json.loads(row[2])
    return Job(
        id=row[0],
        status=JobStatus(row[1]),
        input=input,
        result=result,
        error=error,
        attempts=row[3],
        max_attempts=row[4],
        created_at=row[5],
        started_at=row[6],
        finished_at=row[7],
        lease_expires_at=row[8],
        progress=row[9],
        idempotency_key=row[10],
        payload_hash=row[11],
        worker_id=row[12],
        cancel_requested=bool(row[13]),
        available_at=row[14],
        expires_at=row[15],
    )


def _update_args(job: Job) -> tuple[Any, ...]:
    error = None if job.error is None else json.dumps(job.error)
    return (
        job.status.value,
        error,
        job.attempts,
        job.started_at,
        job.finished_at,
        job.lease_expires_at,
        job.progress,
        job.worker_id,
        int(job.cancel_requested),
        job.available_at,
        job.id,
    )


def _unavailable(exc: sqlite3.Error, path: Path) -> StoreUnavailable:
    text = str(exc)
    if "full" in text:
        hint = "free disk space (or raise the size limit) and retry"
    elif "readonly" in text or "read-only" in text:
        hint = "make the file and its directory writable by this process and retry"
    elif "locked" in text or "busy" in text:
        hint = "another process held the write lock past busy_timeout; retry, or raise it"
    else:
        hint = "check the file and the disk, then retry"
    return StoreUnavailable(f"job store {str(path)!r} cannot be written ({text}): {hint}")


class SQLiteJobStore:
    """A :class:`JobStore` in one SQLite file, safe across threads and processes.

    ``synchronous="FULL"`` (the default) makes every acknowledged write survive a power
    loss; ``"NORMAL"`` is faster and survives a process crash but not a power loss.
    ``busy_timeout_s`` bounds how long a write waits for another process's write lock
    before raising :class:`StoreUnavailable`. ``clock`` gives epoch seconds (tests pass a
    fake one; processes sharing a file must share a clock, i.e. use the default).

    Open one store per process: a store opened before ``fork`` refuses use in the child.

    >>> store = SQLiteJobStore(tmp_path / "jobs.db")   # doctest: +SKIP
    >>> job = store.submit({"x": 1})                   # doctest: +SKIP
    >>> store.close()                                  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise ValueError(
                f"SQLiteJobStore needs a file path, got {str(path)!r}; an in-memory SQLite "
                "database is not shared between connections or processes and loses every "
                "job: use MemoryJobStore for tests and notebooks"
            )
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        check_positive("busy_timeout_s", busy_timeout_s)
        self._path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._pid = os.getpid()
        try:
            # isolation_level=None: no implicit transactions; every write opens its own
            # BEGIN IMMEDIATE. check_same_thread=False: the lock serialises use instead.
            conn = sqlite3.connect(
                self._path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"cannot open job store {str(self._path)!r} ({exc}): check that the "
                "directory exists and is writable"
            ) from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            self._setup(conn, synchronous.upper(), busy_timeout_s)
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _setup(self, conn: sqlite3.Connection, synchronous: str, busy_timeout_s: float) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(
                    f"job store {str(self._path)!r} cannot use WAL journaling (got {mode!r}); "
                    "put it on a local file system"
                )
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    # Not executescript(): it COMMITs first, which would end our
                    # BEGIN IMMEDIATE and let two processes create the schema at once.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise StoreUnavailable(
                        f"job store {str(self._path)!r} has schema version {version}, this "
                        f"servekit reads version {SCHEMA_VERSION}; open it with the servekit "
                        "that wrote it, or use a new file"
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _unavailable(exc, self._path) from exc

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def _connection(self) -> sqlite3.Connection:
        # Caller holds self._lock.
        if self._conn is None:
            raise StoreUnavailable("the job store is closed; open a new one")
        if os.getpid() != self._pid:
            # A connection inherited through fork shares file locks with the parent and
            # can corrupt the database; SQLite forbids using it.
            raise StoreUnavailable(
                "this job store was opened in another process (before a fork); open a new "
                "SQLiteJobStore in this process"
            )
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed if the body returns, else rolled
        back; sqlite3.OperationalError becomes StoreUnavailable either way."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise _unavailable(exc, self._path) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                # COMMIT can fail too (disk full while writing the WAL); then, as for any
                # error in the body, nothing of the transaction is kept.
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        # SQLite may have rolled back already (after an I/O error); the
                        # original error is the one worth reporting.
                        pass
                if isinstance(exc, sqlite3.OperationalError):
                    raise _unavailable(exc, self._path) from exc
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.OperationalError as exc:
                raise _unavailable(exc, self._path) from exc

    @staticmethod
    def _meta(conn: sqlite3.Connection, id: str) -> Job:
        row = conn.execute(f"SELECT {_META} FROM jobs WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise not_found(id)
        return _job(row)

    @staticmethod
    def _full(conn: sqlite3.Connection, id: str) -> Job:
        row = conn.execute(
            f"SELECT {_META}, input, result FROM jobs WHERE id = ?", (id,)
        ).fetchone()
        if row is None:
            raise not_found(id)
        return _decoded(row)

    def submit(
        self,
        input: Any,
        *,
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        ttl_s: float | None = None,
    ) -> Job:
        """See :meth:`JobStore.submit`. Returns after the job is committed to disk."""
        check_submit(max_attempts, ttl_s)
        text = encode_payload(input)
        digest = payload_hash(text)
        with self._write() as conn:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT id, payload_hash FROM jobs WHERE idempotency_key = ?",
                    (idempotency_key,),
                ).fetchone()
                if row is not None:
                    if row[1] != digest:
                        raise idempotency_conflict(idempotency_key)
                    return self._full(conn, row[0])
            job = new_job(
                new_job_id(),
                now=self._clock(),
                max_attempts=max_attempts,
                ttl_s=ttl_s,
                idempotency_key=idempotency_key,
                digest=digest,
            )
            conn.execute(
                f"INSERT INTO jobs ({_META}, input) VALUES ({', '.join('?' * 17)})",
                (
                    job.id,
                    job.status.value,
                    None,
                    job.attempts,
                    job.max_attempts,
                    job.created_at,
                    None,
                    None,
                    None,
                    None,
                    job.idempotency_key,
                    job.payload_hash,
                    None,
                    0,
                    job.available_at,
                    job.expires_at,
                    text,
                ),
            )
        # Decoding our own text gives the caller a private copy of its input.
        return dataclasses.replace(job, input=decode_payload(text))

    def get(self, id: str) -> Job:
        """See :meth:`JobStore.get`. A row whose payload is not servekit JSON raises
        :class:`InvalidJobPayload`."""
        with self._read() as conn:
            return self._full(conn, id)

    def claim(self, worker_id: str, lease_s: float, limit: int = 1) -> builtins.list[Job]:
        """See :meth:`JobStore.claim`."""
        check_positive("lease_s", lease_s)
        check_limit(limit)
        with self._write() as conn:
            now = self._clock()
            # Sweep only the rows that can change: running ones past their lease, queued
            # ones past their TTL (the status index keeps this cheap).
            rows = conn.execute(
                f"SELECT {_META} FROM jobs WHERE (status = 'running' AND lease_expires_at <= ?)"
                " OR (status = 'queued' AND expires_at <= ?)",
                (now, now),
            ).fetchall()
            for row in rows:
                new = swept(_job(row), now)
                if new is not None:
                    conn.execute(_UPDATE, _update_args(new))
            out: builtins.list[Job] = []
            while len(out) < limit:
                rows = conn.execute(
                    f"SELECT {_META}, input FROM jobs WHERE status = 'queued' "
                    "AND available_at <= ? ORDER BY seq LIMIT ?",
                    (now, limit - len(out)),
                ).fetchall()
                if not rows:
                    break
                for row in rows:
                    job = _job(row)
                    assert claimable(job, now)  # the WHERE clause above is the same rule
                    try:
                        value = decode_payload(row[16])
                    except InvalidJobPayload as exc:
                        # Never hand a worker a payload we cannot trust, and never leave it
                        # at the head of the queue to be tried forever.
                        error = {"code": "invalid_payload", "message": exc.message}
                        conn.execute(
                            _UPDATE, _update_args(finish(job, JobStatus.FAILED, now, error=error))
                        )
                        continue
                    job = claimed(job, worker_id, now, lease_s)
                    conn.execute(_UPDATE, _update_args(job))
                    out.append(dataclasses.replace(job, input=value))
            return out

    def _change(self, id: str, worker_id: str, change: Callable[[Job], Job]) -> bool:
        with self._write() as conn:
            job = self._meta(conn, id)
            if not held_by(job, worker_id):
                return False
            conn.execute(_UPDATE, _update_args(change(job)))
            return True

    def heartbeat(self, id: str, worker_id: str, lease_s: float) -> bool:
        """See :meth:`JobStore.heartbeat`."""
        check_positive("lease_s", lease_s)
        return self._change(
            id,
            worker_id,
            lambda job: dataclasses.replace(job, lease_expires_at=self._clock() + lease_s),
        )

    def complete(self, id: str, worker_id: str, result: Any) -> bool:
        """See :meth:`JobStore.complete`."""
        text = encode_payload(result)
        with self._write() as conn:
            job = self._meta(conn, id)
            if not held_by(job, worker_id):
                return False
            job = completed(job, self._clock())
            conn.execute(_UPDATE, _update_args(job))
            if job.status is JobStatus.SUCCEEDED:
                conn.execute("UPDATE jobs SET result = ? WHERE id = ?", (text, id))
            return True

    def fail(
        self, id: str, worker_id: str, error: dict[str, str], *, retry: bool, backoff_s: float
    ) -> bool:
        """See :meth:`JobStore.fail`."""
        error = check_error(error)
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        return self._change(
            id, worker_id, lambda job: failed(job, self._clock(), error, retry, backoff_s)
        )

    def cancel(self, id: str) -> Job:
        """See :meth:`JobStore.cancel`."""
        with self._write() as conn:
            job = self._meta(conn, id)
            new = _cancelled(job, self._clock())
            if new is not None:
                conn.execute(_UPDATE, _update_args(new))
            return self._full(conn, id)

    def set_progress(self, id: str, worker_id: str, progress: float) -> bool:
        """See :meth:`JobStore.set_progress`."""
        check_progress(progress)
        return self._change(
            id, worker_id, lambda job: dataclasses.replace(job, progress=float(progress))
        )

    def list(self, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        """See :meth:`JobStore.list`."""
        check_limit(limit)
        with self._read() as conn:
            if status is None:
                rows = conn.execute(
                    f"SELECT {_META}, input, result FROM jobs ORDER BY seq LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_META}, input, result FROM jobs WHERE status = ? "
                    "ORDER BY seq LIMIT ?",
                    (JobStatus(status).value, limit),
                ).fetchall()
            return [_decoded(row) for row in rows]

    def purge(self, older_than_s: float) -> int:
        """See :meth:`JobStore.purge`. Also expires queued jobs past their TTL and
        checkpoints the WAL, so a store purged regularly stays bounded on disk (JB-12)."""
        if not older_than_s >= 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s!r}")
        with self._write() as conn:
            now = self._clock()
            rows = conn.execute(
                f"SELECT {_META} FROM jobs WHERE status = 'queued' AND expires_at <= ?", (now,)
            ).fetchall()
            for row in rows:
                conn.execute(_UPDATE, _update_args(finish(_job(row), JobStatus.EXPIRED, now)))
            cutoff = now - older_than_s
            rows = conn.execute(
                f"SELECT {_META} FROM jobs WHERE finished_at <= ?", (cutoff,)
            ).fetchall()
            doomed = [(row[0],) for row in rows if purgeable(_job(row), cutoff)]
            conn.executemany("DELETE FROM jobs WHERE id = ?", doomed)
        with self._read() as conn:
            # PASSIVE never waits for readers; freed pages are reused by later inserts.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return len(doomed)

    def close(self) -> None:
        """See :meth:`JobStore.close`. The jobs stay in the file."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


def _decoded(row: tuple[Any, ...]) -> Job:
    # Columns: the 16 of _META, then input, then result.
    result = None if row[17] is None else decode_payload(row[17])
    return _job(row, input=decode_payload(row[16]), result=result)
