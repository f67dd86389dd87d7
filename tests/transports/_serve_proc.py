"""A real ``servekit serve`` subprocess on 127.0.0.1 for the client tests (TR-13)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

#: An app of one identity model named ``echo``: every input comes back as ``output``.
IDENTITY_APP = textwrap.dedent(
    """
    import servekit as sk

    def identity(batch):
        return batch

    predictor = sk.Predictor(identity, name="echo", validate=False)
    """
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(root: Path, app: str = IDENTITY_APP, *, module: str = "tr13_app") -> Iterator[int]:
    """Run ``servekit serve module:predictor`` with ``app`` as the module's source in
    ``root``; yield its port once ``/v2/health/ready`` answers 200 (within 30 s), and
    stop it (SIGTERM, then wait) afterwards."""
    (root / f"{module}.py").write_text(app)
    port = free_port()
    command = [sys.executable, "-m", "servekit", "serve", f"{module}:predictor"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "servekit serve exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "servekit serve was not ready within 30 s"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)
