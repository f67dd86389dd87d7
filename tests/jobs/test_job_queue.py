"""JobQueue in one process: submit, run, wait, callbacks, retries, cancel, TTLs, timeouts,
progress, webhooks end to end, and the async twins (asyncio and trio)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from standardwebhooks.webhooks import Webhook

import servekit as sk
from servekit.jobs import (
    CallbackState,
    Job,
    JobQueue,
    JobStatus,
    JobStore,
    MemoryJobStore,
    SQLiteJobStore,
    Webhooks,
    generate_secret,
    report_progress,
)

SECRET = generate_secret()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    s: JobStore = (
        MemoryJobStore() if request.param == "memory" else SQLiteJobStore(tmp_path / "q.db")
    )
    yield s
    s.close()


class Counting:
    """A per-item model that counts its calls per input and can be told to fail."""

    def __init__(self, fail: dict[Any, BaseException] | None = None) -> None:
        self.calls: dict[Any, int] = {}
        self.fail = fail or {}
        self.lock = threading.Lock()

    def __call__(self, x: Any) -> Any:
        key = json.dumps(x, sort_keys=True) if not isinstance(x, int | str) else x
        with self.lock:
            self.calls[key] = self.calls.get(key, 0) + 1
            n = self.calls[key]
        error = self.fail.get(key)
        if isinstance(error, list):
            if n <= len(error):
                raise error[n - 1]
        elif error is not None:
            raise error
        return {"y": x}


def queue_for(fn: Any, store: JobStore, **kwargs: Any) -> JobQueue:
    kwargs.setdefault("retry_backoff_s", 0.01)
    kwargs.setdefault("poll_interval_s", 0.01)
    return JobQueue(sk.Predictor(fn, per_item=True), store=store, **kwargs)


def test_submit_returns_a_committed_queued_job_and_wait_returns_the_result(
    store: JobStore,
) -> None:
    with queue_for(Counting(), store, workers=2) as q:
        job = q.submit({"a": 1})
        assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        assert store.get(job.id).input == {"a": 1}  # in the store before submit returned
        done = q.wait(job.id, timeout_s=10)
    assert done.status is JobStatus.SUCCEEDED
    assert done.result == {"y": {"a": 1}}
    assert done.attempts == 1
    assert done.error is None
    assert done.started_at is not None and done.finished_at is not None
    assert done.finished_at >= done.started_at >= done.created_at


def test_many_jobs_all_succeed_once(store: JobStore) -> None:
    model = Counting()
    with queue_for(model, store, workers=3) as q:
        jobs = [q.submit(i) for i in range(300)]
        done = [q.wait(j.id, timeout_s=30) for j in jobs]
    assert [d.result for d in done] == [{"y": i} for i in range(300)]
    assert set(model.calls.values()) == {1}


def test_numpy_inputs_and_results_round_trip(store: JobStore) -> None:
    with queue_for(lambda x: np.asarray(x) * 2, store) as q:
        job = q.submit(np.arange(6, dtype=np.float32).reshape(2, 3))
        result = q.wait(job.id, timeout_s=10).result
    assert isinstance(result, np.ndarray)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, np.arange(6, dtype=np.float32).reshape(2, 3) * 2)


def test_a_model_error_fails_the_job_at_once(store: JobStore) -> None:
    model = Counting(fail={1: ValueError("bad row")})
    with queue_for(model, store) as q:
        bad, good = q.submit(1), q.submit(2)
        failed = q.wait(bad.id, timeout_s=10)
        assert q.wait(good.id, timeout_s=10).status is JobStatus.SUCCEEDED
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert failed.error["code"] == "model_error"
    assert "bad row" in failed.error["message"]
    assert "Traceback" not in failed.error["message"]
    assert failed.attempts == 1
    assert failed.result is None


def test_a_retryable_error_is_retried_then_succeeds(store: JobStore) -> None:
    model = Counting(fail={1: [sk.RetryableError("busy"), sk.RetryableError("busy")]})
    with queue_for(model, store) as q:
        done = q.wait(q.submit(1).id, timeout_s=10)
    assert done.status is JobStatus.SUCCEEDED
    assert done.attempts == 3
    assert model.calls[1] == 3


def test_a_retryable_error_fails_after_max_attempts(store: JobStore) -> None:
    model = Counting(fail={1: sk.RetryableError("still busy")})
    with queue_for(model, store, max_attempts=2) as q:
        done = q.wait(q.submit(1).id, timeout_s=10)
    assert done.status is JobStatus.FAILED
    assert done.attempts == 2
    assert done.error == {"code": "retryable", "message": "still busy"}
    assert model.calls[1] == 2


def test_retries_back_off_exponentially(store: JobStore) -> None:
    model = Counting(fail={1: [sk.RetryableError("a"), sk.RetryableError("b")]})
    started = time.monotonic()
    with queue_for(model, store, retry_backoff_s=0.2, max_retry_backoff_s=10) as q:
        done = q.wait(q.submit(1).id, timeout_s=10)
    # Jittered in [0.5, 1] of 0.2 then 0.4: at least 0.3 s in all.
    assert done.attempts == 3
    assert time.monotonic() - started >= 0.3


def test_callback_is_called_once_with_what_polling_shows(store: JobStore) -> None:
    seen: list[Job] = []
    called = threading.Event()

    def callback(job: Job) -> None:
        seen.append(job)
        called.set()

    with queue_for(Counting(), store) as q:
        job = q.submit(5, callback=callback)
        done = q.wait(job.id, timeout_s=10)
        assert called.wait(10)
        time.sleep(0.05)
    assert seen == [done]


def test_a_raising_callback_is_logged_and_does_not_stop_the_queue(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    def callback(job: Job) -> None:
        raise RuntimeError("callback broke")

    with queue_for(Counting(), store) as q:
        first = q.submit(1, callback=callback)
        q.wait(first.id, timeout_s=10)
        second = q.wait(q.submit(2).id, timeout_s=10)
    assert second.status is JobStatus.SUCCEEDED
    assert "callback broke" in caplog.text


def test_idempotency_key_gives_the_same_job_and_one_execution(store: JobStore) -> None:
    model = Counting()
    with queue_for(model, store) as q:
        a = q.submit(7, idempotency_key="order-7")
        b = q.submit(7, idempotency_key="order-7")
        assert a.id == b.id
        q.wait(a.id, timeout_s=10)
        c = q.submit(7, idempotency_key="order-7")
        assert c.id == a.id
        assert c.status is JobStatus.SUCCEEDED
        with pytest.raises(sk.IdempotencyConflict):
            q.submit(8, idempotency_key="order-7")
    assert model.calls == {7: 1}


def test_cancel_a_queued_job_never_runs_it(store: JobStore) -> None:
    model = Counting()
    submitter = queue_for(model, store, workers=0)
    job = submitter.submit(1)
    cancelled = submitter.cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    with queue_for(model, store) as worker:
        other = worker.wait(worker.submit(2).id, timeout_s=10)
    assert other.status is JobStatus.SUCCEEDED
    assert model.calls == {2: 1}
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_cancel_a_running_job_drops_its_result_and_reports_cancelled_everywhere(
    store: JobStore,
) -> None:
    release = threading.Event()
    entered = threading.Event()
    seen: list[Job] = []

    def slow(x: Any) -> Any:
        entered.set()
        assert release.wait(10)
        return x

    with queue_for(slow, store) as q:
        job = q.submit(1, callback=seen.append)
        assert entered.wait(10)
        requested = q.cancel(job.id)
        assert requested.status is JobStatus.RUNNING
        assert requested.cancel_requested
        release.set()
        done = q.wait(job.id, timeout_s=10)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert done.status is JobStatus.CANCELLED
    assert done.result is None
    assert seen == [done]


def test_a_job_past_its_queue_ttl_expires_and_never_runs(store: JobStore) -> None:
    model = Counting()
    submitter = queue_for(model, store, workers=0)
    job = submitter.submit(1, ttl_s=0.05)
    time.sleep(0.1)
    with queue_for(model, store) as worker:
        done = worker.wait(job.id, timeout_s=10)
    assert done.status is JobStatus.EXPIRED
    assert model.calls == {}


def test_an_attempt_past_its_timeout_fails_and_the_runner_is_replaced(store: JobStore) -> None:
    release = threading.Event()

    def model(x: Any) -> Any:
        if x == "stuck":
            release.wait(10)
        return x

    try:
        with queue_for(model, store, workers=1) as q:
            stuck = q.submit("stuck", timeout_s=0.2)
            done = q.wait(stuck.id, timeout_s=10)
            # The only runner is stuck in the model: a replacement runs the next job.
            after = q.wait(q.submit("next").id, timeout_s=10)
            release.set()
    finally:
        release.set()
    assert done.status is JobStatus.FAILED
    assert done.error is not None
    assert done.error["code"] == "timeout"
    assert after.status is JobStatus.SUCCEEDED


def test_a_model_reports_progress_that_the_job_shows(store: JobStore) -> None:
    reported = threading.Event()
    release = threading.Event()

    def model(x: Any) -> Any:
        assert report_progress(0.25)
        reported.set()
        assert release.wait(10)
        report_progress(1.0)
        return x

    with queue_for(model, store) as q:
        job = q.submit(1)
        assert reported.wait(10)
        assert q.get(job.id).progress == 0.25
        release.set()
        done = q.wait(job.id, timeout_s=10)
    assert done.progress == 1.0


def test_report_progress_outside_a_job_does_nothing() -> None:
    assert report_progress(0.5) is False
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        report_progress(1.5)


def test_invalid_input_is_refused_at_submit_and_nothing_is_stored(store: JobStore) -> None:
    @sk.model
    def typed(xs: list[int]) -> list[int]:
        return xs

    with JobQueue(sk.Predictor(typed), store=store) as q:
        with pytest.raises(sk.InvalidInput):
            q.submit("not a number")
        with pytest.raises(sk.InvalidInput):
            q.submit(object())
        assert q.list() == []
    with queue_for(Counting(), store, workers=0) as untyped:
        with pytest.raises(sk.InvalidJobPayload):
            untyped.submit(object())
        assert untyped.list() == []


def test_webhook_needs_webhooks_configured_and_refuses_private_urls(store: JobStore) -> None:
    with (
        queue_for(Counting(), store, workers=0) as plain,
        pytest.raises(ValueError, match="webhooks=Webhooks"),
    ):
        plain.submit(1, webhook="https://example.com/hook")
    with queue_for(Counting(), store, workers=0, webhooks=Webhooks(SECRET)) as q:
        with pytest.raises(sk.WebhookRefused):
            q.submit(1, webhook="http://169.254.169.254/latest/meta-data")
        assert q.list() == []


def test_list_filters_by_status(store: JobStore) -> None:
    q = queue_for(Counting(), store, workers=0)
    jobs = [q.submit(i) for i in range(3)]
    q.cancel(jobs[1].id)
    assert [j.id for j in q.list(JobStatus.QUEUED)] == [jobs[0].id, jobs[2].id]
    assert [j.id for j in q.list(JobStatus.CANCELLED)] == [jobs[1].id]
    q.close()


def test_close_is_idempotent_and_submit_after_close_raises_closed(store: JobStore) -> None:
    q = queue_for(Counting(), store)
    q.wait(q.submit(1).id, timeout_s=10)
    q.close()
    q.close()
    with pytest.raises(sk.Closed):
        q.submit(2)
    with pytest.raises(sk.Closed):
        q.start()


def test_wait_times_out_with_deadline_exceeded_and_the_job_goes_on(store: JobStore) -> None:
    q = queue_for(Counting(), store, workers=0)
    job = q.submit(1)
    with pytest.raises(sk.DeadlineExceeded, match="still queued"):
        q.wait(job.id, timeout_s=0.05)
    assert q.get(job.id).status is JobStatus.QUEUED
    q.close()


def test_the_queue_owns_a_predictor_it_made_and_not_one_it_was_given(tmp_path: Path) -> None:
    given = sk.Predictor(lambda xs: xs)
    with JobQueue(given, store=MemoryJobStore()) as q:
        q.wait(q.submit(1).id, timeout_s=10)
    assert given.state is not sk.PredictorState.CLOSED
    given.close()
    with JobQueue(lambda xs: xs, store=tmp_path / "own.db") as own:
        own.wait(own.submit(1).id, timeout_s=10)
        made = own.predictor
    assert made is not None
    assert made.state is sk.PredictorState.CLOSED
    assert (tmp_path / "own.db").exists()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="workers"):
        JobQueue(lambda xs: xs, store=MemoryJobStore(), workers=-1)
    with pytest.raises(ValueError, match="needs a predictor"):
        JobQueue(None, store=MemoryJobStore())
    with pytest.raises(ValueError, match="lease_s"):
        JobQueue(lambda xs: xs, store=MemoryJobStore(), lease_s=0)
    with pytest.raises(TypeError, match="Webhooks"):
        JobQueue(lambda xs: xs, store=MemoryJobStore(), webhooks="secret")  # type: ignore[arg-type]


def test_old_finished_jobs_are_purged(store: JobStore) -> None:
    idle = queue_for(Counting(), store, workers=0, result_ttl_s=0.05)  # not started
    job = idle.cancel(idle.submit(1).id)
    time.sleep(0.1)
    assert idle.purge() == 1
    with pytest.raises(sk.JobNotFound):
        idle.get(job.id)
    idle.close()
    # The workers purge on their own as well.
    with queue_for(Counting(), store, result_ttl_s=0.05) as q:
        job = q.wait(q.submit(2).id, timeout_s=10)
        wait_for(lambda: not q.list())
        with pytest.raises(sk.JobNotFound):
            q.get(job.id)


# --- webhooks end to end: a real receiver on 127.0.0.1 -----------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 answering the statuses it is given, in turn."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0) -> None:
        self.statuses = statuses
        self.delay_s = delay_s
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                n = len(receiver.requests)
                time.sleep(receiver.delay_s)
                status = receiver.statuses[min(n, len(receiver.statuses)) - 1]
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(statuses: list[int], delay_s: float = 0.0) -> Receiver:
        made.append(Receiver(statuses, delay_s))
        return made[-1]

    yield make
    for r in made:
        r.close()


def loopback_webhooks(**kwargs: Any) -> Webhooks:
    kwargs.setdefault("backoff_s", 0.02)
    return Webhooks(SECRET, allow_networks=("127.0.0.1/32",), **kwargs)


def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cb01_receiver_failing_twice_gets_three_attempts_with_one_id(
    store: JobStore, receiver_factory: Any
) -> None:
    receiver = receiver_factory([500, 500, 200])
    with queue_for(Counting(), store, webhooks=loopback_webhooks()) as q:
        job = q.submit(3, webhook=receiver.url)
        q.wait(job.id, timeout_s=10)
        wait_for(lambda: q.get(job.id).callback_state is CallbackState.DELIVERED)
        final = q.get(job.id)
    assert final.callback_attempts == 3
    assert len(receiver.requests) == 3
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert len(ids) == 1
    headers, body = receiver.requests[-1]
    payload = Webhook(SECRET).verify(body, headers)  # CB-04: independent verification
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job.id
    assert payload["data"]["result"] == {"y": 3}


def test_cb02_receiver_always_failing_ends_failed_and_the_result_stays(
    store: JobStore, receiver_factory: Any
) -> None:
    receiver = receiver_factory([503])
    with queue_for(Counting(), store, webhooks=loopback_webhooks(max_attempts=3)) as q:
        job = q.submit(4, webhook=receiver.url)
        wait_for(lambda: q.get(job.id).callback_state is CallbackState.FAILED)
        final = q.get(job.id)
    assert len(receiver.requests) == 3
    assert final.status is JobStatus.SUCCEEDED
    assert final.result == {"y": 4}
    assert final.callback_error is not None
    assert "503" in final.callback_error


def test_cb02_a_slow_receiver_does_not_hold_up_the_jobs(
    store: JobStore, receiver_factory: Any
) -> None:
    receiver = receiver_factory([200])
    webhooks = loopback_webhooks(read_timeout_s=0.2, max_attempts=1)
    with queue_for(Counting(), store, webhooks=webhooks) as q:
        q.submit(1, webhook=receiver.url)
        done = [q.wait(q.submit(i).id, timeout_s=10) for i in range(2, 20)]
    assert all(d.status is JobStatus.SUCCEEDED for d in done)


def test_cb02_a_slow_receiver_does_not_delay_other_receivers(
    store: JobStore, receiver_factory: Any
) -> None:
    slow = receiver_factory([200], delay_s=2.0)
    fast = receiver_factory([200])
    webhooks = loopback_webhooks(read_timeout_s=5.0, max_concurrency=2)
    with queue_for(Counting(), store, webhooks=webhooks) as q:
        first = q.submit(1, webhook=slow.url)
        wait_for(lambda: len(slow.requests) == 1)  # the slow delivery holds one slot
        second = q.submit(2, webhook=fast.url)
        started = time.monotonic()
        wait_for(lambda: q.get(second.id).callback_state is CallbackState.DELIVERED)
        fast_s = time.monotonic() - started
        assert q.get(first.id).callback_state is CallbackState.PENDING
        wait_for(lambda: q.get(first.id).callback_state is CallbackState.DELIVERED)
    assert fast_s < 1.5


def test_cb03_a_delivery_pending_at_a_crash_is_sent_by_the_next_queue(
    tmp_path: Path, receiver_factory: Any
) -> None:
    receiver = receiver_factory([200])
    path = tmp_path / "crash.db"
    # A worker that finished a job and died before delivering its webhook.
    store = SQLiteJobStore(path)
    job = store.submit(9, webhook_url=receiver.url)
    (claimed,) = store.claim("dead-worker", lease_s=30)
    assert store.complete(claimed.id, "dead-worker", {"y": 9})
    store.close()
    assert receiver.requests == []
    # After restart: a queue that only submits still delivers what is due.
    restarted = SQLiteJobStore(path)
    with JobQueue(None, store=restarted, workers=0, webhooks=loopback_webhooks()) as q:
        wait_for(lambda: q.get(job.id).callback_state is CallbackState.DELIVERED)
    restarted.close()
    (headers, body), *_ = receiver.requests
    assert headers["webhook-id"] == f"msg_{job.id}"
    assert Webhook(SECRET).verify(body, headers)["data"]["status"] == "succeeded"


def test_a_failed_job_is_posted_with_its_error(store: JobStore, receiver_factory: Any) -> None:
    receiver = receiver_factory([204])
    model = Counting(fail={1: ValueError("nope")})
    with queue_for(model, store, webhooks=loopback_webhooks()) as q:
        job = q.submit(1, webhook=receiver.url)
        wait_for(lambda: q.get(job.id).callback_state is CallbackState.DELIVERED)
    headers, body = receiver.requests[0]
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "job.failed"
    assert payload["data"]["error"]["code"] == "model_error"


# --- async twins ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_twins(store: JobStore) -> None:
    async with queue_for(Counting(), store) as q:
        job = await q.asubmit(11)
        done = await q.await_job(job.id, timeout_s=10)
        assert done.result == {"y": 11}
        assert (await q.aget(job.id)) == done
        assert [j.id for j in await q.alist(JobStatus.SUCCEEDED)] == [job.id]
    # A queue with no workers of its own (and its own store): the job stays queued.
    async with queue_for(Counting(), MemoryJobStore(), workers=0) as idle:
        queued = await idle.asubmit(12)
        with pytest.raises(sk.DeadlineExceeded):
            await idle.await_job(queued.id, timeout_s=0.05)
        assert (await idle.acancel(queued.id)).status is JobStatus.CANCELLED


@pytest.mark.anyio
async def test_await_job_can_be_cancelled(store: JobStore) -> None:
    import anyio

    q = queue_for(Counting(), store, workers=0)
    job = await q.asubmit(1)
    with anyio.move_on_after(0.05) as scope:
        await q.await_job(job.id)
    assert scope.cancelled_caught
    await q.aclose()


# --- jobs claimed ahead of the runners ------------------------------------------------------


class Gate:
    """A per-item model whose first call blocks until opened; records every input."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.seen: list[Any] = []

    def __call__(self, x: Any) -> Any:
        self.seen.append(x)
        self.entered.set()
        assert self.open.wait(10)
        return x


