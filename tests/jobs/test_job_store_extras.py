"""The newer JobStore surface, over both stores: per-job timeout and webhook fields,
batched heartbeats and completions, webhook delivery state, and SQLite group commit.

Time is a fake clock the test moves by hand (FakeClock, make_store and store are copied
from test_job_stores.py: test modules are not a package, so they cannot be imported).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from servekit.jobs import (
    IdempotencyConflict,
    InvalidJobPayload,
    Job,
    JobNotFound,
    JobStatus,
    JobStore,
    MemoryJobStore,
    SQLiteJobStore,
    StoreUnavailable,
)
from servekit.jobs._records import CallbackState

URL = "https://example.test/hook"


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StoreFactory = Callable[[FakeClock], JobStore]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory (so a test can reopen the same SQLite file); closes what it opened."""
    opened: list[JobStore] = []

    def make(clock: FakeClock) -> JobStore:
        store: JobStore
        if request.param == "memory":
            store = MemoryJobStore(clock=clock)
        else:
            store = SQLiteJobStore(tmp_path / "jobs.db", clock=clock)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory, clock: FakeClock) -> JobStore:
    return make_store(clock)


@pytest.fixture
def sqlite_store(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteJobStore]:
    store = SQLiteJobStore(tmp_path / "jobs.db", clock=clock)
    yield store
    store.close()


def _claim(store: JobStore, n: int, worker: str = "w1", lease_s: float = 30.0) -> list[Job]:
    jobs = store.claim(worker, lease_s, limit=n)
    assert len(jobs) == n
    return jobs


def _count(db: Path) -> int:
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


# --- timeout_s and webhook_url ---------------------------------------------------------


def test_extras_submit_stores_timeout_and_webhook(store: JobStore) -> None:
    job = store.submit({"x": 1}, timeout_s=2.5, webhook_url=URL)
    assert job.timeout_s == 2.5 and job.webhook_url == URL
    got = store.get(job.id)
    assert got.timeout_s == 2.5 and got.webhook_url == URL
    assert got.callback_state is None and got.callback_attempts == 0
    assert got.callback_next_at is None and got.callback_error is None
    (claimed,) = _claim(store, 1)
    assert claimed.timeout_s == 2.5 and claimed.webhook_url == URL
    plain = store.get(store.submit(2).id)
    assert plain.timeout_s is None and plain.webhook_url is None


