"""SQLiteJobStore beyond the shared contract: durability settings, processes, failures.

Every test uses a real file under ``tmp_path``; several start real processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from servekit.jobs import (
    InvalidJobPayload,
    JobNotFound,
    JobStatus,
    SQLiteJobStore,
    StoreUnavailable,
)
from servekit.jobs._sqlite_schema import SCHEMA_VERSION


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def store(db: Path) -> Iterator[SQLiteJobStore]:
    store = SQLiteJobStore(db)
    yield store
    store.close()


def _pragma(store: SQLiteJobStore, name: str) -> object:
    # The store's own connection: synchronous is a per-connection setting.
    return store._connection().execute(f"PRAGMA {name}").fetchone()[0]


def _raw(db: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(db, isolation_level=None))


def _count(db: Path) -> int:
    with _raw(db) as conn:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


# --- opening (JB-10) -------------------------------------------------------------------


def test_default_is_wal_and_synchronous_full(store: SQLiteJobStore, db: Path) -> None:
    assert _pragma(store, "journal_mode") == "wal"
    assert _pragma(store, "synchronous") == 2  # FULL
    assert _pragma(store, "busy_timeout") == 5000
    assert _pragma(store, "user_version") == SCHEMA_VERSION
    with _raw(db) as conn:  # WAL is a property of the file, seen by every connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_synchronous_normal_is_an_explicit_opt_in(db: Path) -> None:
    store = SQLiteJobStore(db, synchronous="NORMAL")
    try:
        assert _pragma(store, "synchronous") == 1
    finally:
        store.close()
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteJobStore(db, synchronous="OFF")


@pytest.mark.parametrize("path", [":memory:", "", "file::memory:?cache=shared"])
def test_in_memory_databases_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="MemoryJobStore"):
        SQLiteJobStore(path)


def test_newer_schema_version_is_refused(db: Path) -> None:
    SQLiteJobStore(db).close()
    with _raw(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreUnavailable, match="schema version"):
        SQLiteJobStore(db)


def test_missing_directory_raises_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="directory"):
        SQLiteJobStore(tmp_path / "no" / "such" / "dir" / "jobs.db")


def test_jobs_survive_reopening(db: Path) -> None:
    store = SQLiteJobStore(db)
    job = store.submit({"x": 1}, idempotency_key="k")
    store.close()
    store = SQLiteJobStore(db)
    try:
        assert store.get(job.id).input == {"x": 1}
        assert store.submit({"x": 1}, idempotency_key="k").id == job.id
    finally:
        store.close()


# --- failures: read-only, full, locked (JB-11) -----------------------------------------


def test_read_only_database_raises_store_unavailable_and_recovers(
    store: SQLiteJobStore, db: Path
) -> None:
    kept = store.submit("kept")
    # chmod is ignored when tests run as root; query_only makes SQLite itself refuse.
    store._connection().execute("PRAGMA query_only = ON")
    with pytest.raises(StoreUnavailable, match="readonly") as info:
        store.submit("lost")
    assert info.value.code == "store_unavailable"
    with pytest.raises(StoreUnavailable):
        store.claim("w", 30)
    assert store.get(kept.id).status is JobStatus.QUEUED  # reads still work
    assert _count(db) == 1

    store._connection().execute("PRAGMA query_only = OFF")
    assert store.get(store.submit("after").id).input == "after"


def test_full_database_raises_store_unavailable_with_nothing_half_written(
    store: SQLiteJobStore, db: Path
) -> None:
    for i in range(3):
        store.submit(i)
    conn = store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full
    with pytest.raises(StoreUnavailable, match="full") as info:
        store.submit({"big": "x" * 200_000}, idempotency_key="k")
    assert "free disk space" in info.value.message
    assert not conn.in_transaction
    assert _count(db) == 3 and len(store.list()) == 3
    # The failed submit left no trace, not even its idempotency key.
    conn.execute("PRAGMA max_page_count = 1073741823")  # space is back
    job = store.submit({"big": "x" * 200_000}, idempotency_key="k")
    assert store.get(job.id).status is JobStatus.QUEUED and _count(db) == 4


def test_lock_held_past_busy_timeout_raises_store_unavailable(db: Path) -> None:
    store = SQLiteJobStore(db, busy_timeout_s=0.2)
    try:
        with _raw(db) as other:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked"):
                store.submit(1)
            assert time.monotonic() - started < 5
            other.execute("ROLLBACK")
        store.submit(2)  # works again once the lock is released
        assert _count(db) == 1
    finally:
        store.close()


# --- tampered payloads (JB-14) ---------------------------------------------------------


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_row_tampered_with_a_pickle_is_refused(store: SQLiteJobStore, db: Path) -> None:
    bad = store.submit({"x": 1})
    good = store.submit({"x": 2})
    with _raw(db) as conn:
        conn.execute("UPDATE jobs SET input = ? WHERE id = ?", (pickle.dumps(_Boom()), bad.id))
    with pytest.raises(InvalidJobPayload) as info:
        store.get(bad.id)
    assert "pickle" in info.value.message and info.value.code == "invalid_job_payload"
    with pytest.raises(InvalidJobPayload):
        store.list()

    # claim never hands the row to a worker, nor stalls the queue on it.
    claimed = store.claim("w", 30, limit=5)
    assert [j.id for j in claimed] == [good.id]
    with _raw(db) as conn:
        status, error = conn.execute(
            "SELECT status, error FROM jobs WHERE id = ?", (bad.id,)
        ).fetchone()
    assert status == "failed" and json.loads(error)["code"] == "invalid_job_payload"


def test_result_tampered_with_an_object_array_is_refused(store: SQLiteJobStore, db: Path) -> None:
    job = store.submit(1)
    store.claim("w", 30)
    store.complete(job.id, "w", [1])
    evil = json.dumps({"__ndarray__": {"dtype": "|O", "shape": [1], "data": "AAAAAAAAAAA="}})
    with _raw(db) as conn:
        conn.execute("UPDATE jobs SET result = ? WHERE id = ?", (evil, job.id))
    with pytest.raises(InvalidJobPayload, match="object"):
        store.get(job.id)


# --- threads and processes (JB-09) -----------------------------------------------------


def test_threads_share_one_store(store: SQLiteJobStore) -> None:
    errors: list[BaseException] = []
    done: list[str] = []

    def work(name: str) -> None:
        try:
            for i in range(30):
                store.submit(i)
                for job in store.claim(name, 30):
                    assert store.complete(job.id, name, name)
                    done.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(done) == len(set(done)) == 120


_WORKER = """
import json, sys
from servekit.jobs import SQLiteJobStore

