"""Signals to a real `servekit serve` process on 127.0.0.1.

SD-03: SIGTERM while a model is still in ``load()`` (on a thread, and in worker
processes), and while a model's ``close()`` is slow: the process exits within the
grace, with no traceback and no process left behind.
SD-04: a second SIGTERM or SIGINT during the drain escalates to a fast exit (status 1)
instead of waiting for the requests in flight: it never hangs.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

pytest.importorskip("uvicorn")

_APP = textwrap.dedent(
    """
    import os
    import pathlib
    import time

    import servekit as sk

    MARKS = pathlib.Path(os.environ["SD_MARKS"])


    class Slow(sk.Model):
        def __init__(self, load_s=0.0, predict_s=0.0, close_s=0.0):
            self.load_s, self.predict_s, self.close_s = load_s, predict_s, close_s

        def load(self):
            (MARKS / f"loading-{os.getpid()}").touch()
            time.sleep(self.load_s)

        def predict(self, batch):
            (MARKS / f"predicting-{os.getpid()}").touch()
            time.sleep(self.predict_s)
            return batch

        def close(self):
            (MARKS / f"closing-{os.getpid()}").touch()
            time.sleep(self.close_s)


    loading_inline = sk.Predictor(Slow(load_s=60))
    loading_processes = sk.Predictor(Slow(load_s=60), backend=sk.Processes(2))
    loading_second = {
        "quick": sk.Predictor(Slow(), name="quick", backend=sk.Threads(2)),
        "slow": sk.Predictor(Slow(load_s=60), name="slow", backend=sk.Processes(1)),
    }
    unloading = sk.Predictor(Slow(close_s=60), backend=sk.Threads(1))
    busy_threads = sk.Predictor(Slow(predict_s=30), backend=sk.Threads(2))
    busy_processes = sk.Predictor(Slow(predict_s=30), backend=sk.Processes(2))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[str]
    base: str
    marks: Path

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 30) -> None:
        """Wait until ``count`` worker(s) wrote a ``prefix`` mark (the model got there)."""
        deadline = time.monotonic() + timeout
        while len(list(self.marks.glob(f"{prefix}-*"))) < count:
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, f"no {prefix} mark"
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(f"{self.base}/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@contextmanager
def serve(tmp_path: Path, target: str, *options: str) -> Iterator[Server]:
    (tmp_path / "sd_app.py").write_text(_APP)
    marks = tmp_path / "marks"
    marks.mkdir()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SD_MARKS": str(marks)}
    command = [sys.executable, "-m", "servekit", "serve", f"sd_app:{target}"]
    command += ["--port", str(port), "--log-level", "warning", *options]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", marks)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _refused(url: str) -> bool:
    """True if a new connection is refused, or readiness answers 503."""
    try:
        return httpx.get(url).status_code == 503
    except httpx.ConnectError:
        return True


def _assert_gone(processes: list[psutil.Process], timeout: float = 5) -> None:
    """Every process in ``processes`` exits (a worker would be orphaned otherwise)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert left == []


@pytest.mark.parametrize(
    ("target", "marks", "processes"),
    [
        ("loading_inline", 1, 0),  # load() on a thread of the server
        ("loading_processes", 2, 2),  # load() in two worker processes
        ("loading_second", 2, 1),  # the first model is up, the second is loading
    ],
)
def test_sigterm_while_loading_exits_within_the_grace(
    tmp_path: Path, target: str, marks: int, processes: int
) -> None:
    with serve(tmp_path, target, "--grace-s", "5") as server:
        server.wait_for("loading", marks)
        family = server.descendants()
        assert len(family) >= processes  # the worker processes loading the model
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=6) == 0  # a stop before serving is a clean stop
        assert time.monotonic() - stopped < 6
        stderr = server.stderr()
        assert "Traceback" not in stderr, stderr
        assert "while loading" in stderr
        _assert_gone(family)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base}/v2/health/live")


def test_sigterm_while_the_model_closes_slowly_exits_within_the_grace(tmp_path: Path) -> None:
    with serve(tmp_path, "unloading", "--grace-s", "2") as server:
        server.wait_ready()
        assert httpx.post(f"{server.base}/predict", json={"input": 1}).status_code == 200
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("closing")  # the model's close() started, and sleeps 60 s
        assert server.proc.wait(timeout=10) == 0
        # The grace, the second shutdown allows past it, and the process's own exit.
        assert time.monotonic() - stopped < 2 + 1 + 3
        stderr = server.stderr()
        assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize(
    ("second", "target"),
    [(signal.SIGTERM, "busy_threads"), (signal.SIGINT, "busy_processes")],
)
def test_a_second_signal_during_the_drain_exits_fast(
    tmp_path: Path, second: signal.Signals, target: str
) -> None:
    with serve(tmp_path, target, "--grace-s", "20") as server:
        server.wait_ready()
        family = server.descendants()

        def call(x: int) -> int | str:
            try:
                return httpx.post(
                    f"{server.base}/predict", json={"input": x}, timeout=30
                ).status_code
            except httpx.TransportError as exc:
                return type(exc).__name__

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(call, x) for x in range(2)]
            server.wait_for("predicting")  # requests in the model, for 30 s
            server.proc.send_signal(signal.SIGTERM)
            # The drain has begun: uvicorn closed its listening socket (new connections
            # are refused), the two requests are still in the model.
            deadline = time.monotonic() + 5
            while not _refused(f"{server.base}/v2/health/ready"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert server.proc.poll() is None
            stopped = time.monotonic()
            server.proc.send_signal(second)
            assert server.proc.wait(timeout=5) == 1  # fast, and not a complete drain
            assert time.monotonic() - stopped < 5
            outcomes = [f.result(timeout=10) for f in futures]
        # The request in the model was cut off (the other one was either in the model
        # too, or came in after the first signal and was refused with 503).
        assert 200 not in outcomes, outcomes
        assert any(isinstance(o, str) for o in outcomes), outcomes
        assert set(outcomes) <= {"RemoteProtocolError", "ReadError", "ConnectError", 503}, outcomes
        stderr = server.stderr()
        assert "Traceback" not in stderr, stderr
        assert "second signal" in stderr
        _assert_gone(family)
