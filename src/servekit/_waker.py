"""Waking a waiting caller from another thread: a plain thread, an asyncio or a trio loop.

A request's result is produced on a worker thread (or the supervisor thread of a process
pool); the caller waits on its own thread or event loop. A waiter is made by the caller,
woken exactly once by the producer, and waited on by the caller, with an optional
timeout. For plain threads a pre-acquired lock is the cheapest primitive (cheaper than
``threading.Event``, which wraps a Condition); for event loops the wake-up is scheduled
on the loop with its own thread-safe call.
"""

from __future__ import annotations

import asyncio
import sys
from _thread import allocate_lock
from typing import Any, Protocol

__all__ = ["AsyncWaiter", "SyncWaiter", "Waiter", "make_async_waiter", "wake_all"]


class Waiter(Protocol):
    """Something a producer can wake once, from any thread."""

    def wake(self) -> None:
        """Wake the waiting caller. Called at most once, from any thread."""


#: The type of ``loop.create_future()``: a bare future may stand in for a waiter.
_FUTURE = asyncio.Future


class SyncWaiter:
    """Waiter for a caller that blocks its thread."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._lock.acquire()

    def wake(self) -> None:
        """Release the waiting thread."""
        self._lock.release()

    def wait(self, timeout_s: float | None) -> bool:
        """Block until woken; False if ``timeout_s`` passed first."""
        if timeout_s is None:
            return self._lock.acquire()
        return self._lock.acquire(timeout=max(timeout_s, 0.0))


class AsyncWaiter(Protocol):
    """Waiter for a caller that awaits on an event loop."""

    def wake(self) -> None:
        """Wake the waiting task (thread-safe)."""

    async def wait(self, timeout_s: float | None) -> bool:
        """Wait until woken; False if ``timeout_s`` passed first. Cancellation propagates."""


class _AsyncioWaiter:
    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._set)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting any more

    def _set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    @staticmethod
    def _set_all(waiters: list[_AsyncioWaiter]) -> None:
        for waiter in waiters:
            waiter._set()

    @staticmethod
    def wake_group(waiters: list[_AsyncioWaiter]) -> None:
        """Wake several waiters of one loop with a single thread-safe call."""
        try:
            waiters[0]._loop.call_soon_threadsafe(_AsyncioWaiter._set_all, waiters)
        except RuntimeError:
            pass

    async def wait(self, timeout_s: float | None) -> bool:
        if timeout_s is None:
            await self._future
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._future), max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            return False
        return True


class _TrioWaiter:
    __slots__ = ("_event", "_token", "_trio")

    def __init__(self, trio: Any) -> None:
        self._trio = trio
        self._event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def wake(self) -> None:
        try:
            self._token.run_sync_soon(self._event.set)
        except self._trio.RunFinishedError:
            pass  # the caller's run is over: nobody is waiting any more

    @staticmethod
    def _set_all(waiters: list[_TrioWaiter]) -> None:
        for waiter in waiters:
            waiter._event.set()

    @staticmethod
    def wake_group(waiters: list[_TrioWaiter]) -> None:
        """Wake several waiters of one trio run with a single thread-safe call."""
        try:
            waiters[0]._token.run_sync_soon(_TrioWaiter._set_all, waiters)
        except waiters[0]._trio.RunFinishedError:
            pass

    async def wait(self, timeout_s: float | None) -> bool:
        if timeout_s is None:
            await self._event.wait()
            return True
        with self._trio.move_on_after(max(timeout_s, 0.0)) as scope:
            await self._event.wait()
        return not scope.cancelled_caught


def wake_all(waiters: list[Any]) -> None:
    """Wake every waiter, scheduling one call per event loop rather than one per waiter.

    A waiter is one of this module's waiters, or a bare asyncio future (set on its loop).

    A finished batch often holds many callers of the same loop; each thread-safe call
    onto a loop writes to its self-pipe and costs a system call, so one call per loop
    that wakes all of that loop's callers is much cheaper.
    """
    groups: dict[int, list[Any]] = {}
    futures: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    # Most of a batch's waiters are futures of one loop: keep that loop's list at hand.
    last_loop: Any = None
    last_group: list[asyncio.Future[None]] = []
    for waiter in waiters:
        kind = type(waiter)
        if kind is _FUTURE:
            loop = waiter.get_loop()
            if loop is not last_loop:
                last_loop = loop
                last_group = futures.setdefault(loop, [])
            last_group.append(waiter)
        elif kind is _AsyncioWaiter:
            groups.setdefault(id(waiter._loop), []).append(waiter)
        elif kind is _TrioWaiter:
            groups.setdefault(id(waiter._token), []).append(waiter)
        else:
            waiter.wake()
    for group in groups.values():
        if len(group) == 1:
            group[0].wake()
        else:
            type(group[0]).wake_group(group)
    for same_loop in futures.values():
        try:
            same_loop[0].get_loop().call_soon_threadsafe(_resolve, same_loop)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        try:
            future.set_result(None)
        except asyncio.InvalidStateError:
            pass  # a cancelled caller's future is done already


def make_async_waiter() -> AsyncWaiter:
    """A waiter for the event loop running in this thread (asyncio or trio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        trio = sys.modules.get("trio")
        if trio is not None:
            try:
                trio.lowlevel.current_trio_token()
            except RuntimeError:
                pass
            else:
                return _TrioWaiter(trio)
        raise RuntimeError(
            "servekit's async methods need a running asyncio or trio event loop; "
            "from plain threads use the sync methods (predict, not apredict)"
        ) from None
    return _AsyncioWaiter(loop)
