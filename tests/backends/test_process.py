"""The process back end under crashes and recycling: rows EX-02, EX-03, EX-04, EX-06,
EX-07 and EX-09 of the reliability catalog."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import servekit as sk
from servekit.testing import Crash


class Marking(sk.Model[Any, Any]):
    """Writes its pid to DIR/<tag> as an item starts, then sleeps for the item's delay."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def predict(self, batch: list[Any]) -> list[Any]:
        out = []
        for tag, delay in batch:
            (self.directory / tag).write_text(str(os.getpid()))
            time.sleep(delay)
            out.append(tag)
        return out


def _wait_for(path: Path, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.005)
    raise AssertionError(f"{path.name} never started")


def _wait_until(condition: Any, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
    return time.monotonic() - started


def _children() -> set[int]:
    """Child processes, less multiprocessing's resource tracker (started once, kept)."""
    return {
        c.pid
        for c in psutil.Process().children()
        if "resource_tracker" not in " ".join(c.cmdline())
    }


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_ex02_sigkill_mid_batch_fails_only_that_batch(tmp_path: Path) -> None:
    baseline_children = _children()
    predictor = sk.Predictor(Marking(tmp_path), backend=sk.Processes(2))
    predictor.start()
    with ThreadPoolExecutor(8) as pool:
        victim = pool.submit(predictor.predict, ("victim", 30.0))
        survivor = pool.submit(predictor.predict, ("survivor", 1.0))
        victim_pid = _wait_for(tmp_path / "victim")
        survivor_pid = _wait_for(tmp_path / "survivor")
        assert victim_pid != survivor_pid
        # Both workers are busy: these wait in the queue, not yet dispatched.
        queued = [pool.submit(predictor.predict, (f"queued{i}", 0.0)) for i in range(4)]
        time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        with pytest.raises(sk.WorkerCrashed) as info:
            victim.result(timeout=10)
        assert time.monotonic() - killed_at < 2.0  # T_detect
        assert info.value.exitcode == -signal.SIGKILL
        assert "SIGKILL" in str(info.value)
        assert survivor.result(timeout=10) == "survivor"
        assert [f.result(timeout=20) for f in queued] == [f"queued{i}" for i in range(4)]
    restarted = _wait_until(lambda: len(predictor.backend.worker_pids()) == 2, 10.0)  # type: ignore[attr-defined]
    assert restarted < 10.0  # T_restart
    assert victim_pid not in predictor.backend.worker_pids()  # type: ignore[attr-defined]
    assert predictor.predict_many([(f"after{i}", 0.0) for i in range(100)]) == [
        f"after{i}" for i in range(100)
    ]
    assert predictor.backend.restarts == 1  # type: ignore[attr-defined]
    predictor.close()
    children = _children()
    assert children == baseline_children  # no zombie, no orphan


@pytest.mark.parametrize(
    ("how", "exitcode"),
    [("exit", 13), ("kill", -signal.SIGKILL), ("segfault", -signal.SIGSEGV)],
)
def test_ex03_every_way_of_dying_is_reported_with_its_exit_code(how: str, exitcode: int) -> None:
    with sk.Predictor(Crash("die", how=how), backend=sk.Processes(1)) as p:  # type: ignore[arg-type]
        with pytest.raises(sk.WorkerCrashed) as info:
            p.predict("die")
        assert info.value.exitcode == exitcode
        assert p.predict("fine") == "fine"  # replaced, model reloaded


class Hog(sk.Model[Any, Any]):
    def predict(self, batch: list[Any]) -> list[Any]:
        import resource

        import numpy as np

        if "hog" in batch:
            resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31))
            np.ones(2**32, dtype=np.uint8)
        return batch


def test_ex03_out_of_memory_fails_only_that_request() -> None:
    with sk.Predictor(Hog(), backend=sk.Processes(1)) as p:
        with pytest.raises((sk.ModelError, sk.WorkerCrashed)):
            p.predict("hog")
        assert p.predict_many(["a", "b"]) == ["a", "b"]


