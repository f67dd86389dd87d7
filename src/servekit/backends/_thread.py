"""The Threads back end: a pool of worker threads that this back end owns."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import cloudpickle

from .._model import Model
from ..errors import Closed, ExecutionTimeout, ModelLoadError, Overloaded
from ._base import Backend, Task, call_model, check_batch_timeout, fail_all, load_model

__all__ = ["Threads"]

logger = logging.getLogger("servekit")


class _Running:
    """A batch a worker thread runs, watched for ``batch_timeout_s``."""

    __slots__ = ("started", "task", "timed_out")

    def __init__(self, task: Task) -> None:
        self.started = time.monotonic()
        self.task = task
        self.timed_out = False  # its callers got ExecutionTimeout; its result is dropped


class Threads(Backend):
    """Run the model on ``n`` worker threads owned by this back end.

    Good for models that release the GIL (numpy, PyTorch, ONNX Runtime) and for I/O-bound
    models, and to keep slow sync models off an event loop. The pool has its own threads
    and its own bounded queue (``max_queue`` batches waiting; beyond that, submissions
    fail at once with :class:`~servekit.Overloaded`), so it never competes with anyio's
    shared default thread limiter.

    ``share_model=True`` (the default) loads one model instance, used by every thread:
    memory is paid once, and ``predict`` must be thread-safe (numpy, scikit-learn and
    PyTorch inference are). ``share_model=False`` gives each thread its own copy (made
    with cloudpickle before ``load()``), loaded on that thread, for models that keep
    per-call state.

    ``batch_timeout_s`` bounds how long one batch may run: when a batch runs longer,
    every item of it fails at once with :class:`~servekit.ExecutionTimeout`. A thread
    cannot be stopped, so the batch goes on running; its result is dropped when it
    returns, and until then :attr:`healthy` is False (the predictor is not ready), so
    a load balancer sends traffic elsewhere. Use ``Processes`` to get the worker back.

    Example::

        sk.Predictor(model, backend=sk.Threads(2))
    """

    def __init__(
        self,
        n: int = 1,
        *,
        share_model: bool = True,
        max_queue: int = 1024,
        batch_timeout_s: float | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"Threads(n) needs n >= 1, got {n}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        check_batch_timeout(batch_timeout_s)
        #: Number of worker threads.
        self.n = n
        #: Whether the threads share one model instance.
        self.share_model = share_model
        #: Batches that may wait for a free thread before submissions are refused.
        self.max_queue = max_queue
        #: Seconds one batch may run before its callers get ExecutionTimeout (None: no limit).
        self.batch_timeout_s = batch_timeout_s
        # With batch_timeout_s: the running batches, and how many timed-out ones are
        # still running (unhealthy while any is).
        self._watched: set[_Running] = set()
        self._overdue = 0
        self._watchdog: threading.Thread | None = None
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._dog = threading.Condition(lock)  # the watchdog's own: submit wakes workers only
        self._queue: deque[Task] = deque()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._running = False
        self._shared: Model[Any, Any] | None = None
        self._run_time_s = 0.0  # moving average of one batch's run time, for retry hints

    def clone(self) -> Threads:
        """A new, unstarted pool with the same settings."""
        return Threads(
            self.n,
            share_model=self.share_model,
            max_queue=self.max_queue,
            batch_timeout_s=self.batch_timeout_s,
        )

    @property
    def capacity(self) -> int:
        """``n``: one batch per thread."""
        return self.n

    @property
    def healthy(self) -> bool:
        """False while a batch that ran past ``batch_timeout_s`` is still running."""
        return self._overdue == 0

    def describe(self) -> str:
        """E.g. ``Threads(2, shared model)``."""
        return f"Threads({self.n}, {'shared' if self.share_model else 'per-thread'} model)"

    def start(self, model: Model[Any, Any]) -> None:
        """Load the model (once, or once per thread) and start the threads."""
        self._stopping = False  # a start that failed earlier may be retried
        if self.share_model:
            load_model(model)
            self._shared = model
            models = [model] * self.n
        else:
            blob = cloudpickle.dumps(model)
            models = [cloudpickle.loads(blob) for _ in range(self.n)]
        loaded: list[BaseException | None] = []
        ready = threading.Condition()
        self._running = True
        for index, own in enumerate(models):
            thread = threading.Thread(
                target=self._work,
                args=(own, not self.share_model, loaded, ready),
                name=f"servekit-worker-{model.model_name}-{index}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        with ready:
            ready.wait_for(lambda: len(loaded) == self.n)
        failures = [err for err in loaded if err is not None]
        if failures:
            self.close(0.0)
            raise failures[0]
        if self.batch_timeout_s is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"servekit-watchdog-{model.model_name}", daemon=True
            )
            self._watchdog.start()

    def submit(self, task: Task) -> None:
        """Queue ``task`` for the next free thread."""
        with self._cond:
            if self._stopping or not self._running:
                raise Closed("the Threads back end is closed")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(
                    f"{len(self._queue)} batches are waiting for a worker thread "
                    f"(max_queue={self.max_queue}); retry later or add threads",
                    retry_after_s=max(self._run_time_s * len(self._queue) / self.n, 0.001),
                )
            self._queue.append(task)
            self._cond.notify()

    def _work(
        self,
        model: Model[Any, Any],
        own_model: bool,
        loaded: list[BaseException | None],
        ready: threading.Condition,
    ) -> None:
        error: BaseException | None = None
        if own_model:
            try:
                load_model(model)
            except ModelLoadError as exc:
                error = exc
        with ready:
            loaded.append(error)
            ready.notify_all()
        if error is not None:
            return
        loop: asyncio.AbstractEventLoop | None = None
        try:
            if model.is_async:
                loop = asyncio.new_event_loop()
            run_coro = loop.run_until_complete if loop is not None else None
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue:
                        return
                    task = self._queue.popleft()
                if task.skip_if_dead():
                    continue
                started = time.perf_counter()
                if self.batch_timeout_s is not None:
                    running = _Running(task)
                    with self._cond:
                        self._watched.add(running)
                outcomes = call_model(model, task.items, run_coro)  # type: ignore[arg-type]
                self._run_time_s = 0.9 * self._run_time_s + 0.1 * (time.perf_counter() - started)
                if self.batch_timeout_s is not None:
                    with self._cond:
                        self._watched.remove(running)
                        if running.timed_out:  # its callers got ExecutionTimeout: dropped
                            self._overdue -= 1
                            continue
                try:
                    task.done(outcomes)
                except Exception:  # pragma: no cover - done callbacks do not raise
                    logger.exception("servekit: a task's completion callback raised")
        finally:
            if loop is not None:
                loop.close()
            if own_model:
                model.close()

    def _watch(self) -> None:
        """Fail the callers of every batch that runs past batch_timeout_s, once."""
        limit = self.batch_timeout_s
        assert limit is not None
        while True:
            with self._dog:
                if self._stopping:
                    return
                now = time.monotonic()
                overdue = [r for r in self._watched if not r.timed_out and now - r.started >= limit]
                for running in overdue:
                    running.timed_out = True
                    self._overdue += 1
                if not overdue:
                    # A batch started while this waits does not wake it, so it waits at
                    # most one limit: awake again before that batch is due, then exactly
                    # until it is.
                    due = [r.started + limit for r in self._watched if not r.timed_out]
                    self._dog.wait(max(min(due, default=now + limit) - now, 0.0))
                    continue
            for running in overdue:
                task = running.task
                logger.warning(
                    "servekit: a batch ran longer than batch_timeout_s=%s; its callers get "
                    "ExecutionTimeout, and the back end is unhealthy until it returns",
                    limit,
                )
                task.done(
                    fail_all(
                        len(task.items),
                        ExecutionTimeout(
                            f"the batch ran longer than batch_timeout_s={limit} s; a thread "
                            "cannot be stopped, so it runs on and its result will be dropped; "
                            "find what makes the model hang on this input, or use Processes "
                            "to have a hung worker replaced",
                        ),
                    )
                )

    def close(self, grace_s: float) -> None:
        """Let running batches finish (up to ``grace_s``), fail queued ones, join threads."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            self._dog.notify_all()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        for task in queued:
            task.done(fail_all(len(task.items), Closed("the predictor closed before this ran")))
        deadline = time.monotonic() + max(grace_s, 0.0)
        for thread in self._threads:
            # A thread that is only waiting for work exits at once; a thread inside a
            # slow model gets what is left of the grace (threads cannot be killed).
            thread.join(max(deadline - time.monotonic(), 0.1))
            if thread.is_alive():
                logger.warning(
                    "servekit: worker thread %s is still inside the model after the grace "
                    "period; it will exit when the model returns",
                    thread.name,
                )
        stuck = [thread for thread in self._threads if thread.is_alive()]
        self._threads.clear()
        self._running = False
        shared, self._shared = self._shared, None
        if shared is not None and not stuck:
            shared.close()  # never under a thread that is still inside predict()
