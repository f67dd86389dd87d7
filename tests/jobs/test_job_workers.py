"""Job workers for real: `servekit jobs worker` processes, leases, crashes, the jobs CLI.

JB-02 (kill -9 with 1,000 jobs pending), JB-03 (a job longer than its lease runs once),
JB-04 (a poison job that kills its worker process), JB-09 flavour (two worker processes
on one file) and the ``servekit jobs list|show|cancel|purge|worker`` commands.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import servekit
from servekit import cli
from servekit.jobs import JobQueue, JobStatus, SQLiteJobStore
from servekit.testing import Crash

_SRC = Path(servekit.__file__).resolve().parent.parent

# A batch function that logs each input it runs (one line each, O_APPEND, fsynced
# before returning), so a test can count executions across processes and kills.
_MODEL = textwrap.dedent(
    """
    import os
    import time

    LOG = os.environ["SERVEKIT_TEST_JOB_LOG"]


    def predict(xs):
        out = []
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for x in xs:
                os.write(fd, f"{x}\\n".encode())
                time.sleep(0.002)
                out.append(x * 2)
            os.fsync(fd)
        finally:
            os.close(fd)
        return out
    """
)


def _write_model(tmp_path: Path, name: str) -> Path:
    (tmp_path / f"{name}.py").write_text(_MODEL)
    return tmp_path / "executions.log"


def _env(tmp_path: Path, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    parts = [str(tmp_path), str(_SRC)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["SERVEKIT_TEST_JOB_LOG"] = str(log)
    env.pop("SERVEKIT_WEBHOOK_SECRET", None)
    return env


def _worker_command(db: Path, predictor: str, workers: int, lease_s: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "servekit",
        "jobs",
        "worker",
        "--store",
        str(db),
        "--predictor",
        predictor,
        "--workers",
        str(workers),
        "--lease-s",
        str(lease_s),
        "--grace-s",
        "10",
    ]


class _Worker:
    """One `servekit jobs worker` subprocess, its stderr kept in a file."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], name: str) -> None:
        self.stderr_path = cwd / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def check_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"worker exited early with {code}:\n{self.stderr()}"

    def signal_and_wait(self, signum: int, timeout_s: float) -> int:
        os.kill(self.proc.pid, signum)
        return self.proc.wait(timeout_s)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._stderr.close()


def _counts(db: Path) -> dict[str, int]:
    """Jobs per status, read with a plain connection (no write, no schema setup)."""
    conn = sqlite3.connect(db, timeout=5.0)
    try:
        rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
    finally:
        conn.close()
    return dict(rows)


def _wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, check: Callable[[], None]
) -> float:
    start = time.monotonic()
    while not predicate():
        check()
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def _submit_all(db: Path, inputs: list[int]) -> dict[str, int]:
    """Submit ``inputs`` (concurrently, so commits are grouped); {job id: input}."""
    store = SQLiteJobStore(db)
    try:
        with ThreadPoolExecutor(16) as pool:
            jobs = list(pool.map(store.submit, inputs))
    finally:
        store.close()
    assert len({job.id for job in jobs}) == len(inputs)
    return {job.id: job.input for job in jobs}


def _log_lines(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().splitlines()]


@pytest.fixture
def workers() -> Iterator[list[_Worker]]:
    started: list[_Worker] = []
    yield started
    for worker in started:
        worker.cleanup()


# --- JB-02 -------------------------------------------------------------------------------