def test_ex04_poison_item_crash_loop_backs_off_and_recovers() -> None:
    with sk.Predictor(Crash("poison"), backend=sk.Processes(1)) as p:
        backend: Any = p.backend
        for _ in range(3):
            with pytest.raises(sk.WorkerCrashed):
                p.predict("poison")
        assert not backend.healthy
        assert not p.ready
        spawned_before = backend._counts.spawned
        time.sleep(1.0)
        # Backoff: the third crash in a row waits two seconds before the next spawn.
        assert backend._counts.spawned == spawned_before
        assert p.predict("good", timeout_s=20) == "good"
        assert backend.healthy and p.ready


class Unpicklable(sk.Model[Any, Any]):
    def predict(self, batch: list[Any]) -> list[Any]:
        return [threading.Lock() if x == "lock" else x for x in batch]


def test_ex06_unpicklable_input_or_output_fails_only_that_item() -> None:
    with sk.Predictor(Unpicklable(), backend=sk.Processes(1)) as p:
        out = p.predict_many([1, threading.Lock(), 3], return_exceptions=True)
        assert out[0] == 1 and out[2] == 3
        assert isinstance(out[1], sk.SerializationError)
        out = p.predict_many([1, "lock", 3], return_exceptions=True)
        assert out[0] == 1 and out[2] == 3
        assert isinstance(out[1], sk.SerializationError)
        assert p.backend.restarts == 0  # type: ignore[attr-defined]


class Unpicklable_Error(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = threading.Lock()


class RaisesUnpicklable(sk.Model[Any, Any]):
    def predict(self, batch: list[Any]) -> list[Any]:
        return [Unpicklable_Error() if x == "bad" else x for x in batch]


def test_an_exception_that_cannot_be_pickled_still_reaches_the_caller() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Unpicklable_Error())
    with sk.Predictor(RaisesUnpicklable(), backend=sk.Processes(1)) as p:
        with pytest.raises(sk.ModelError, match="cannot travel") as info:
            p.predict("bad")
        assert info.value.error_type == "Unpicklable_Error"
        assert p.predict("ok") == "ok"


def test_ex07_no_leak_after_crashes_and_shutdown() -> None:
    baseline_children = _children()
    baseline_fds = _fd_count()
    for _ in range(2):
        with sk.Predictor(Crash("die", how="kill"), backend=sk.Processes(2)) as p:
            for _ in range(2):
                with pytest.raises(sk.WorkerCrashed):
                    p.predict("die")
            assert p.predict_many(list(range(20))) == list(range(20))
    assert _children() == baseline_children
    assert [t.name for t in threading.enumerate() if t.name.startswith("servekit-")] == []
    assert abs(_fd_count() - baseline_fds) <= 2


def test_close_stops_a_worker_stuck_in_the_model_and_fails_its_request(tmp_path: Path) -> None:
    baseline_children = _children()
    p = sk.Predictor(Marking(tmp_path), backend=sk.Processes(1))
    p.start()
    with ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(p.predict, ("stuck", 60.0))
        _wait_for(tmp_path / "stuck")
        started = time.monotonic()
        p.close(grace_s=0.2)
        assert time.monotonic() - started < 10
        with pytest.raises(sk.Closed):
            stuck.result(timeout=5)
    assert _children() == baseline_children


def test_deadline_of_a_queued_item_is_kept(tmp_path: Path) -> None:
    with sk.Predictor(Marking(tmp_path), backend=sk.Processes(1)) as p:
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(p.predict, ("busy", 0.5))
            _wait_for(tmp_path / "busy")
            with pytest.raises(sk.DeadlineExceeded):
                p.predict(("late", 0.0), timeout_s=0.05)
            assert busy.result(timeout=10) == "busy"
        time.sleep(0.1)
        assert not (tmp_path / "late").exists()  # the expired item never reached the model


def _refuse_to_load() -> None:
    raise RuntimeError("cannot be rebuilt in the worker")


class Unloadable:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


def test_input_that_cannot_be_unpickled_in_the_worker_fails_typed() -> None:
    with sk.Predictor(Unpicklable(), backend=sk.Processes(1)) as p:
        with pytest.raises(sk.SerializationError, match="cannot be rebuilt"):
            p.predict(Unloadable())
        assert p.predict(2) == 2
        assert p.backend.restarts == 0  # type: ignore[attr-defined]


