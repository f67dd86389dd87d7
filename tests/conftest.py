"""Shared fixtures: every async test runs on asyncio and on trio; interrupting a wait."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from servekit._waker import SyncWaiter


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Interrupted(Exception):
    """Raised in the main thread by :class:`Interrupter`, as Ctrl-C raises KeyboardInterrupt."""


class Interrupter:
    """Interrupts the main thread's blocking wait the way Ctrl-C does: a real signal
    (SIGUSR1) whose handler raises :class:`Interrupted`, so the wait is cut short in
    the middle of its system call. Sent once the main thread blocks in
    :meth:`servekit._waker.SyncWaiter.wait`, so it never lands in the code before."""

    error = Interrupted

    def __init__(self) -> None:
        self._main = threading.main_thread().ident

    def __call__(self) -> None:
        """Wait until the main thread blocks in a caller's wait, then send the signal."""
        assert self._main is not None
        deadline = time.monotonic() + 10
        while True:
            frame = sys._current_frames().get(self._main)
            if frame is not None and frame.f_code is SyncWaiter.wait.__code__:
                break
            assert time.monotonic() < deadline, "the main thread never waited"
            time.sleep(0.001)
        signal.pthread_kill(self._main, signal.SIGUSR1)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted


@pytest.fixture
def interrupt() -> Iterator[Interrupter]:
    """An :class:`Interrupter` for a test running on the main thread."""
    if not hasattr(signal, "pthread_kill"):
        pytest.skip("needs POSIX signals")
    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR1, _raise_interrupted)
    try:
        yield Interrupter()
    finally:
        signal.signal(signal.SIGUSR1, previous)
