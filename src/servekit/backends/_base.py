"""What every execution back end provides, and the pieces they share."""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .._model import Model
from .._outcome import Failure, arun_batch, run_batch
from ..errors import ModelLoadError

__all__ = [
    "Backend",
    "LoopThread",
    "Task",
    "call_model",
    "check_batch_timeout",
    "fail_all",
    "load_model",
]

T = TypeVar("T")


@dataclass(slots=True)
class Task:
    """One batch handed to a back end.

    ``done`` is called exactly once, from whichever thread finished the task, with one
    outcome per item (a :class:`~servekit._outcome.Failure` for a failed item).
    ``check`` is asked just before the model runs: it returns None to go on, or the
    error to fail the items with instead (their caller has gone, or their deadline has
    passed), and then the model is not called.
    """

    items: Sequence[Any]
    done: Callable[[list[Any]], None]
    check: Callable[[], BaseException | None] | None = None

    def skip_if_dead(self) -> bool:
        """Fail the task without running it if ``check`` says so; True if it did."""
        if self.check is None:
            return False
        error = self.check()
        if error is None:
            return False
        self.done(fail_all(len(self.items), error))
        return True


def check_batch_timeout(batch_timeout_s: float | None) -> None:
    """Refuse a ``batch_timeout_s`` that is neither None (no limit) nor positive."""
    if batch_timeout_s is not None and not batch_timeout_s > 0:
        raise ValueError(f"batch_timeout_s must be > 0 or None (no limit), got {batch_timeout_s}")


def fail_all(n: int, error: BaseException) -> list[Any]:
    """Outcomes that fail ``n`` items with the same error."""
    return [Failure(error)] * n


class Backend(ABC):
    """Where a model's code runs: see :class:`Inline`, :class:`Threads`, :class:`Processes`.

    A back end is started once with the model, then runs batches handed to it until it
    is closed. It is owned by one Predictor.
    """

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many batches can run at the same time."""

    @abstractmethod
    def start(self, model: Model[Any, Any]) -> None:
        """Load the model where it will run; raise ModelLoadError if it cannot load."""

    @abstractmethod
    def submit(self, task: Task) -> None:
        """Run ``task`` and call ``task.done`` when it has finished (on any thread).

        Raises :class:`~servekit.Overloaded` when the back end's queue is full, and
        :class:`~servekit.Closed` after :meth:`close`.
        """

    @abstractmethod
    def close(self, grace_s: float) -> None:
        """Finish running batches within ``grace_s``, fail queued ones, stop everything."""

    @abstractmethod
    def clone(self) -> Backend:
        """A new, unstarted back end with the same settings (used by hot swap)."""

    def describe(self) -> str:
        """A short description for reprs and statistics."""
        return type(self).__name__


class LoopThread:
    """A private asyncio loop on a thread of its own, for async models called from sync code.

    A sync caller cannot run a coroutine on its own thread when that thread already
    runs an event loop (a notebook cell), and must never nest ``asyncio.run``: the
    coroutine runs on this loop instead. Owned and stopped by the back end that made it.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it finishes."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        """Stop the loop and join its thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


def load_model(model: Model[Any, Any]) -> None:
    """Run ``model.load()``, turning its failure into a loud ModelLoadError."""
    try:
        model.load()
    except Exception as exc:
        raise ModelLoadError(
            f"{model.model_name}.load() raised {type(exc).__name__}: {exc}; "
            "fix the model's load() and start again"
        ) from exc


def call_model(
    model: Model[Any, Any], items: Sequence[Any], run_coro: Callable[[Any], Any]
) -> list[Any]:
    """Run one batch through ``model`` with error isolation, from sync code.

    ``run_coro`` runs a coroutine to completion; it is used only for async models.
    """
    if model.is_async:
        outcomes: list[Any] = run_coro(arun_batch(model.predict, items))
        return outcomes
    return run_batch(model.predict, items)