path, name, n, synchronous = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
claimed, completed, errors = [], [], []
store = SQLiteJobStore(path, synchronous=synchronous)
try:
    for i in range(n):
        try:
            store.submit({"by": name, "i": i})
            for job in store.claim(name, lease_s=600):
                claimed.append(job.id)
                if store.complete(job.id, name, {"by": name}):
                    completed.append(job.id)
        except Exception as exc:
            errors.append(repr(exc))
finally:
    store.close()
print(json.dumps({"claimed": claimed, "completed": completed, "errors": errors}))
"""


def test_processes_share_one_file_without_errors_or_duplicate_claims(db: Path) -> None:
    # JB-09 at full size: 8 processes x 1,000 rounds of submit, claim and complete. The
    # row is about locking (no SQLITE_BUSY surfaced, no double claim), not durability,
    # so the processes use synchronous=NORMAL to keep the test short; the locking is
    # the same for FULL.
    processes, rounds = 8, 1000
    SQLiteJobStore(db).close()  # create the schema once, before the race
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(db), f"p{i}", str(rounds), "NORMAL"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert [r["errors"] for r in reports] == [[]] * processes
    claimed = [id for r in reports for id in r["claimed"]]
    assert len(claimed) == len(set(claimed))  # no job claimed twice
    assert sorted(claimed) == sorted(id for r in reports for id in r["completed"])

    store = SQLiteJobStore(db)
    try:
        # Jobs submitted after a process's last claim are still queued: drain them.
        while leftovers := store.claim("parent", 60, limit=50):
            for job in leftovers:
                assert store.complete(job.id, "parent", {"by": "parent"})
            claimed += [job.id for job in leftovers]
        jobs = store.list(limit=processes * rounds)
        assert len(jobs) == processes * rounds
        assert all(j.status is JobStatus.SUCCEEDED for j in jobs)
        assert all(j.attempts == 1 for j in jobs)
        assert sorted(claimed) == sorted(j.id for j in jobs)  # each completed exactly once
    finally:
        store.close()


# --- durable acknowledgement (JB-01) ---------------------------------------------------

_SUBMITTER = """
import sys
from servekit.jobs import SQLiteJobStore

