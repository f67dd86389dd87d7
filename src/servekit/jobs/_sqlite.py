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
  else (a pickle) is refused on read. ``claim`` fails such a job with ``invalid_job_payload``
  instead of handing it to a worker or stalling the queue on it.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from ._counts import JobStoreStatistics, StoreCounts, transition
from ._records import (
    InvalidJobPayload,
    Job,
    JobStatus,
    StoreUnavailable,
    decode_payload,
    encode_payload,
    payload_hash,
)
from ._sqlite_schema import (
    _INPUT,
    _META,
    _UPDATE,
    _decoded,
    _job,
    _refuse_network_filesystem,
    _setup,
    _unavailable,
    _update_args,
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
    delivery_recorded,
    failed,
    finish,
    held_by,
    idempotency_conflict,
    new_job,
    new_job_id,
    not_found,
    purgeable,
    released,
    swept,
)

__all__ = ["SQLiteJobStore"]

_SYNCHRONOUS = ("FULL", "NORMAL")
_T = TypeVar("_T")


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
        _refuse_network_filesystem(self._path)
        self._clock = clock
        self._lock = threading.Lock()
        # Group commit (see _transact): writes waiting for the next commit.
        self._group = threading.Condition(threading.Lock())
        self._pending: builtins.list[_Op[Any]] = []
        self._committing = False
        # Transitions the operations of the group being committed made (see _note);
        # counted once the COMMIT succeeded.
        self._counts = StoreCounts()
        self._staged: builtins.list[str] = []
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
            _setup(conn, self._path, synchronous.upper(), busy_timeout_s)
        except BaseException:
            self._conn = None
            conn.close()
            raise

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def statistics(self) -> JobStoreStatistics:
        """What this store object did so far (in this process, committed writes only):
        jobs stored, re-queued, moved to a final status."""
        return self._counts.snapshot()

    def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs the file holds in each status (every process's), counted on
        the status index without reading the rows."""
        with self._read() as conn:
            rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(JobStatus, 0)
        for status, n in rows:
            counts[JobStatus(status)] = n
        return counts

    def _note(self, old: JobStatus | None, new: Job) -> None:
        # Called by operations, under self._lock inside _commit.
        kind = transition(old, new)
        if kind is not None:
            self._staged.append(kind)

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

    def _transact(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``op`` inside a write transaction, committed before this returns.

        Group commit: writes that arrive while another thread is committing wait, and
        the next of them to run commits all of them in one ``BEGIN IMMEDIATE`` ...
        ``COMMIT``, each inside its own savepoint. One fsync then covers many writes,
        so concurrent submitters and workers are not limited to one commit each. An
        operation that raises is rolled back to its savepoint and gets its error; the
        others in the group are unaffected. A failed COMMIT (or any SQLite error) fails
        every operation of the group with :class:`StoreUnavailable`, none of it kept.
        """
        mine = _Op(op)
        with self._group:
            self._pending.append(mine)
            while self._committing and not mine.done:
                self._group.wait()
            if mine.done:
                return mine.outcome()
            self._committing = True
            batch, self._pending = self._pending, []
        try:
            self._commit(batch)
        finally:
            with self._group:
                self._committing = False
                for item in batch:
                    item.done = True
                self._group.notify_all()
        return mine.outcome()

    def _commit(self, batch: builtins.list[_Op[Any]]) -> None:
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
            except (StoreUnavailable, sqlite3.Error) as exc:
                failure = (
                    exc if isinstance(exc, StoreUnavailable) else _unavailable(exc, self._path)
                )
                for item in batch:
                    item.error = failure
                return
            staged = self._staged
            staged.clear()
            try:
                for item in batch:
                    conn.execute("SAVEPOINT op")
                    mark = len(staged)
                    try:
                        item.value = item.op(conn)
                    except sqlite3.Error:
                        raise  # the whole group fails below
                    except Exception as exc:  # the operation's own error: only it fails
                        conn.execute("ROLLBACK TO op")
                        del staged[mark:]
                        item.error = exc
                    conn.execute("RELEASE op")
                conn.execute("COMMIT")
                self._counts.add(staged)
                staged.clear()
            except BaseException as exc:
                staged.clear()
                # COMMIT can fail too (disk full while writing the WAL); then nothing of
                # the group is kept and every operation in it reports the error.
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        # SQLite may have rolled back already (after an I/O error); the
                        # original error is the one worth reporting.
                        pass
                error = _unavailable(exc, self._path) if isinstance(exc, sqlite3.Error) else exc
                for item in batch:
                    item.value, item.error = None, error
                if not isinstance(exc, Exception):
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
        timeout_s: float | None = None,
        webhook_url: str | None = None,
    ) -> Job:
        """See :meth:`JobStore.submit`. Returns after the job is committed to disk."""
        check_submit(max_attempts, ttl_s, timeout_s)
        text = encode_payload(input)
        digest = payload_hash(text)

        def op(conn: sqlite3.Connection) -> Job:
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
                timeout_s=timeout_s,
                webhook_url=webhook_url,
            )
            fields: dict[str, Any] = {
                "id": job.id,
                "status": job.status.value,
                "attempts": 0,
                "max_attempts": job.max_attempts,
                "created_at": job.created_at,
                "idempotency_key": job.idempotency_key,
                "payload_hash": job.payload_hash,
                "cancel_requested": 0,
                "available_at": job.available_at,
                "expires_at": job.expires_at,
                "timeout_s": job.timeout_s,
                "webhook_url": job.webhook_url,
                "callback_attempts": 0,
                "input": text,
            }
            conn.execute(
                f"INSERT INTO jobs ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                tuple(fields.values()),
            )
            self._note(None, job)
            # Decoding our own text gives the caller a private copy of its input.
            return dataclasses.replace(job, input=decode_payload(text))

        return self._transact(op)

    def get(self, id: str) -> Job:
        """See :meth:`JobStore.get`. A row whose payload is not servekit JSON raises
        :class:`InvalidJobPayload`."""
        with self._read() as conn:
            return self._full(conn, id)

    def claim(self, worker_id: str, lease_s: float, limit: int = 1) -> builtins.list[Job]:
        """See :meth:`JobStore.claim`."""
        check_positive("lease_s", lease_s)
        check_limit(limit)

        def op(conn: sqlite3.Connection) -> builtins.list[Job]:
            now = self._clock()
            # Sweep only the rows that can change: running ones past their lease, queued
            # ones past their TTL (the status index keeps this cheap).
            rows = conn.execute(
                f"SELECT {_META} FROM jobs WHERE (status = 'running' AND lease_expires_at <= ?)"
                " OR (status = 'queued' AND expires_at <= ?)",
                (now, now),
            ).fetchall()
            for row in rows:
                old = _job(row)
                new = swept(old, now)
                if new is not None:
                    conn.execute(_UPDATE, _update_args(new))
                    self._note(old.status, new)
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
                        value = decode_payload(row[_INPUT])
                    except InvalidJobPayload as exc:
                        # Never hand a worker a payload we cannot trust, and never leave it
                        # at the head of the queue to be tried forever.
                        error = {"code": exc.code, "message": exc.message}
                        bad = finish(job, JobStatus.FAILED, now, error=error)
                        conn.execute(_UPDATE, _update_args(bad))
                        self._note(job.status, bad)
                        continue
                    job = claimed(job, worker_id, now, lease_s)
                    conn.execute(_UPDATE, _update_args(job))
                    out.append(dataclasses.replace(job, input=value))
            return out

        return self._transact(op)

    def _change(self, id: str, worker_id: str, change: Callable[[Job], Job]) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            job = self._meta(conn, id)
            if not held_by(job, worker_id):
                return False
            new = change(job)
            conn.execute(_UPDATE, _update_args(new))
            self._note(job.status, new)
            return True

        return self._transact(op)

    def heartbeat(self, id: str, worker_id: str, lease_s: float) -> bool:
        """See :meth:`JobStore.heartbeat`."""
        check_positive("lease_s", lease_s)
        return self._change(
            id,
            worker_id,
            lambda job: dataclasses.replace(job, lease_expires_at=self._clock() + lease_s),
        )

    def heartbeat_many(
        self, worker_id: str, ids: Sequence[str], lease_s: float
    ) -> builtins.list[bool]:
        """See :meth:`JobStore.heartbeat_many`."""
        check_positive("lease_s", lease_s)
        ids = builtins.list(ids)

        def op(conn: sqlite3.Connection) -> builtins.list[bool]:
            expires = self._clock() + lease_s
            out = []
            for id in ids:
                # Only a row this worker holds changes: the same rule as held_by().
                cursor = conn.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND status = 'running' "
                    "AND worker_id = ?",
                    (expires, id, worker_id),
                )
                out.append(cursor.rowcount == 1)
            return out

        return self._transact(op)

    def complete(self, id: str, worker_id: str, result: Any) -> bool:
        """See :meth:`JobStore.complete`."""
        text = encode_payload(result)

        def op(conn: sqlite3.Connection) -> bool:
            self._meta(conn, id)  # unknown id: JobNotFound, as the protocol says
            return self._complete(conn, worker_id, id, text)

        return self._transact(op)

    def complete_many(
        self, worker_id: str, results: Sequence[tuple[str, Any]]
    ) -> builtins.list[bool]:
        """See :meth:`JobStore.complete_many`."""
        texts = [(id, encode_payload(result)) for id, result in results]
        return self._transact(
            lambda conn: [self._complete(conn, worker_id, id, text) for id, text in texts]
        )

    def _complete(self, conn: sqlite3.Connection, worker_id: str, id: str, text: str) -> bool:
        row = conn.execute(f"SELECT {_META} FROM jobs WHERE id = ?", (id,)).fetchone()
        if row is None or not held_by(job := _job(row), worker_id):
            return False
        new = completed(job, self._clock())
        conn.execute(_UPDATE, _update_args(new))
        self._note(job.status, new)
        if new.status is JobStatus.SUCCEEDED:
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

        def op(conn: sqlite3.Connection) -> Job:
            job = self._meta(conn, id)
            new = _cancelled(job, self._clock())
            if new is not None:
                conn.execute(_UPDATE, _update_args(new))
                self._note(job.status, new)
            return self._full(conn, id)

        return self._transact(op)

    def set_progress(self, id: str, worker_id: str, progress: float) -> bool:
        """See :meth:`JobStore.set_progress`."""
        check_progress(progress)
        return self._change(
            id, worker_id, lambda job: dataclasses.replace(job, progress=float(progress))
        )

    def release(self, worker_id: str, ids: Sequence[str]) -> builtins.list[bool]:
        """See :meth:`JobStore.release`."""
        ids = builtins.list(ids)

        def op(conn: sqlite3.Connection) -> builtins.list[bool]:
            out = []
            for id in ids:
                row = conn.execute(f"SELECT {_META} FROM jobs WHERE id = ?", (id,)).fetchone()
                held = row is not None and held_by(job := _job(row), worker_id)
                if held:
                    new = released(job, self._clock())
                    conn.execute(_UPDATE, _update_args(new))
                    self._note(job.status, new)
                out.append(held)
            return out

        return self._transact(op)

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

        def op(conn: sqlite3.Connection) -> int:
            now = self._clock()
            rows = conn.execute(
                f"SELECT {_META} FROM jobs WHERE status = 'queued' AND expires_at <= ?", (now,)
            ).fetchall()
            for row in rows:
                new = finish(old := _job(row), JobStatus.EXPIRED, now)
                conn.execute(_UPDATE, _update_args(new))
                self._note(old.status, new)
            cutoff = now - older_than_s
            rows = conn.execute(
                f"SELECT {_META} FROM jobs WHERE finished_at <= ?", (cutoff,)
            ).fetchall()
            doomed = [(row[0],) for row in rows if purgeable(_job(row), cutoff)]
            conn.executemany("DELETE FROM jobs WHERE id = ?", doomed)
            return len(doomed)

        count = self._transact(op)
        with self._read() as conn:
            # PASSIVE never waits for readers; freed pages are reused by later inserts.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return count

    def claim_deliveries(self, lease_s: float, limit: int = 1) -> builtins.list[Job]:
        """See :meth:`JobStore.claim_deliveries`."""
        check_positive("lease_s", lease_s)
        check_limit(limit)

        def op(conn: sqlite3.Connection) -> builtins.list[Job]:
            now = self._clock()
            rows = conn.execute(
                f"SELECT {_META}, input, result FROM jobs WHERE callback_state = 'pending' "
                "AND callback_next_at <= ? ORDER BY callback_next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            out = []
            for row in rows:
                job = dataclasses.replace(_decoded(row), callback_next_at=now + lease_s)
                conn.execute(_UPDATE, _update_args(job))
                out.append(job)
            return out

        return self._transact(op)

    def record_delivery(
        self, id: str, *, delivered: bool, error: str | None, retry_in_s: float | None
    ) -> None:
        """See :meth:`JobStore.record_delivery`."""

        def op(conn: sqlite3.Connection) -> None:
            job = self._meta(conn, id)
            new = delivery_recorded(job, self._clock(), delivered, error, retry_in_s)
            conn.execute(_UPDATE, _update_args(new))

        self._transact(op)

    def close(self) -> None:
        """See :meth:`JobStore.close`. The jobs stay in the file."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


class _Op(Generic[_T]):
    """One write waiting in a commit group."""

    __slots__ = ("done", "error", "op", "value")

    def __init__(self, op: Callable[[sqlite3.Connection], _T]) -> None:
        self.op = op
        self.done = False
        self.value: _T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> _T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # set when error is None
