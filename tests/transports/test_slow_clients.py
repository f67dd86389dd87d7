"""TR-14: slow clients against a real `servekit serve` on 127.0.0.1.

100 connections send a request head at 1 byte a second (slowloris) while
``/v2/health/live`` is polled: the event loop is not held up by them (the poll's p99
stays low), and the server closes every one of them with ``408`` once the head
timeout passes. A kept-alive connection left idle is closed after
``--timeout-keep-alive``. These limits belong to the HTTP server (uvicorn's protocol),
not to servekit's core, which only sees complete requests.
"""

from __future__ import annotations

import os
import selectors
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")

_APP = textwrap.dedent(
    """
    import servekit as sk

    def identity(batch):
        return batch

    predictor = sk.Predictor(identity, name="m")
    """
)

SLOW = 100
HEAD_TIMEOUT_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_live(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None
        try:
            if httpx.get(f"{base}/v2/health/live").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _slowloris(port: int, count: int, until: float) -> dict[int, tuple[float, bytes]]:
    """Open ``count`` connections and send each a request head one byte a second
    until ``until``; for each connection, when the server closed it and what it said."""
    head = b"GET /v2/health/live HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 64
    selector = selectors.DefaultSelector()
    socks = []
    opened = time.monotonic()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    closed: dict[int, tuple[float, bytes]] = {}
    received: dict[int, bytes] = {}
    sent = 0
    next_byte = time.monotonic()
    try:
        while len(closed) < count and time.monotonic() < until:
            now = time.monotonic()
            if now >= next_byte and sent < len(head):
                for i, sock in enumerate(socks):
                    if i not in closed:
                        try:
                            sock.send(head[sent : sent + 1])
                        except OSError:
                            closed[i] = (time.monotonic() - opened, received.get(i, b""))
                sent += 1
                next_byte += 1.0
            for key, _ in selector.select(timeout=max(0.0, min(next_byte, until) - now)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                i = socks.index(sock)
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data:
                    received[i] = received.get(i, b"") + data
                else:
                    closed[i] = (time.monotonic() - opened, received.get(i, b""))
                    selector.unregister(sock)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    return closed


def test_slowloris_does_not_block_the_loop_and_is_closed_by_the_head_timeout(
    tmp_path: Path,
) -> None:
    (tmp_path / "tr14_app.py").write_text(_APP)
    port = _free_port()
    command = [sys.executable, "-m", "servekit", "serve", "tr14_app:predictor"]
    command += ["--port", str(port), "--log-level", "warning"]
    command += ["--header-timeout-s", str(HEAD_TIMEOUT_S), "--timeout-keep-alive", "1"]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_live(base, proc)
        until = time.monotonic() + HEAD_TIMEOUT_S + 6
        closed: dict[int, tuple[float, bytes]] = {}
        attack = threading.Thread(
            target=lambda: closed.update(_slowloris(port, SLOW, until)), daemon=True
        )
        attack.start()
        latencies = []
        with httpx.Client(timeout=10) as http:
            time.sleep(0.5)  # the slow connections are open and trickling
            while attack.is_alive() and time.monotonic() < until:
                started = time.perf_counter()
                assert http.get(f"{base}/v2/health/live").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
            attack.join(timeout=max(0.0, until - time.monotonic()) + 5)
        assert len(closed) == SLOW  # every slow connection was closed by the server
        times = sorted(t for t, _ in closed.values())
        # By the head timeout: not before it, and soon after it.
        assert times[0] >= HEAD_TIMEOUT_S - 0.5, times[:3]
        assert times[-1] < HEAD_TIMEOUT_S + 5, times[-3:]
        assert all(said.startswith(b"HTTP/1.1 408") for _, said in closed.values())
        p99 = statistics.quantiles(latencies, n=100)[98]
        print(f"TR-14: /v2/health/live p99 {p99 * 1000:.1f} ms over {len(latencies)} polls")
        # The row's target is 100 ms; a blocked loop would show seconds (the attack's
        # 1 s cadence or the head timeout). This machine is shared: assert generously.
        assert p99 < 0.5, p99
    finally:
        proc.terminate()
        proc.wait(30)


def test_an_idle_kept_alive_connection_is_closed_by_timeout_keep_alive(tmp_path: Path) -> None:
    (tmp_path / "tr14_app.py").write_text(_APP)
    port = _free_port()
    command = [sys.executable, "-m", "servekit", "serve", "tr14_app:predictor"]
    command += ["--port", str(port), "--log-level", "warning", "--timeout-keep-alive", "1"]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_live(base, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            answered = time.monotonic()
            data = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            idle = time.monotonic() - answered
        assert data.startswith(b"HTTP/1.1 200")
        assert 0.8 < idle < 5, idle  # closed by the 1 s keep-alive timeout, not by us
    finally:
        proc.terminate()
        proc.wait(30)
