"""TR-02 under a real server: bodies over the limit, declared or chunked, get 413 before
they are read, and 100 of them leave the server's memory flat."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytest.importorskip("uvicorn")

_APP = textwrap.dedent(
    """
    import servekit as sk

    def identity(batch):
        return batch

    predictor = sk.Predictor(identity)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exchange(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request head and as much of the body as the server takes; the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        for part in body_parts:
            try:
                conn.sendall(part)
            except OSError:  # the server answered and closed: it did not read the rest
                break
        data = b""
        while b"\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n", 1)[0]


def test_oversized_bodies_get_413_before_being_read_and_memory_stays_flat(
    tmp_path: Path,
) -> None:
    (tmp_path / "tr02_app.py").write_text(_APP)
    port = _free_port()
    serve = [sys.executable, "-m", "servekit", "serve", "tr02_app:predictor"]
    proc = subprocess.Popen(
        [*serve, "--port", str(port), "--max-body-mb", "1", "--log-level", "warning"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/v2/health/live").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server = psutil.Process(proc.pid)
        declared = (
            b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 67108864\r\n\r\n"
        )
        chunked = (
            b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        block = b"x" * 65536
        chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        for _ in range(5):  # warm up allocations before measuring
            _exchange(port, declared, [block])
        before = server.memory_info().rss
        for i in range(100):
            if i % 2:
                # 64 MiB declared: refused on the header, after at most one block sent.
                status = _exchange(port, declared, [block] * 4)
            else:
                # Chunked, no length: refused once 1 MiB has arrived (of up to 4 MiB).
                status = _exchange(port, chunked, [chunk] * 64)
            assert status.startswith(b"HTTP/1.1 413"), status
        growth = server.memory_info().rss - before
        assert growth < 8 * 2**20, growth  # flat: nothing like 100 bodies was kept
        answer = httpx.post(f"{base}/predict", json={"input": 1})
        assert answer.status_code == 200  # live and serving afterwards
    finally:
        proc.terminate()
        proc.wait(30)
