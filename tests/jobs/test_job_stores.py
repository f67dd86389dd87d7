"""The JobStore contract, run over every store (MemoryJobStore and SQLiteJobStore).

Time is a fake clock the test moves by hand, so TTLs and leases need no sleeping.
"""

from __future__ import annotations

import inspect
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
)

import servekit.jobs
from servekit.errors import ServekitError
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
    decode_payload,
    encode_payload,
)


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


def _claim_one(store: JobStore, worker: str = "w1", lease_s: float = 30.0) -> Job:
    jobs = store.claim(worker, lease_s)
    assert len(jobs) == 1
    return jobs[0]


# --- package surface -------------------------------------------------------------------


def test_all_is_sorted_and_complete_and_documented() -> None:
    assert servekit.jobs.__all__ == sorted(servekit.jobs.__all__)
    public = {
        name
        for name, value in vars(servekit.jobs).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public == set(servekit.jobs.__all__)
    for name in servekit.jobs.__all__:
        obj = getattr(servekit.jobs, name)
        assert inspect.getdoc(obj), name
        if isinstance(obj, type):
            for member, value in vars(obj).items():
                if not member.startswith("_") and (
                    inspect.isfunction(value) or isinstance(value, property)
                ):
                    assert inspect.getdoc(value), f"{name}.{member}"


def test_docstring_examples_run() -> None:
    import doctest

    from servekit.jobs import _records, _sqlite, _store

    for module in (servekit.jobs, _records, _store, _sqlite):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__


def test_both_stores_satisfy_the_protocol(store: JobStore) -> None:
    assert isinstance(store, JobStore)


@pytest.mark.parametrize(
    "error",
    [
        StoreUnavailable("disk full"),
        JobNotFound("nope"),
        IdempotencyConflict("reused", idempotency_key="k"),
        InvalidJobPayload("bad"),
    ],
)
def test_errors_have_stable_codes_and_pickle(error: ServekitError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.message == error.message
    assert copy.code == error.code != ServekitError.code
    assert vars(copy) == vars(error)


def test_status_terminal() -> None:
    assert {s for s in JobStatus if s.terminal} == {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.EXPIRED,
    }


# --- submit / get / claim / complete ---------------------------------------------------


def test_submit_get_claim_complete(store: JobStore, clock: FakeClock) -> None:
    job = store.submit({"x": 1})
    assert job.status is JobStatus.QUEUED and job.input == {"x": 1}
    assert job.attempts == 0 and job.created_at == clock.now and job.result is None
    assert store.get(job.id).status is JobStatus.QUEUED

    clock.advance(1)
    running = _claim_one(store)
    assert running.id == job.id and running.status is JobStatus.RUNNING
    assert running.attempts == 1 and running.started_at == clock.now
    assert running.lease_expires_at == clock.now + 30 and running.input == {"x": 1}
    assert store.claim("w2", 30) == []  # nothing else queued

    clock.advance(1)
    assert store.complete(job.id, "w1", {"y": [1, 2]})
    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.result == {"y": [1, 2]}
    assert done.finished_at == clock.now and done.lease_expires_at is None
    assert done.error is None


def test_ids_are_128_bit_random_and_unique(store: JobStore) -> None:
    ids = [store.submit(i).id for i in range(50)]
    assert len(set(ids)) == 50
    assert all(len(i) >= 22 for i in ids)  # token_urlsafe(16): 16 bytes = 128 bits


def test_an_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # token_urlsafe starts with "-" one time in 64; such an id read as an option in
    # `servekit jobs show ID` (seen in CI). The draws are made to start with it.
    from servekit.jobs import _store

    draws = iter(["-dash-first-xxxxxxxxxxx", "-again-xxxxxxxxxxxxxxx", "Plain-id-xxxxxxxxxxxxx"])
    monkeypatch.setattr(_store.secrets, "token_urlsafe", lambda n: next(draws))
    assert _store.new_job_id() == "Plain-id-xxxxxxxxxxxxx"


def test_claim_is_fifo_and_respects_limit(store: JobStore) -> None:
    ids = [store.submit(i).id for i in range(5)]
    assert [j.id for j in store.claim("w", 30, limit=3)] == ids[:3]
    assert [j.id for j in store.claim("w", 30, limit=10)] == ids[3:]


def test_only_the_holding_worker_may_complete(store: JobStore) -> None:
    job = store.submit(1)
    _claim_one(store, "w1")
    assert not store.complete(job.id, "intruder", 2)
    assert not store.heartbeat(job.id, "intruder", 30)
    assert not store.set_progress(job.id, "intruder", 0.5)
    error = {"code": "x", "message": "y"}
    assert not store.fail(job.id, "intruder", error, retry=False, backoff_s=0)
    assert store.get(job.id).status is JobStatus.RUNNING


def test_terminal_jobs_are_immutable(store: JobStore) -> None:
    job = store.submit(1)
    _claim_one(store)
    assert store.complete(job.id, "w1", "first")
    assert not store.complete(job.id, "w1", "second")
    assert not store.fail(job.id, "w1", {"code": "x", "message": "y"}, retry=True, backoff_s=0)
    assert store.cancel(job.id).status is JobStatus.SUCCEEDED
    after = store.get(job.id)
    assert after.status is JobStatus.SUCCEEDED and after.result == "first"


# --- fail and retry --------------------------------------------------------------------


def test_fail_with_retry_requeues_after_backoff_then_fails_finally(
    store: JobStore, clock: FakeClock
) -> None:
    job = store.submit("in", max_attempts=2)
    _claim_one(store)
    error = {"code": "model_error", "message": "boom"}
    assert store.fail(job.id, "w1", error, retry=True, backoff_s=10)
    queued = store.get(job.id)
    assert queued.status is JobStatus.QUEUED and queued.error == error
    assert queued.attempts == 1 and queued.finished_at is None

    assert store.claim("w1", 30) == []  # still backing off
    clock.advance(10)
    second = _claim_one(store)
    assert second.attempts == 2

    assert store.fail(job.id, "w1", error, retry=True, backoff_s=10)  # no attempts left
    final = store.get(job.id)
    assert final.status is JobStatus.FAILED and final.error == error
    assert final.result is None and final.finished_at == clock.now
    assert store.claim("w1", 30) == []


def test_fail_without_retry_is_final(store: JobStore) -> None:
    job = store.submit("in", max_attempts=5)
    _claim_one(store)
    assert store.fail(job.id, "w1", {"code": "bad", "message": "no"}, retry=False, backoff_s=0)
    assert store.get(job.id).status is JobStatus.FAILED


def test_fail_rejects_a_malformed_error(store: JobStore) -> None:
    job = store.submit(1)
    _claim_one(store)
    with pytest.raises(ValueError, match="code"):
        store.fail(job.id, "w1", {"message": "no code"}, retry=False, backoff_s=0)


# --- cancel ----------------------------------------------------------------------------


def test_cancel_queued_job(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1)
    clock.advance(2)
    out = store.cancel(job.id)
    assert out.status is JobStatus.CANCELLED and out.finished_at == clock.now
    assert store.claim("w1", 30) == []


def test_cancel_running_job_is_resolved_by_complete(store: JobStore) -> None:
    job = store.submit(1)
    _claim_one(store)
    requested = store.cancel(job.id)
    assert requested.status is JobStatus.RUNNING and requested.cancel_requested
    assert store.complete(job.id, "w1", "late result")
    out = store.get(job.id)
    assert out.status is JobStatus.CANCELLED and out.result is None


def test_cancel_running_job_is_resolved_by_fail_without_retry(store: JobStore) -> None:
    job = store.submit(1)
    _claim_one(store)
    store.cancel(job.id)
    assert store.fail(job.id, "w1", {"code": "x", "message": "y"}, retry=True, backoff_s=0)
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_cancel_running_job_whose_worker_is_lost(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1)
    _claim_one(store, lease_s=5)
    store.cancel(job.id)
    clock.advance(6)
    assert store.claim("w2", 30) == []
    assert store.get(job.id).status is JobStatus.CANCELLED


# --- TTL, leases, lost workers ---------------------------------------------------------


def test_job_past_its_queue_ttl_expires_and_is_never_claimed(
    store: JobStore, clock: FakeClock
) -> None:
    stale = store.submit("stale", ttl_s=10)
    fresh = store.submit("fresh")
    clock.advance(11)
    claimed = store.claim("w1", 30, limit=5)
    assert [j.id for j in claimed] == [fresh.id]
    out = store.get(stale.id)
    assert out.status is JobStatus.EXPIRED and out.attempts == 0
    assert out.finished_at == clock.now and out.started_at is None


def test_heartbeat_extends_the_lease(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1)
    _claim_one(store, lease_s=10)
    clock.advance(8)
    assert store.heartbeat(job.id, "w1", 10)
    assert store.get(job.id).lease_expires_at == clock.now + 10
    clock.advance(8)  # past the first lease, within the extended one
    assert store.claim("w2", 10) == []
    assert store.get(job.id).worker_id == "w1"


def test_expired_lease_is_requeued_then_worker_lost(store: JobStore, clock: FakeClock) -> None:
    job = store.submit(1, max_attempts=2)
    _claim_one(store, "w1", lease_s=5)
    clock.advance(6)
    again = _claim_one(store, "w2", lease_s=5)  # the sweep re-queued it, w2 claims it
    assert again.id == job.id and again.attempts == 2 and again.worker_id == "w2"
    assert not store.complete(job.id, "w1", "stale worker")  # w1 lost it

    clock.advance(6)
    assert store.claim("w3", 5) == []
    lost = store.get(job.id)
    assert lost.status is JobStatus.FAILED and lost.error is not None
    assert lost.error["code"] == "worker_lost" and lost.attempts == 2


def test_complete_after_lease_expiry_but_before_any_sweep_still_counts(
    store: JobStore, clock: FakeClock
) -> None:
    job = store.submit(1)
    _claim_one(store, lease_s=5)
    clock.advance(6)
    assert store.complete(job.id, "w1", "ok")
    assert store.get(job.id).status is JobStatus.SUCCEEDED


# --- progress --------------------------------------------------------------------------


def test_progress(store: JobStore) -> None:
    job = store.submit(1)
    assert store.get(job.id).progress is None
    _claim_one(store)
    assert store.set_progress(job.id, "w1", 0.25)
    assert store.get(job.id).progress == 0.25
    with pytest.raises(ValueError, match="progress"):
        store.set_progress(job.id, "w1", 1.5)


# --- idempotency -----------------------------------------------------------------------


def test_same_key_same_payload_returns_the_same_job(store: JobStore) -> None:
    first = store.submit({"a": 1, "b": 2}, idempotency_key="k1")
    # Key order does not matter: the hash is over canonical JSON.
    again = store.submit({"b": 2, "a": 1}, idempotency_key="k1")
    assert again.id == first.id and again.payload_hash == first.payload_hash
    assert len(store.list()) == 1


def test_same_key_different_payload_conflicts(store: JobStore) -> None:
    store.submit({"a": 1}, idempotency_key="k1")
    with pytest.raises(IdempotencyConflict) as info:
        store.submit({"a": 2}, idempotency_key="k1")
    assert info.value.idempotency_key == "k1" and info.value.code == "idempotency_conflict"
    assert len(store.list()) == 1


def test_idempotency_key_is_free_again_after_purge(store: JobStore, clock: FakeClock) -> None:
    first = store.submit(1, idempotency_key="k")
    store.cancel(first.id)
    clock.advance(100)
    assert store.purge(older_than_s=50) == 1
    assert store.submit(2, idempotency_key="k").id != first.id


# --- list / purge / unknown ids --------------------------------------------------------


def test_list_filters_by_status_and_limits(store: JobStore) -> None:
    ids = [store.submit(i).id for i in range(4)]
    store.cancel(ids[1])
    assert [j.id for j in store.list()] == ids
    assert [j.id for j in store.list(JobStatus.QUEUED)] == [ids[0], ids[2], ids[3]]
    assert [j.id for j in store.list(JobStatus.CANCELLED)] == [ids[1]]
    assert [j.id for j in store.list(limit=2)] == ids[:2]


def test_purge_deletes_only_terminal_jobs_past_retention(store: JobStore, clock: FakeClock) -> None:
    old = store.submit("old")
    store.cancel(old.id)
    running = store.submit("running")
    _claim_one(store)
    clock.advance(100)
    recent = store.submit("recent")
    store.cancel(recent.id)
    queued = store.submit("queued")

    assert store.purge(older_than_s=50) == 1
    with pytest.raises(JobNotFound):
        store.get(old.id)
    assert {j.id for j in store.list()} == {running.id, recent.id, queued.id}
    assert store.purge(older_than_s=50) == 0


def test_unknown_id_raises_job_not_found(store: JobStore) -> None:
    for call in (
        lambda: store.get("nope"),
        lambda: store.cancel("nope"),
        lambda: store.complete("nope", "w", 1),
        lambda: store.heartbeat("nope", "w", 1),
    ):
        with pytest.raises(JobNotFound) as info:
            call()
        assert isinstance(info.value, LookupError) and info.value.code == "job_not_found"


def test_closed_store_raises_store_unavailable(store: JobStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreUnavailable, match="closed"):
        store.submit(1)


# --- payloads --------------------------------------------------------------------------


def test_numpy_arrays_round_trip(store: JobStore) -> None:
    value = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i": np.array([[1, -2]], dtype=np.int64).T,  # not C-contiguous
        "b": np.array([True, False]),
        "empty": np.zeros((0, 4)),
        "scalar": np.float64(1.5),
        "nested": [np.array([1, 2], dtype=np.uint8), None, "s"],
    }
    job = store.submit(value)
    out = store.get(job.id).input
    for key in ("f", "i", "b", "empty"):
        assert out[key].dtype == value[key].dtype and out[key].shape == value[key].shape
        np.testing.assert_array_equal(out[key], value[key])
    assert out["scalar"] == 1.5 and out["nested"][1:] == [None, "s"]
    np.testing.assert_array_equal(out["nested"][0], [1, 2])
    out["f"][0, 0] = 99  # the caller's copy is writable and private
    assert store.get(job.id).input["f"][0, 0] == 0

    _claim_one(store)
    assert store.complete(job.id, "w1", {"scores": np.array([0.1, 0.9])})
    np.testing.assert_array_equal(store.get(job.id).result["scores"], [0.1, 0.9])


@pytest.mark.parametrize(
    "value",
    [object(), {1: "int key"}, float("nan"), np.array([object()], dtype=object), b"bytes"],
)
def test_values_that_are_not_json_are_refused_at_submit(store: JobStore, value: Any) -> None:
    with pytest.raises(InvalidJobPayload):
        store.submit(value)
    assert store.list() == []


def test_decode_refuses_pickles_and_malformed_arrays() -> None:
    blob = pickle.dumps({"a": 1})
    for bad in (
        blob,
        blob.decode("latin-1"),
        "{not json",
        "NaN",
        '{"__ndarray__": {"dtype": "|O", "shape": [1], "data": ""}}',
        '{"__ndarray__": {"dtype": "<f8", "shape": [2], "data": "AAAA"}}',
        '{"__ndarray__": {"dtype": "<f8", "shape": [1]}}',
        '{"__ndarray__": {"dtype": "<f8", "shape": [-1], "data": ""}}',
    ):
        with pytest.raises(InvalidJobPayload):
            decode_payload(bad)
    # A user dict that merely contains the marker key among others is left alone.
    assert decode_payload('{"__ndarray__": 1, "x": 2}') == {"__ndarray__": 1, "x": 2}


def test_encoding_is_canonical() -> None:
    assert encode_payload({"b": 1, "a": (1, 2)}) == '{"a":[1,2],"b":1}'


# --- invariants under random operation sequences (JB-06) -------------------------------


class JobStoreMachine(RuleBasedStateMachine):
    """Random submit/claim/heartbeat/complete/fail/cancel/time/purge/restart sequences;
    after every step each job must satisfy the JB-06 invariants, and no job may leave a
    terminal state or lose attempts."""

    kind = "memory"
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        if self.kind == "sqlite":
            self.tmp = tempfile.TemporaryDirectory()
        self.store = self._open()
        self.seen: dict[str, Job] = {}  # last snapshot of each job
        self.purged: set[str] = set()

    def _open(self) -> JobStore:
        if self.tmp is None:
            return MemoryJobStore(clock=self.clock)
        return SQLiteJobStore(Path(self.tmp.name) / "jobs.db", clock=self.clock)

    def teardown(self) -> None:
        self.store.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    @rule(
        target=jobs,
        value=st.integers(),
        ttl=st.sampled_from([None, 5.0, 50.0]),
        max_attempts=st.integers(1, 3),
    )
    def submit(self, value: int, ttl: float | None, max_attempts: int) -> str:
        return self.store.submit(value, ttl_s=ttl, max_attempts=max_attempts).id

    @rule(worker=st.sampled_from(["w1", "w2"]), limit=st.integers(1, 3))
    def claim(self, worker: str, limit: int) -> None:
        for job in self.store.claim(worker, lease_s=10.0, limit=limit):
            assert job.status is JobStatus.RUNNING and job.worker_id == worker

    @rule(id=jobs, worker=st.sampled_from(["w1", "w2"]))
    def heartbeat(self, id: str, worker: str) -> None:
        if id not in self.purged:
            self.store.heartbeat(id, worker, 10.0)

    @rule(id=jobs, worker=st.sampled_from(["w1", "w2"]))
    def complete(self, id: str, worker: str) -> None:
        if id not in self.purged:
            self.store.complete(id, worker, {"done": id})

    @rule(id=jobs, worker=st.sampled_from(["w1", "w2"]), retry=st.booleans())
    def fail(self, id: str, worker: str, retry: bool) -> None:
        if id not in self.purged:
            self.store.fail(id, worker, {"code": "e", "message": "m"}, retry=retry, backoff_s=1)

    @rule(ids=st.lists(jobs, max_size=3), worker=st.sampled_from(["w1", "w2"]))
    def complete_many(self, ids: list[str], worker: str) -> None:
        self.store.complete_many(worker, [(id, {"done": id}) for id in ids])

    @rule(ids=st.lists(jobs, max_size=3), worker=st.sampled_from(["w1", "w2"]))
    def release(self, ids: list[str], worker: str) -> None:
        held = {j.id for j in self.store.list(JobStatus.RUNNING, 10_000) if j.worker_id == worker}
        expected = []
        for id in ids:  # an id listed twice is released once
            expected.append(id in held)
            held.discard(id)
        assert self.store.release(worker, ids) == expected

    @rule(ids=st.lists(jobs, max_size=3), worker=st.sampled_from(["w1", "w2"]))
    def heartbeat_many(self, ids: list[str], worker: str) -> None:
        self.store.heartbeat_many(worker, ids, 10.0)

    @rule(id=jobs)
    def cancel(self, id: str) -> None:
        if id not in self.purged:
            self.store.cancel(id)

    @rule(seconds=st.sampled_from([0.5, 3.0, 11.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def purge(self) -> None:
        before = {j.id for j in self.store.list(limit=10_000)}
        n = self.store.purge(older_than_s=20.0)
        after = {j.id for j in self.store.list(limit=10_000)}
        assert len(before - after) == n
        for gone in before - after:
            assert self.seen[gone].status.terminal or gone not in self.seen
        self.purged |= before - after

    @rule()
    def restart(self) -> None:
        # SQLite: a new store on the same file sees the same jobs. Memory: nothing to do.
        if self.tmp is not None:
            self.store.close()
            self.store = self._open()

    @invariant()
    def jobs_are_consistent(self) -> None:
        jobs = self.store.list(limit=10_000)
        assert len({j.id for j in jobs}) == len(jobs)
        # No job vanishes except through purge (restarts included).
        assert set(self.seen) - self.purged <= {j.id for j in jobs}
        for job in jobs:
            assert job.max_attempts >= 1 and 0 <= job.attempts <= job.max_attempts
            assert (job.result is not None) == (job.status is JobStatus.SUCCEEDED)
            if job.started_at is not None:
                assert job.started_at >= job.created_at
            if job.finished_at is not None:
                assert job.finished_at >= (job.started_at or job.created_at)
            assert (job.finished_at is not None) == job.status.terminal
            assert (job.worker_id is not None) == (job.status is JobStatus.RUNNING)
            assert (job.lease_expires_at is not None) == (job.status is JobStatus.RUNNING)
            if job.status is JobStatus.SUCCEEDED:
                assert job.result == {"done": job.id}
            before = self.seen.get(job.id)
            if before is not None:
                assert job.attempts >= before.attempts
                if before.status.terminal:
                    assert job.status is before.status
                    assert job.result == before.result and job.finished_at == before.finished_at
            self.seen[job.id] = job


_machine_settings = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class SQLiteJobStoreMachine(JobStoreMachine):
    kind = "sqlite"


TestMemoryStoreInvariants = JobStoreMachine.TestCase
TestMemoryStoreInvariants.settings = _machine_settings
TestSQLiteStoreInvariants = SQLiteJobStoreMachine.TestCase
TestSQLiteStoreInvariants.settings = _machine_settings
