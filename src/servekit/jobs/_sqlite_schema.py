"""The SQLite job store's file: its table layout and version, rows to jobs and back,
and opening it (file system check, pragmas, schema creation or version check).

:class:`~servekit.jobs.SQLiteJobStore` (``_sqlite``, where the module docstring gives the
decisions) runs its queries on the tables defined here; SQLite errors become
:class:`StoreUnavailable` through :func:`_unavailable`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from ._records import CallbackState, Job, JobStatus, StoreUnavailable, decode_payload

__all__ = ["SCHEMA_VERSION"]

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
    expires_at REAL,
    timeout_s REAL,
    webhook_url TEXT,
    callback_state TEXT,                    -- pending | delivered | failed
    callback_attempts INTEGER NOT NULL,
    callback_next_at REAL,
    callback_error TEXT,
    handed_back INTEGER NOT NULL DEFAULT 0  -- the last claim was released unstarted
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_by_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_by_callback ON jobs (callback_next_at) WHERE callback_state = 'pending';
"""

# Every column but input and result, in the order _job() reads them.
_META = (
    "id, status, error, attempts, max_attempts, created_at, started_at, finished_at, "
    "lease_expires_at, progress, idempotency_key, payload_hash, worker_id, cancel_requested, "
    "available_at, expires_at, timeout_s, webhook_url, callback_state, callback_attempts, "
    "callback_next_at, callback_error, handed_back"
)
# Index of the input column in rows selected as f"{_META}, input, result".
_INPUT = _META.count(",") + 1
_UPDATE = (
    "UPDATE jobs SET status=?, error=?, attempts=?, started_at=?, finished_at=?, "
    "lease_expires_at=?, progress=?, worker_id=?, cancel_requested=?, available_at=?, "
    "callback_state=?, callback_attempts=?, callback_next_at=?, callback_error=?, "
    "handed_back=? WHERE id=?"
)
_WAL_LIMIT_BYTES = 64 * 1024 * 1024
# File systems where SQLite's locks or WAL shared memory do not work across hosts
# (https://www.sqlite.org/wal.html: "WAL does not work over a network filesystem").
_NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre"}
    | {"fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "davfs", "fuse.glusterfs"}
)


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
        timeout_s=row[16],
        webhook_url=row[17],
        callback_state=None if row[18] is None else CallbackState(row[18]),
        callback_attempts=row[19],
        callback_next_at=row[20],
        callback_error=row[21],
        handed_back=bool(row[22]),
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
        None if job.callback_state is None else job.callback_state.value,
        job.callback_attempts,
        job.callback_next_at,
        job.callback_error,
        int(job.handed_back),
        job.id,
    )


def _decoded(row: tuple[Any, ...]) -> Job:
    # Columns: those of _META, then input, then result.
    result = None if row[_INPUT + 1] is None else decode_payload(row[_INPUT + 1])
    return _job(row, input=decode_payload(row[_INPUT]), result=result)


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (Linux: from /proc/self/mountinfo);
    None where it cannot be told."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    target = str(Path(os.path.abspath(path)).parent.resolve())
    best, kind = "", None
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=..."
        fields = line.split(" - ", 1)
        left, right = fields[0].split(), fields[1].split() if len(fields) == 2 else []
        if len(left) < 5 or not right:
            continue
        mount = left[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right[0]
    return kind


def _refuse_network_filesystem(path: Path) -> None:
    kind = filesystem_type(path)
    if kind is not None and kind.lower() in _NETWORK_FILESYSTEMS:
        raise StoreUnavailable(
            f"job store {str(path)!r} is on a {kind} file system; SQLite's locking and WAL "
            "do not work over network file systems (jobs could be lost or run twice): "
            "put the store on a local disk (JB-13)"
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


def _setup(conn: sqlite3.Connection, path: Path, synchronous: str, busy_timeout_s: float) -> None:
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(
                f"job store {str(path)!r} cannot use WAL journaling (got {mode!r}); "
                "put it on a local file system"
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # Checkpoints truncate the WAL back to this size, so a burst of writes does
        # not leave a large file behind for good (JB-12).
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
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
                    f"job store {str(path)!r} has schema version {version}, this "
                    f"servekit reads version {SCHEMA_VERSION}; open it with the servekit "
                    "that wrote it, or use a new file"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise _unavailable(exc, path) from exc
