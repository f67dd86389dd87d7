"""`servekit serve` as a real process on 127.0.0.1: serving, then SIGTERM with requests
in flight (SD-01: they all complete, the process exits 0 within the grace)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")

_APP = textwrap.dedent(
    """
    import os
    import time
    import servekit as sk

    @sk.model(per_item=True)
    def slow_double(x: int) -> int:
        # Say that the item is in the model, so the test signals only then.
        open(os.path.join(os.environ["SD01_DIR"], f"{x}.started"), "w").close()
        time.sleep(1.0)
        return 2 * x

    predictor = sk.Predictor(slow_double, backend=sk.Threads(8))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_and_drains_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "sd01_app.py").write_text(_APP)
    port = free_port()
    started = tmp_path / "started"
    started.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SD01_DIR": str(started)}
    command = [sys.executable, "-m", "servekit", "serve", "sd01_app:predictor"]
    command += ["--port", str(port), "--grace-s", "10", "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)

        def call(x: int) -> httpx.Response:
            return httpx.post(f"{base}/predict", json={"input": x}, timeout=30)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, x) for x in range(8)]
            # SIGTERM once every request is in the model (each takes 1 s there).
            wait_until = time.monotonic() + 20
            while len(list(started.iterdir())) < 8:
                assert time.monotonic() < wait_until, "the requests did not reach the model"
                time.sleep(0.01)
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 8
        assert [r.json()["output"] for r in responses] == [2 * x for x in range(8)]
        assert proc.wait(timeout=11) == 0
        assert time.monotonic() - stopped < 11
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/v2/health/live")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_serve_without_a_target_module_exits_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "no_such_module:thing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "cannot import 'no_such_module'" in result.stderr
    assert "Traceback" not in result.stderr