store = SQLiteJobStore(sys.argv[1])
for i in range(100_000):
    job = store.submit({"i": i})
    print(job.id, flush=True)  # the acknowledgement: printed only after submit returned
"""


def _kill_after_acks(db: Path, acks: int, delay_s: float) -> list[str]:
    """Start a submitter, read ``acks`` acknowledgements, wait ``delay_s`` (so the kill
    can land in the middle of a later write), SIGKILL it; return the acknowledged ids."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SUBMITTER, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        acked = [proc.stdout.readline().strip() for _ in range(acks)]
        time.sleep(delay_s)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up, no close(), mid-write perhaps
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert all(acked)
    return acked


def test_every_acknowledged_job_survives_sigkill(tmp_path: Path) -> None:
    # JB-01: 100 trials, four at a time, each killed after a random number of acks.
    rng = random.Random(1)
    trials = [
        (tmp_path / f"t{i}.db", rng.randint(1, 20), rng.uniform(0, 0.005)) for i in range(100)
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        acked = list(pool.map(lambda t: _kill_after_acks(*t), trials))
    for (db, _, _), ids in zip(trials, acked, strict=True):
        store = SQLiteJobStore(db)
        try:
            for id in ids:
                assert store.get(id).status is JobStatus.QUEUED
            with pytest.raises(JobNotFound):
                store.get("never-acknowledged")
        finally:
            store.close()
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_store_opened_before_fork_refuses_use_in_the_child(store: SQLiteJobStore) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; this child only
        # calls store.submit (which must refuse before touching SQLite) and _exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: report whether the inherited store refused, then leave at once
        try:
            store.submit(1)
            code = b"used"
        except StoreUnavailable:
            code = b"refused"
        except BaseException:
            code = b"other"
        os.write(write, code)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == b"refused"
    os.waitpid(pid, 0)
    assert store.list() == []


# --- growth (JB-12) and file systems (JB-13) ---------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_churn_of_100k_jobs_with_retention_keeps_the_file_bounded(db: Path) -> None:
    # 100 rounds of 1,000 jobs submitted, claimed, completed; one "second" per round and
    # a retention of 10: the live set is ~10,000 jobs, and freed pages are reused.
    # NORMAL only to keep the test short: growth does not depend on fsync.
    clock = _Clock()
    store = SQLiteJobStore(db, synchronous="NORMAL", clock=clock)
    wal = db.with_name(db.name + "-wal")
    sizes = []
    try:
        for round in range(100):
            for i in range(1000):
                store.submit({"round": round, "i": i, "pad": "x" * 64})
            jobs = store.claim("w", lease_s=60, limit=1000)
            assert len(jobs) == 1000
            assert all(store.complete_many("w", [(j.id, {"ok": True}) for j in jobs]))
            clock.now += 1.0
            store.purge(older_than_s=10.0)
            sizes.append(db.stat().st_size)
            assert wal.stat().st_size < 64 * 1024 * 1024
        assert len(store.list(limit=100_000)) <= 11_000
    finally:
        store.close()
    # Steady state from round 20 on: the file no longer grows with the jobs churned.
    assert sizes[-1] <= sizes[19] * 1.2, (sizes[19], sizes[-1])


@pytest.mark.parametrize("kind", ["nfs4", "cifs", "fuse.sshfs", "9p"])
def test_a_store_on_a_network_file_system_is_refused(
    db: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servekit.jobs import _sqlite_schema

    monkeypatch.setattr(_sqlite_schema, "filesystem_type", lambda path: kind)
    with pytest.raises(StoreUnavailable, match=f"{kind} file system.*local disk"):
        SQLiteJobStore(db)
    assert not db.exists()


def test_the_file_system_of_a_local_path_is_read_from_mountinfo(tmp_path: Path) -> None:
    from servekit.jobs._sqlite_schema import filesystem_type

    kind = filesystem_type(tmp_path / "jobs.db")
    if Path("/proc/self/mountinfo").exists():
        assert kind is not None
        assert kind not in ("nfs", "nfs4", "cifs")
    else:
        assert kind is None