def test_extras_timeout_and_webhook_survive_reopening(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "jobs.db"
    first = SQLiteJobStore(db, clock=clock)
    job = first.submit("x", timeout_s=7.0, webhook_url=URL)
    first.close()
    again = SQLiteJobStore(db, clock=clock)
    try:
        got = again.get(job.id)
        assert got.timeout_s == 7.0 and got.webhook_url == URL
    finally:
        again.close()


@pytest.mark.parametrize("timeout_s", [0, -1, 0.0, float("inf"), float("nan")])
def test_extras_invalid_timeout_is_refused(store: JobStore, timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        store.submit(1, timeout_s=timeout_s)
    assert store.list() == []


# --- heartbeat_many --------------------------------------------------------------------


def test_extras_heartbeat_many(store: JobStore, clock: FakeClock) -> None:
    a, b = (store.submit(i).id for i in range(2))
    _claim(store, 2, "w1", lease_s=10)
    other = store.submit("other").id
    _claim(store, 1, "w2", lease_s=10)
    done = store.submit("done").id
    _claim(store, 1, "w1", lease_s=10)
    assert store.complete(done, "w1", "r")
    queued = store.submit("queued").id

    clock.advance(5)
    flags = store.heartbeat_many("w1", [a, other, queued, done, "nope", b], 100)
    assert flags == [True, False, False, False, False, True]
    assert store.get(a).lease_expires_at == clock.now + 100
    assert store.get(b).lease_expires_at == clock.now + 100
    assert store.get(other).lease_expires_at == clock.now + 5  # untouched
    assert store.get(queued).status is JobStatus.QUEUED
    assert store.get(done).status is JobStatus.SUCCEEDED
    assert store.heartbeat_many("w1", [], 10) == []

    clock.advance(20)  # w2's lease ran out; w1's were extended
    store.claim("w3", 30, limit=10)
    assert store.get(a).worker_id == "w1" and store.get(b).worker_id == "w1"
    assert store.get(other).worker_id == "w3"
    assert store.heartbeat_many("w2", [other], 30) == [False]


def test_extras_heartbeat_many_validates_lease(store: JobStore) -> None:
    with pytest.raises(ValueError, match="lease_s"):
        store.heartbeat_many("w1", [], 0)


# --- complete_many ---------------------------------------------------------------------


def test_extras_complete_many(store: JobStore, clock: FakeClock) -> None:
    a, b = (store.submit(i).id for i in range(2))
    _claim(store, 2, "w1")
    other = store.submit("other").id
    _claim(store, 1, "w2")
    queued = store.submit("queued").id
    clock.advance(3)
    flags = store.complete_many(
        "w1", [(a, {"r": "a"}), (other, "x"), ("nope", 1), (queued, 2), (b, [1, 2])]
    )
    assert flags == [True, False, False, False, True]
    for id, result in ((a, {"r": "a"}), (b, [1, 2])):
        job = store.get(id)
        assert job.status is JobStatus.SUCCEEDED and job.result == result
        assert job.finished_at == clock.now and job.worker_id is None
    assert store.get(other).status is JobStatus.RUNNING and store.get(other).result is None
    assert store.get(queued).status is JobStatus.QUEUED
    assert store.complete_many("w1", [(a, "again")]) == [False]  # terminal: unchanged
    assert store.get(a).result == {"r": "a"}
    assert store.complete_many("w1", []) == []


def test_extras_complete_many_unstorable_result_writes_nothing(store: JobStore) -> None:
    a, b = (store.submit(i).id for i in range(2))
    _claim(store, 2, "w1")
    with pytest.raises(InvalidJobPayload):
        store.complete_many("w1", [(a, 1), (b, object())])
    for id in (a, b):
        job = store.get(id)
        assert job.status is JobStatus.RUNNING and job.result is None
        assert job.worker_id == "w1" and job.finished_at is None
    assert store.complete_many("w1", [(a, 1), (b, 2)]) == [True, True]


def test_extras_complete_many_resolves_cancel_requests(store: JobStore) -> None:
    a, b = (store.submit(i).id for i in range(2))
    _claim(store, 2, "w1")
    assert store.cancel(a).cancel_requested
    assert store.complete_many("w1", [(a, "dropped"), (b, "kept")]) == [True, True]
    cancelled = store.get(a)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.result is None
    assert store.get(b).status is JobStatus.SUCCEEDED and store.get(b).result == "kept"


# --- webhook delivery state ------------------------------------------------------------


def _assert_pending_since(job: Job, now: float) -> None:
    assert job.status.terminal
    assert job.callback_state is CallbackState.PENDING
    assert job.callback_next_at == now == job.finished_at
    assert job.callback_attempts == 0 and job.callback_error is None


def test_extras_callback_pending_on_success(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, webhook_url=URL)
    _claim(store, 1)
    assert store.get(job.id).callback_state is None  # running: not finished yet
    clock.advance(2)
    assert store.complete(job.id, "w1", "ok")
    _assert_pending_since(store.get(job.id), clock.now)


def test_extras_callback_pending_on_complete_many(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, webhook_url=URL)
    _claim(store, 1)
    clock.advance(2)
    assert store.complete_many("w1", [(job.id, "ok")]) == [True]
    _assert_pending_since(store.get(job.id), clock.now)


def test_extras_callback_pending_on_final_failure(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, webhook_url=URL)
    _claim(store, 1)
    clock.advance(2)
    error = {"code": "boom", "message": "it broke"}
    assert store.fail(job.id, "w1", error, retry=False, backoff_s=0)
    got = store.get(job.id)
    assert got.status is JobStatus.FAILED
    _assert_pending_since(got, clock.now)


def test_extras_callback_pending_on_queued_cancel(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, webhook_url=URL)
    clock.advance(2)
    assert store.cancel(job.id).status is JobStatus.CANCELLED
    _assert_pending_since(store.get(job.id), clock.now)


def test_extras_callback_pending_on_requested_cancel(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, webhook_url=URL)
    _claim(store, 1)
    store.cancel(job.id)
    assert store.get(job.id).callback_state is None
    clock.advance(2)
    assert store.complete(job.id, "w1", "dropped")
    got = store.get(job.id)
    assert got.status is JobStatus.CANCELLED
    _assert_pending_since(got, clock.now)


def test_extras_callback_pending_on_expiry_by_claim(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, ttl_s=5, webhook_url=URL)
    clock.advance(10)
    assert store.claim("w1", 30) == []
    got = store.get(job.id)
    assert got.status is JobStatus.EXPIRED
    _assert_pending_since(got, clock.now)


def test_extras_callback_pending_on_expiry_by_purge(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, ttl_s=5, webhook_url=URL)
    clock.advance(10)
    assert store.purge(0) == 0  # expired now, but its webhook is still to be sent
    got = store.get(job.id)
    assert got.status is JobStatus.EXPIRED
    _assert_pending_since(got, clock.now)


def test_extras_callback_pending_on_worker_lost(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, max_attempts=1, webhook_url=URL)
    _claim(store, 1, lease_s=10)
    clock.advance(20)
    assert store.claim("w2", 30) == []
    got = store.get(job.id)
    assert got.status is JobStatus.FAILED and got.error is not None
    assert got.error["code"] == "worker_lost"
    _assert_pending_since(got, clock.now)


def test_extras_requeue_does_not_make_callback_pending(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, max_attempts=3, webhook_url=URL)
    _claim(store, 1)
    error = {"code": "flaky", "message": "try again"}
    assert store.fail(job.id, "w1", error, retry=True, backoff_s=0)
    got = store.get(job.id)
    assert got.status is JobStatus.QUEUED and got.callback_state is None
    assert got.callback_next_at is None
    _claim(store, 1, lease_s=10)
    clock.advance(20)  # lease lost with attempts left: re-queued, still not pending
    _claim(store, 1, "w2")
    got = store.get(job.id)
    assert got.status is JobStatus.RUNNING and got.attempts == 3
    assert got.callback_state is None
    assert store.claim_deliveries(30, limit=10) == []


def test_extras_no_webhook_no_callback_state(store: JobStore, clock: FakeClock) -> None:
    ok, bad = store.submit(1).id, store.submit(2).id
    _claim(store, 2)
    store.complete(ok, "w1", "r")
    store.fail(bad, "w1", {"code": "c", "message": "m"}, retry=False, backoff_s=0)
    cancelled = store.cancel(store.submit(3).id).id
    expired = store.submit(4, ttl_s=1).id
    clock.advance(5)
    store.claim("w1", 30)
    for id in (ok, bad, cancelled, expired):
        job = store.get(id)
        assert job.status.terminal and job.callback_state is None
        assert job.callback_next_at is None
    assert store.claim_deliveries(30, limit=10) == []
    assert store.purge(0) == 4


# --- claim_deliveries / record_delivery ------------------------------------------------


def _finish_with_webhook(store: JobStore, clock: FakeClock, result: Any) -> str:
    id = store.submit({"in": result}, webhook_url=URL).id
    store.claim("w1", 30)
    assert store.complete(id, "w1", result)
    clock.advance(1)
    return id


def test_extras_claim_deliveries_oldest_first_and_leased(store: JobStore, clock: FakeClock) -> None:
    ids = [_finish_with_webhook(store, clock, i) for i in range(3)]
    unfinished = store.submit("later", webhook_url=URL).id
    got = store.claim_deliveries(30, limit=2)
    assert [j.id for j in got] == ids[:2]
    assert [j.result for j in got] == [0, 1] and got[0].input == {"in": 0}
    assert all(j.status is JobStatus.SUCCEEDED and j.webhook_url == URL for j in got)
    assert all(j.callback_state is CallbackState.PENDING for j in got)
    assert [j.id for j in store.claim_deliveries(30, limit=10)] == ids[2:]
    assert store.claim_deliveries(30, limit=10) == []  # all three are leased

    clock.advance(29)
    assert store.claim_deliveries(30, limit=10) == []
    clock.advance(1)  # the leases ran out: due again (at least once delivery)
    again = store.claim_deliveries(30, limit=10)
    assert {j.id for j in again} == set(ids) and unfinished not in {j.id for j in again}


def test_extras_claim_deliveries_validates(store: JobStore) -> None:
    with pytest.raises(ValueError, match="lease_s"):
        store.claim_deliveries(0)
    with pytest.raises(ValueError, match="limit"):
        store.claim_deliveries(30, limit=0)


def test_extras_record_delivery_delivered(store: JobStore, clock: FakeClock) -> None:
    id = _finish_with_webhook(store, clock, "r")
    (job,) = store.claim_deliveries(30)
    store.record_delivery(job.id, delivered=True, error=None, retry_in_s=None)
    got = store.get(id)
    assert got.callback_state is CallbackState.DELIVERED and got.callback_attempts == 1
    assert got.callback_next_at is None and got.callback_error is None
    assert got.status is JobStatus.SUCCEEDED and got.result == "r"
    clock.advance(1000)
    assert store.claim_deliveries(30, limit=10) == []

    # A second record (two senders raced past a lease) changes nothing.
    store.record_delivery(id, delivered=False, error="late", retry_in_s=5)
    store.record_delivery(id, delivered=False, error="late", retry_in_s=None)
    assert store.get(id) == got


def test_extras_record_delivery_retry_then_fail(store: JobStore, clock: FakeClock) -> None:
    id = _finish_with_webhook(store, clock, "r")
    store.claim_deliveries(30)
    store.record_delivery(id, delivered=False, error="500", retry_in_s=10)
    got = store.get(id)
    assert got.callback_state is CallbackState.PENDING and got.callback_attempts == 1
    assert got.callback_error == "500" and got.callback_next_at == clock.now + 10
    clock.advance(9.5)
    assert store.claim_deliveries(30, limit=10) == []
    clock.advance(0.5)
    assert [j.id for j in store.claim_deliveries(30, limit=10)] == [id]

    store.record_delivery(id, delivered=False, error="410 gone", retry_in_s=None)
    failed = store.get(id)
    assert failed.callback_state is CallbackState.FAILED and failed.callback_attempts == 2
    assert failed.callback_error == "410 gone" and failed.callback_next_at is None
    clock.advance(1000)
    assert store.claim_deliveries(30, limit=10) == []
    store.record_delivery(id, delivered=True, error=None, retry_in_s=None)
    assert store.get(id) == failed


def test_extras_record_delivery_unknown_id(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.record_delivery("nope", delivered=True, error=None, retry_in_s=None)


# --- purge and pending callbacks -------------------------------------------------------


@pytest.mark.parametrize("delivered", [True, False])
def test_extras_purge_keeps_pending_callbacks(
    store: JobStore, clock: FakeClock, delivered: bool
) -> None:
    id = _finish_with_webhook(store, clock, "r")
    plain = store.submit(1).id
    store.claim("w1", 30)
    store.complete(plain, "w1", 2)
    clock.advance(100)
    assert store.purge(10) == 1  # the plain job only
    with pytest.raises(JobNotFound):
        store.get(plain)
    assert store.get(id).callback_state is CallbackState.PENDING

    store.record_delivery(id, delivered=delivered, error=None, retry_in_s=None)
    assert store.purge(1000) == 0  # finished 101 s ago: not old enough yet
    assert store.get(id).status is JobStatus.SUCCEEDED
    assert store.purge(10) == 1
    with pytest.raises(JobNotFound):
        store.get(id)


# --- SQLite group commit ---------------------------------------------------------------


def _run_threads(targets: list[Callable[[], Any]]) -> list[tuple[str, Any]]:
    """Run each target in its own thread; return ("ok", value) or ("err", exception)."""
    outcomes: list[tuple[str, Any]] = [("missing", None)] * len(targets)

    def run(i: int, target: Callable[[], Any]) -> None:
        try:
            outcomes[i] = ("ok", target())
        except Exception as exc:
            outcomes[i] = ("err", exc)

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    return outcomes


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _in_one_group(
    store: SQLiteJobStore,
    targets: list[Callable[[], Any]],
    while_held: Callable[[], None] | None = None,
) -> list[tuple[str, Any]]:
    """Run ``targets`` concurrently so that they all commit in one group.

    The test holds the store's connection lock; a first write (writing nothing) becomes
    the committer and blocks on that lock, so the targets all queue behind it. Once all
    of them wait, the lock is released: the first write commits alone, then the next
    committer takes every waiting target as one group.
    """
    outcomes: list[list[tuple[str, Any]]] = []
    threads: list[threading.Thread] = []
    store._lock.acquire()
    released = False
    try:
        plug = threading.Thread(target=store.heartbeat_many, args=("plug", [], 1.0))
        plug.start()
        threads.append(plug)
        _wait_for(lambda: store._committing, "the first write to start committing")
        runner = threading.Thread(target=lambda: outcomes.append(_run_threads(targets)))
        runner.start()
        threads.append(runner)
        _wait_for(lambda: len(store._pending) == len(targets), "the writes to queue")
        if while_held is not None:
            while_held()
        store._lock.release()
        released = True
    finally:
        if not released:
            store._lock.release()
        for thread in threads:
            thread.join(60)
    assert not any(t.is_alive() for t in threads)
    (result,) = outcomes
    return result


def test_extras_group_commit_many_threads_submitting(sqlite_store: SQLiteJobStore) -> None:
    def submitter(t: int) -> Callable[[], list[str]]:
        return lambda: [sqlite_store.submit({"t": t, "i": i}).id for i in range(50)]

    outcomes = _run_threads([submitter(t) for t in range(16)])
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    ids = [id for _, chunk in outcomes for id in chunk]
    assert len(ids) == len(set(ids)) == 800
    stored = sqlite_store.list(limit=1000)
    assert {j.id for j in stored} == set(ids)
    assert sorted((j.input["t"], j.input["i"]) for j in stored) == [
        (t, i) for t in range(16) for i in range(50)
    ]
    assert _count(sqlite_store.path) == 800


def test_extras_group_commit_same_key_same_payload(sqlite_store: SQLiteJobStore) -> None:
    barrier = threading.Barrier(8)

    def submit() -> str:
        barrier.wait(10)
        return sqlite_store.submit({"same": 1}, idempotency_key="k").id

    outcomes = _run_threads([submit] * 8)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    assert len({id for _, id in outcomes}) == 1
    assert len(sqlite_store.list()) == 1


def test_extras_group_commit_same_key_same_payload_in_one_group(
    sqlite_store: SQLiteJobStore,
) -> None:
    targets = [lambda: sqlite_store.submit({"same": 1}, idempotency_key="k").id] * 8
    outcomes = _in_one_group(sqlite_store, targets)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    assert len({id for _, id in outcomes}) == 1
    assert len(sqlite_store.list()) == 1


def test_extras_group_commit_same_key_different_payloads(sqlite_store: SQLiteJobStore) -> None:
    barrier = threading.Barrier(8)

    def submit(n: int) -> Callable[[], str]:
        def go() -> str:
            barrier.wait(10)
            return sqlite_store.submit({"n": n}, idempotency_key="k").id

        return go

    outcomes = _run_threads([submit(n) for n in range(8)])
    ok = [value for kind, value in outcomes if kind == "ok"]
    errors = [value for kind, value in outcomes if kind == "err"]
    assert len(ok) == 1 and len(errors) == 7
    assert all(isinstance(e, IdempotencyConflict) for e in errors), errors
    assert [j.id for j in sqlite_store.list()] == ok


def test_extras_group_commit_isolates_each_operations_error(
    sqlite_store: SQLiteJobStore,
) -> None:
    def keyed(n: int) -> Callable[[], str]:
        return lambda: sqlite_store.submit({"n": n}, idempotency_key="k").id

    def plain(n: int) -> Callable[[], str]:
        return lambda: sqlite_store.submit({"plain": n}).id

    targets = [keyed(0), plain(0), keyed(1), plain(1), keyed(2), plain(2), keyed(3)]
    outcomes = _in_one_group(sqlite_store, targets)
    keyed_outcomes = [outcomes[i] for i in (0, 2, 4, 6)]
    assert [kind for kind, _ in keyed_outcomes] == ["ok", "err", "err", "err"]
    assert all(isinstance(e, IdempotencyConflict) for _, e in keyed_outcomes[1:])
    plain_ids = [outcomes[i][1] for i in (1, 3, 5)]
    assert all(outcomes[i][0] == "ok" for i in (1, 3, 5)), outcomes
    stored = {j.id: j for j in sqlite_store.list()}
    assert set(stored) == {keyed_outcomes[0][1], *plain_ids}
    assert stored[keyed_outcomes[0][1]].input == {"n": 0}


def test_extras_group_commit_job_not_found_fails_only_its_operation(
    sqlite_store: SQLiteJobStore,
) -> None:
    running = sqlite_store.submit("run").id
    sqlite_store.claim("w1", 30)
    targets: list[Callable[[], Any]] = [
        lambda: sqlite_store.submit("a").id,
        lambda: sqlite_store.cancel("nope"),
        lambda: sqlite_store.complete("nope", "w1", 1),
        lambda: sqlite_store.complete(running, "w1", "done"),
        lambda: sqlite_store.submit("b").id,
    ]
    outcomes = _in_one_group(sqlite_store, targets)
    assert [kind for kind, _ in outcomes] == ["ok", "err", "err", "ok", "ok"], outcomes
    assert isinstance(outcomes[1][1], JobNotFound)
    assert isinstance(outcomes[2][1], JobNotFound)
    assert outcomes[3][1] is True
    assert sqlite_store.get(outcomes[0][1]).input == "a"
    assert sqlite_store.get(outcomes[4][1]).input == "b"
    assert sqlite_store.get(running).result == "done"
    assert _count(sqlite_store.path) == 3


def test_extras_group_commit_disk_full_fails_the_group_and_writes_nothing(
    sqlite_store: SQLiteJobStore,
) -> None:
    for i in range(3):
        sqlite_store.submit(i)
    conn = sqlite_store._connection()

    def disk_full() -> None:
        # Called with the store's lock held, so nothing else uses the connection.
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    targets: list[Callable[[], Any]] = [
        lambda: sqlite_store.submit("small", idempotency_key="small").id,
        lambda: sqlite_store.submit({"big": "x" * 200_000}, idempotency_key="big").id,
        lambda: sqlite_store.submit("small too").id,
    ]
    outcomes = _in_one_group(sqlite_store, targets, while_held=disk_full)
    assert [kind for kind, _ in outcomes] == ["err"] * 3, outcomes
    assert all(isinstance(e, StoreUnavailable) for _, e in outcomes)
    assert "full" in outcomes[1][1].message
    assert not conn.in_transaction
    assert _count(sqlite_store.path) == 3
    assert [j.input for j in sqlite_store.list()] == [0, 1, 2]

    # Not even the idempotency keys were kept: once there is space, both submit anew.
    conn.execute("PRAGMA max_page_count = 1073741823")
    big = sqlite_store.submit({"big": "x" * 200_000}, idempotency_key="big")
    small = sqlite_store.submit("small", idempotency_key="small")
    assert big.status is JobStatus.QUEUED and small.input == "small"
    assert _count(sqlite_store.path) == 5


def test_extras_concurrent_disk_full_submits_all_fail_cleanly(
    sqlite_store: SQLiteJobStore,
) -> None:
    sqlite_store.submit("first")
    conn = sqlite_store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    barrier = threading.Barrier(6)

    def submit(n: int) -> Callable[[], str]:
        def go() -> str:
            barrier.wait(10)
            return sqlite_store.submit({"big": "x" * 100_000, "n": n}).id

        return go

    outcomes = _run_threads([submit(n) for n in range(6)])
    assert all(kind == "err" and isinstance(e, StoreUnavailable) for kind, e in outcomes)
    assert not conn.in_transaction
    assert _count(sqlite_store.path) == 1


# --- release: claimed jobs handed back unstarted ------------------------------------------


def test_extras_release_requeues_held_jobs_keeping_attempts(
    store: JobStore, clock: FakeClock
) -> None:
    a, b, c = (store.submit(i) for i in range(3))
    store.claim("w1", lease_s=30, limit=2)
    assert store.release("w1", [a.id, b.id, c.id, "unknown"]) == [True, True, False, False]
    for id in (a.id, b.id):
        job = store.get(id)
        assert job.status is JobStatus.QUEUED
        assert job.attempts == 1  # never decreases
        assert job.worker_id is None
        assert job.lease_expires_at is None
    assert store.release("w2", [a.id]) == [False]
    again = store.claim("w2", lease_s=30, limit=3)
    assert [j.id for j in again] == [a.id, b.id, c.id]
    # A claim handed back unstarted is not charged twice.
    assert [j.attempts for j in again] == [1, 1, 1]
    assert store.release("w2", [a.id]) == [True]
    store.fail(b.id, "w2", {"code": "e", "message": "m"}, retry=True, backoff_s=0)
    assert [j.attempts for j in store.claim("w3", lease_s=30, limit=2)] == [1, 2]


def test_extras_release_cancels_a_cancel_requested_job_and_expires_one_past_its_ttl(
    store: JobStore, clock: FakeClock
) -> None:
    doomed = store.submit("cancel me")
    late = store.submit("too late", ttl_s=5)
    fine = store.submit("fine", ttl_s=50)
    store.claim("w1", lease_s=30, limit=3)
    store.cancel(doomed.id)
    clock.advance(10)
    assert store.release("w1", [doomed.id, late.id, fine.id]) == [True, True, True]
    assert store.get(doomed.id).status is JobStatus.CANCELLED
    assert store.get(late.id).status is JobStatus.EXPIRED
    assert store.get(fine.id).status is JobStatus.QUEUED