def test_a_job_claimed_ahead_that_outlives_its_ttl_expires_unrun(store: JobStore) -> None:
    gate = Gate()
    with queue_for(gate, store, workers=1) as q:
        first = q.submit("first")
        assert gate.entered.wait(10)
        late = q.submit("late", ttl_s=0.1)
        wait_for(lambda: q.get(late.id).status is JobStatus.RUNNING)  # claimed ahead
        time.sleep(0.15)
        gate.open.set()
        assert q.wait(first.id, timeout_s=10).status is JobStatus.SUCCEEDED
        assert q.wait(late.id, timeout_s=10).status is JobStatus.EXPIRED
    assert gate.seen == ["first"]


def test_a_job_claimed_ahead_and_cancelled_never_runs(store: JobStore) -> None:
    gate = Gate()
    seen: list[Job] = []
    with queue_for(gate, store, workers=1) as q:
        q.submit("first")
        assert gate.entered.wait(10)
        second = q.submit("second", callback=seen.append)
        wait_for(lambda: q.get(second.id).status is JobStatus.RUNNING)
        assert q.cancel(second.id).cancel_requested
        gate.open.set()
        done = q.wait(second.id, timeout_s=10)
        wait_for(lambda: bool(seen))
    assert done.status is JobStatus.CANCELLED
    assert seen == [done]
    assert gate.seen == ["first"]


def test_close_hands_back_jobs_claimed_ahead_for_other_workers(store: JobStore) -> None:
    gate = Gate()
    q = queue_for(gate, store, workers=1)
    first = q.submit(0)
    assert gate.entered.wait(10)
    rest = [q.submit(i) for i in range(1, 5)]
    # Claimed ahead (running in the store), at least the next one.
    wait_for(lambda: any(q.get(j.id).status is JobStatus.RUNNING for j in rest))
    closer = threading.Thread(target=q.close, kwargs={"grace_s": 10})
    closer.start()
    wait_for(lambda: all(q.get(j.id).status is JobStatus.QUEUED for j in rest))
    gate.open.set()  # the started job finishes within the grace
    closer.join(10)
    assert not closer.is_alive()
    assert store.get(first.id).status is JobStatus.SUCCEEDED
    assert gate.seen == [0]
    with queue_for(Counting(), store) as other:
        done = [other.wait(j.id, timeout_s=10) for j in rest]
    assert [d.result for d in done] == [{"y": i} for i in range(1, 5)]
