"""The Inline back end: the model runs on the thread that asks for the prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._model import Model
from .._outcome import arun_batch, run_batch
from ..errors import Closed
from ._base import Backend, LoopThread, Task, call_model, load_model

__all__ = ["Inline"]


class Inline(Backend):
    """Run the model on the calling thread, with no hand-off (the fastest path).

    Sync models are called directly by whoever calls the predictor: a caller thread,
    or the event loop itself for ``apredict`` (so a slow sync model blocks that loop;
    use :class:`Threads` then). Async models are awaited on the caller's loop by
    ``apredict``; sync callers of an async model run it on a private loop thread this
    back end owns. Concurrent callers call the model concurrently, so the model must be
    thread-safe if several threads call the predictor.

    Example::

        sk.Predictor(model, backend=sk.Inline())
    """

    def __init__(self) -> None:
        self._model: Model[Any, Any] | None = None
        self._loop_thread: LoopThread | None = None

    def clone(self) -> Inline:
        """A new Inline back end."""
        return Inline()

    @property
    def capacity(self) -> int:
        """One batch at a time per calling thread; reported as 1."""
        return 1

    def start(self, model: Model[Any, Any]) -> None:
        """Load the model on this thread."""
        load_model(model)
        if model.is_async:
            self._loop_thread = LoopThread(f"servekit-inline-loop-{model.model_name}")
        self._model = model

    def _loaded(self) -> Model[Any, Any]:
        if self._model is None:
            raise Closed("the Inline back end is not running; start the predictor first")
        return self._model

    def run(self, items: Sequence[Any]) -> list[Any]:
        """Run one batch on this thread and return its outcomes."""
        model = self._loaded()
        if self._loop_thread is not None:
            return call_model(model, items, self._loop_thread.run)
        return run_batch(model.predict, items)

    async def arun(self, items: Sequence[Any]) -> list[Any]:
        """Run one batch from a coroutine: async models are awaited on the caller's loop."""
        model = self._loaded()
        if model.is_async:
            return await arun_batch(model.predict, items)
        return run_batch(model.predict, items)

    def submit(self, task: Task) -> None:
        """Run ``task`` now, on this thread."""
        if not task.skip_if_dead():
            task.done(self.run(task.items))

    def close(self, grace_s: float) -> None:
        """Close the model and stop the private loop thread, if one was started."""
        model, self._model = self._model, None
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None
        if model is not None:
            model.close()