def test_jb02_sigkill_worker_with_1000_jobs_pending_recovers_all(
    tmp_path: Path, workers: list[_Worker]
) -> None:
    n, kill_at, concurrency = 1000, 300, 4
    log = _write_model(tmp_path, "jb02_model")
    db = tmp_path / "jobs.sqlite3"
    inputs = _submit_all(db, list(range(n)))
    env = _env(tmp_path, log)
    command = _worker_command(db, "jb02_model:predict", concurrency, 1.0)

    first = _Worker(command, tmp_path, env, "first")
    workers.append(first)
    _wait_for(
        lambda: _counts(db).get("succeeded", 0) >= kill_at,
        30.0,
        f"{kill_at} jobs to succeed",
        first.check_alive,
    )
    assert first.signal_and_wait(signal.SIGKILL, 10) == -signal.SIGKILL
    lines_at_kill = len(_log_lines(log))

    store = SQLiteJobStore(db)
    try:
        before = {job.id: job for job in store.list(limit=2 * n)}
    finally:
        store.close()
    assert len(before) == n
    done_before = {id: job.attempts for id, job in before.items() if job.status.terminal}
    assert all(before[id].status is JobStatus.SUCCEEDED for id in done_before)
    running_at_kill = {id for id, job in before.items() if job.status is JobStatus.RUNNING}
    # The worker holds at most max(2 x runners, 32) jobs: running, plus claimed ahead.
    assert len(running_at_kill) <= max(2 * concurrency, 32)
    assert len(done_before) >= kill_at

    restarted = time.monotonic()
    second = _Worker(command, tmp_path, env, "second")
    workers.append(second)
    _wait_for(
        lambda: _counts(db).get("succeeded", 0) == n,
        40.0,
        "all 1000 jobs to succeed after the restart",
        second.check_alive,
    )
    recovery_s = time.monotonic() - restarted
    assert second.signal_and_wait(signal.SIGTERM, 15) == 0, second.stderr()

    store = SQLiteJobStore(db)
    try:
        after = {job.id: job for job in store.list(limit=2 * n)}
    finally:
        store.close()
    assert len(after) == n
    for id, job in after.items():
        assert job.status is JobStatus.SUCCEEDED, (job.status, job.error)
        assert job.input == inputs[id]
        assert job.result == 2 * inputs[id]
        assert job.lease_expires_at is None and job.worker_id is None
    # Completions committed before the kill are never redone.
    for id, attempts in done_before.items():
        assert after[id].attempts == attempts
    lines = _log_lines(log)
    per_input = collections.Counter(lines)
    assert set(per_input) == set(range(n)), "some input never ran"
    done_inputs = {inputs[id] for id in done_before}
    rerun_after_restart = set(lines[lines_at_kill:]) & done_inputs
    assert not rerun_after_restart, f"finished jobs ran again: {sorted(rerun_after_restart)}"
    executed_twice = {x for x, count in per_input.items() if count > 1}
    # JB-02: re-executed jobs <= the jobs in flight (held by the worker) at the kill.
    assert len(executed_twice) <= len(running_at_kill), sorted(executed_twice)
    # Only a job held by the killed worker may run again, and at most once more.
    assert executed_twice <= {inputs[id] for id in running_at_kill}
    assert all(per_input[x] == 2 for x in executed_twice)
    for x in executed_twice:
        id = next(i for i, v in inputs.items() if v == x)
        assert after[id].attempts == 2

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    print(
        f"\nJB-02: killed with {len(done_before)} succeeded and {len(running_at_kill)} "
        f"running; re-executed {len(executed_twice)} job(s); recovery (restart to all "
        f"terminal) {recovery_s:.2f} s"
    )


# --- JB-03 -------------------------------------------------------------------------------


def test_jb03_job_three_times_its_lease_runs_once_with_two_workers_polling(
    tmp_path: Path,
) -> None:
    db = tmp_path / "jobs.sqlite3"
    lock = threading.Lock()
    executions: list[tuple[str, Any]] = []

    def runner(name: str) -> Callable[[list[Any]], list[Any]]:
        def predict(xs: list[Any]) -> list[Any]:
            with lock:
                executions.extend((name, x) for x in xs)
            time.sleep(1.6)  # more than 3x the lease
            return [x + 1 for x in xs]

        return predict

    a = JobQueue(runner("a"), store=db, workers=1, lease_s=0.5, poll_interval_s=0.02)
    b = JobQueue(runner("b"), store=db, workers=1, lease_s=0.5, poll_interval_s=0.02)
    with a, b:
        job = a.submit(41)
        done = a.wait(job.id, timeout_s=15)
        time.sleep(0.6)  # another lease: a late re-claim would show up now
        assert b.get(job.id).status is JobStatus.SUCCEEDED
    assert done.status is JobStatus.SUCCEEDED
    assert done.result == 42
    assert done.attempts == 1
    assert len(executions) == 1, executions


# --- JB-04 -------------------------------------------------------------------------------


def test_jb04_poison_job_killing_its_worker_process_fails_after_max_attempts(
    tmp_path: Path,
) -> None:
    predictor = servekit.Predictor(Crash("poison"), backend=servekit.Processes(1))
    queue = JobQueue(
        predictor,
        store=tmp_path / "jobs.sqlite3",
        workers=1,
        max_attempts=3,
        retry_backoff_s=0.05,
        max_retry_backoff_s=0.2,
        lease_s=5.0,
    )
    started = time.monotonic()
    try:
        with queue:
            before = [queue.submit(i) for i in range(3)]
            poison = queue.submit("poison")
            after = [queue.submit(i) for i in range(3, 6)]
            failed = queue.wait(poison.id, timeout_s=18)
            others = [queue.wait(job.id, timeout_s=10) for job in before + after]
    finally:
        predictor.close()
    elapsed = time.monotonic() - started
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert failed.error["code"] == "worker_lost"  # JB-04: the reason a lost worker gets
    assert failed.attempts == 3
    assert failed.result is None
    for i, job in enumerate(others):
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.result == i
    print(f"\nJB-04: poison job failed after 3 attempts in {elapsed:.2f} s")


