"""Models for users' own tests: echo, slow, failing on chosen items, crashing the worker.

They are ordinary :class:`~servekit.Model` subclasses, picklable, so they run on every
back end, including :class:`~servekit.Processes`.

Example::

    from servekit.testing import FailOn

    with sk.Predictor(FailOn({3})) as p:
        p.predict_many([1, 2, 3], return_exceptions=True)   # [1, 2, ModelError(...)]
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, Literal

from ._model import Model

__all__ = ["Crash", "Echo", "FailOn", "Slow"]


class Echo(Model[Any, Any]):
    """Returns each input unchanged, and records every batch it was called with.

    ``calls`` (one list per call) is kept in the process that runs the model: read it
    on the Inline and Threads back ends.
    """

    def __init__(self) -> None:
        #: Every batch the model was called with, in call order.
        self.calls: list[list[Any]] = []
        self._lock = threading.Lock()

    def predict(self, batch: list[Any]) -> list[Any]:
        """Return ``batch`` unchanged."""
        with self._lock:
            self.calls.append(list(batch))
        return list(batch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        for name in ("release", "entered"):
            state.pop(name, None)  # an Event does not cross process boundaries
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class Slow(Echo):
    """An :class:`Echo` that sleeps ``delay_s`` per call (per batch, not per item).

    ``release`` (a threading.Event), when given, makes each call wait for it instead,
    so a test can hold the model busy and release it at a moment of its choosing;
    ``entered`` is set as each call begins, so the test knows the model is busy.
    """

    def __init__(self, delay_s: float = 0.05, *, release: threading.Event | None = None) -> None:
        super().__init__()
        #: Seconds each call sleeps.
        self.delay_s = delay_s
        #: Event each call waits for, if given (Inline and Threads back ends only).
        self.release: threading.Event | None = release
        #: Set when a call begins (Inline and Threads back ends only).
        self.entered = threading.Event()

    def predict(self, batch: list[Any]) -> list[Any]:
        """Sleep (or wait for ``release``), then return ``batch`` unchanged."""
        self.entered.set()
        if self.release is not None:
            self.release.wait()
        else:
            time.sleep(self.delay_s)
        return super().predict(batch)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.release = None
        self.entered = threading.Event()


class FailOn(Echo):
    """An :class:`Echo` that fails the items in ``bad`` (or for which ``bad(item)`` is true).

    ``mode="raise"`` (the default) raises for any batch that holds a bad item, like a
    model that cannot tell which item broke it; ``mode="return"`` returns a ValueError
    in each bad item's place.
    """

    def __init__(
        self,
        bad: Collection[Any] | Callable[[Any], bool],
        *,
        mode: Literal["raise", "return"] = "raise",
    ) -> None:
        super().__init__()
        #: The bad items, or a predicate that picks them.
        self.bad = bad
        #: How bad items fail: "raise" or "return".
        self.mode = mode

    def _is_bad(self, item: Any) -> bool:
        return bool(self.bad(item)) if callable(self.bad) else item in self.bad

    def predict(self, batch: list[Any]) -> list[Any]:
        """Echo the batch; fail bad items as ``mode`` says."""
        outputs = super().predict(batch)
        bad = [item for item in batch if self._is_bad(item)]
        if self.mode == "raise" and bad:
            raise ValueError(f"bad item {bad[0]!r}")
        return [ValueError(f"bad item {x!r}") if self._is_bad(x) else x for x in outputs]


class Crash(Echo):
    """An :class:`Echo` that kills the process running it when it sees ``trigger``.

    ``how`` is ``"exit"`` (``os._exit(exit_code)``), ``"kill"`` (SIGKILL to itself) or
    ``"segfault"`` (reads address 0). Use it with :class:`~servekit.Processes` to test
    crash handling; on other back ends it kills the host process.
    """

    def __init__(
        self,
        trigger: Any = "crash",
        *,
        how: Literal["exit", "kill", "segfault"] = "exit",
        exit_code: int = 13,
    ) -> None:
        super().__init__()
        #: The item that makes the model crash.
        self.trigger = trigger
        #: How it crashes.
        self.how = how
        #: The exit code for ``how="exit"``.
        self.exit_code = exit_code

    def predict(self, batch: list[Any]) -> list[Any]:
        """Echo the batch, or die if ``trigger`` is in it."""
        if any(type(item) is type(self.trigger) and item == self.trigger for item in batch):
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.how == "segfault":
                ctypes.string_at(0)
            os._exit(self.exit_code)
        return super().predict(batch)