def test_a_batch_of_same_shape_arrays_travels_stacked_and_comes_back_as_rows() -> None:
    import numpy as np

    from servekit.backends import _wire

    xs = [np.full(4, i, dtype=np.float32) for i in range(5)]
    packed = _wire.pack(xs)
    assert isinstance(packed, _wire.Stacked) and packed.array.shape == (5, 4)
    mixed = [np.zeros(2), np.zeros(3)]
    assert _wire.pack(mixed) is mixed
    with sk.Predictor(lambda b: [x * 2 for x in b], backend=sk.Processes(1)) as p:
        outs = p.predict_many(xs)
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, np.full(4, 2 * i, dtype=np.float32))
        assert out.flags.writeable


class Pids(sk.Model[Any, Any]):
    """Answers each item with the pid of the worker that ran it; load() takes ``load_s``."""

    def __init__(self, load_s: float = 0.0) -> None:
        self.load_s = load_s

    def load(self) -> None:
        time.sleep(self.load_s)

    def predict(self, batch: list[Any]) -> list[Any]:
        return [(x, os.getpid()) for x in batch]


def test_ex09_workers_are_recycled_between_batches_and_no_request_fails() -> None:
    backend = sk.Processes(2, max_tasks_per_child=3)
    with sk.Predictor(Pids(), backend=backend) as p:
        first = set(backend.worker_pids())
        seen: set[int] = set()
        deadline = time.monotonic() + 90

        def client(k: int) -> int:
            i = 0
            while backend.recycled < 20:
                assert time.monotonic() < deadline, "fewer than 20 recycles in 90 s"
                x = k * 1_000_000 + i
                answer, pid = p.predict(x)  # a recycle that broke a batch would raise here
                assert answer == x
                seen.add(pid)
                i += 1
            return i

        with ThreadPoolExecutor(4) as pool:
            served = sum(pool.map(client, range(4)))
        assert backend.recycled >= 20
        assert backend.restarts == 0 and backend.healthy
        assert p.statistics().errors == 0
        assert len(seen) >= 20  # every recycled worker served before it went
        # The recycled workers exit; two fresh ones remain.
        _wait_until(lambda: len(backend.worker_pids()) == 2, 30)
        assert not set(backend.worker_pids()) & first
    assert served >= 20 * 3
    assert _children() == set()


def test_a_recycled_worker_serves_until_its_replacement_is_ready() -> None:
    backend = sk.Processes(1, max_tasks_per_child=1)
    with sk.Predictor(Pids(load_s=2.0), backend=backend) as p:
        _, old = p.predict(1)  # its one batch: it is being replaced now
        _, again = p.predict(2)  # the replacement still loads: the old worker serves
        assert again == old
        assert backend.recycled == 1
        _wait_until(lambda: old not in backend.worker_pids(), 30)
        _, new = p.predict(3)
        assert new != old
        assert backend.restarts == 0


class Hangs(sk.Model[Any, Any]):
    """Hangs (for an hour) on a batch holding "hang"; echoes any other batch."""

    def predict(self, batch: list[Any]) -> list[Any]:
        if "hang" in batch:
            time.sleep(3600)
        return list(batch)


def test_bq15_a_batch_past_batch_timeout_fails_whole_and_its_worker_is_replaced() -> None:
    backend = sk.Processes(1, batch_timeout_s=0.5)
    with sk.Predictor(Hangs(), backend=backend) as p:
        assert p.predict("quick") == "quick"  # under the limit: untouched
        (hung_pid,) = backend.worker_pids()
        outs = p.predict_many(["a", "hang", "b"], return_exceptions=True)  # one batch
        assert all(isinstance(out, sk.ExecutionTimeout) for out in outs)
        error = outs[1]
        assert isinstance(error, TimeoutError) and not isinstance(error, sk.WorkerCrashed)
        assert error.code == "execution_timeout"
        assert error.exitcode == -signal.SIGKILL
        assert "batch_timeout_s=0.5" in error.message
        assert not psutil.pid_exists(hung_pid) or psutil.Process(hung_pid).status() == "zombie"
        assert p.predict("after") == "after"  # on the replacement
        assert backend.worker_pids() != [hung_pid]
        assert backend.restarts == 1 and backend.healthy


def test_batch_timeout_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_timeout_s"):
        sk.Processes(1, batch_timeout_s=0)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        sk.Processes(1, max_tasks_per_child=0)