# --- CLI -----------------------------------------------------------------------------------


def test_jobs_cli_list_show_cancel_purge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(db)
    try:
        queued = [store.submit({"n": i}) for i in range(3)]
        done = store.submit({"n": 99})
        (claimed,) = store.claim("test-worker", 30.0, limit=1)
        assert claimed.id == queued[0].id
        store.complete(claimed.id, "test-worker", {"ok": True})
    finally:
        store.close()
    base = ["--store", str(db)]

    assert cli.main(["jobs", "list", *base]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert out[0].startswith(queued[0].id) and "succeeded" in out[0]
    for line, job in zip(out[1:], [queued[1], queued[2], done], strict=True):
        assert line.startswith(job.id) and "queued" in line

    assert cli.main(["jobs", "list", "--json", *base]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in rows] == [queued[0].id, queued[1].id, queued[2].id, done.id]
    assert rows[0]["status"] == "succeeded" and rows[0]["result"] == {"ok": True}

    assert cli.main(["jobs", "list", "--status", "queued", "--json", *base]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["id"] for row in rows} == {queued[1].id, queued[2].id, done.id}
    assert {row["status"] for row in rows} == {"queued"}

    assert cli.main(["jobs", "show", queued[1].id, *base]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == queued[1].id and shown["status"] == "queued"

    assert cli.main(["jobs", "cancel", queued[1].id, *base]) == 0
    out = capsys.readouterr().out
    assert queued[1].id in out and "cancelled" in out
    store = SQLiteJobStore(db)
    try:
        assert store.get(queued[1].id).status is JobStatus.CANCELLED
    finally:
        store.close()

    assert cli.main(["jobs", "purge", "--older-than-s", "0", *base]) == 0
    out = capsys.readouterr().out
    assert "purged 2 finished job(s)" in out  # the succeeded one and the cancelled one
    assert cli.main(["jobs", "list", "--json", *base]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in rows] == [queued[2].id, done.id]

    for action in ("show", "cancel"):
        assert cli.main(["jobs", action, "no-such-job", *base]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("servekit: ")
        assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("spec", "message"),
    [("nope", "expected MODULE:ATTR"), ("missing_module_jb:x", "cannot import")],
)
def test_jobs_worker_bad_predictor_exits_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_target adds the cwd
    db = tmp_path / "jobs.sqlite3"
    with pytest.raises(SystemExit) as info:
        cli.main(["jobs", "worker", "--store", str(db), "--predictor", spec])
    assert isinstance(info.value.code, str)
    assert info.value.code.startswith("servekit: ") and message in info.value.code
    assert spec.partition(":")[0] in info.value.code


# --- two worker processes (JB-09 flavour) --------------------------------------------------


def test_two_worker_processes_share_one_store_without_running_a_job_twice(
    tmp_path: Path, workers: list[_Worker]
) -> None:
    n = 300
    log = _write_model(tmp_path, "jb09_model")
    db = tmp_path / "jobs.sqlite3"
    inputs = _submit_all(db, list(range(n)))
    env = _env(tmp_path, log)
    command = _worker_command(db, "jb09_model:predict", 2, 2.0)
    pair = [_Worker(command, tmp_path, env, f"worker{i}") for i in range(2)]
    workers.extend(pair)

    def check() -> None:
        for worker in pair:
            worker.check_alive()

    _wait_for(lambda: _counts(db).get("succeeded", 0) == n, 40.0, "300 jobs", check)
    for worker in pair:
        os.kill(worker.proc.pid, signal.SIGTERM)
    for worker in pair:
        assert worker.proc.wait(15) == 0, worker.stderr()

    store = SQLiteJobStore(db)
    try:
        jobs = store.list(limit=2 * n)
    finally:
        store.close()
    assert len(jobs) == n
    assert all(job.status is JobStatus.SUCCEEDED for job in jobs)
    assert all(job.attempts == 1 and job.result == 2 * inputs[job.id] for job in jobs)
    per_input = collections.Counter(_log_lines(log))
    assert set(per_input) == set(range(n))
    assert [x for x, count in per_input.items() if count > 1] == []
