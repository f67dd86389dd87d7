"""The Processes back end: worker processes under servekit's own supervisor.

The standard library's ProcessPoolExecutor fails every pending future and refuses new
work once one worker dies. Here a supervisor thread watches every worker's pipe and
process sentinel: a worker that dies fails only the batch it held (with
:class:`~servekit.WorkerCrashed` carrying its exit code or signal), batches not yet
dispatched wait for a live worker, and a replacement is spawned at once, then with a
growing delay while workers keep dying (a crash loop never becomes a fork bomb).
With ``max_tasks_per_child``, a worker that has run that many batches is recycled
between batches: its replacement is spawned at once, and the old worker keeps serving
until the replacement is ready, then stops when idle, so a recycle fails nothing and
costs no capacity while the model loads. With ``batch_timeout_s``, a worker whose
batch runs longer is killed: the batch fails with ExecutionTimeout, and the worker is
replaced as after a crash (a thread cannot be stopped; a process can).

Invariants (all under ``_lock``):
- a worker holds at most one task, and a task is held by at most one worker;
- a task leaves the queue only to be given to an idle, ready worker;
- every task's ``done`` is called exactly once: with the worker's outcomes, with
  WorkerCrashed when its worker died, or with Closed at close;
- ``n`` workers are not retiring (alive, or their replacement due); a retiring worker
  takes tasks only while fewer than ``n`` of those are ready, and is stopped as soon
  as it is idle and they are.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import cloudpickle

from .._model import Model
from .._outcome import Failure
from ..errors import (
    Closed,
    ExecutionTimeout,
    ModelError,
    ModelLoadError,
    Overloaded,
    SerializationError,
    WorkerCrashed,
)
from . import _wire
from ._base import Backend, Task, call_model, check_batch_timeout, fail_all

__all__ = ["Processes"]

logger = logging.getLogger("servekit")

#: Consecutive crashes after which the pool reports itself unhealthy.
_UNHEALTHY_AFTER = 3
_MAX_RESPAWN_DELAY_S = 30.0


@dataclass(slots=True, eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    index: int
    ready: bool = False
    task: Task | None = None
    dead: bool = False
    #: Batches it has returned (for max_tasks_per_child).
    tasks: int = 0
    #: It reached max_tasks_per_child: replaced, and stopped once the pool can spare it.
    retiring: bool = False
    #: Asked to exit (recycled): its exit is not a crash.
    stopping: bool = False
    #: When its task was given to it (for batch_timeout_s).
    given_at: float = 0.0
    #: Killed because its task ran past batch_timeout_s.
    timed_out: bool = False


@dataclass(slots=True, eq=False)
class _Queued:
    task: Task
    message: _wire.Encoded
    #: Items of the original task that could be pickled; the rest already failed.
    keep: list[int] | None = None


@dataclass(slots=True)
class _Counts:
    spawned: int = 0
    crashes: int = 0
    recycled: int = 0
    consecutive_crashes: int = 0
    last_load_error: str | None = None
    respawn_at: list[float] = field(default_factory=list)


class Processes(Backend):
    """Run the model in ``n`` worker processes (spawn context) supervised by servekit.

    The model object is sent to each worker with cloudpickle and ``load()`` runs there,
    so weights load in the workers, not in the parent. Use it for GIL-bound Python
    models, and to keep a model that may crash away from the host process. numpy arrays
    cross the process boundary as out-of-band pickle-5 buffers (no copy into the
    pickle stream).

    A worker that dies (SIGKILL, ``os._exit``, a segfault) fails only the batch it was
    running, with :class:`~servekit.WorkerCrashed`; that batch is not retried, since it
    may be what killed the worker. Batches not yet dispatched are not failed. The worker
    is replaced at once; if replacements keep dying, each waits longer (1 s, 2 s, 4 s,
    up to 30 s) and :attr:`healthy` turns False after three crashes in a row.

    ``max_tasks_per_child`` recycles a worker after it has run that many batches (a
    model that leaks memory, or a library that degrades in a long-lived process): its
    replacement loads the model while it keeps serving, and it exits between two
    batches once the replacement is ready. No request fails because of a recycle.

    ``batch_timeout_s`` bounds how long one batch may run (TorchServe's response
    timeout): a worker still running a batch after that long is killed, every item of
    the batch fails with :class:`~servekit.ExecutionTimeout`, and the worker is
    replaced like a crashed one (so a model that keeps hanging makes the pool
    unhealthy). Per-request ``timeout_s`` still frees a caller sooner, but only this
    frees the worker.

    Example::

        sk.Predictor(model, backend=sk.Processes(2))
    """

    def __init__(
        self,
        n: int = 2,
        *,
        max_queue: int = 1024,
        start_timeout_s: float = 120.0,
        max_tasks_per_child: int | None = None,
        batch_timeout_s: float | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"Processes(n) needs n >= 1, got {n}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        check_batch_timeout(batch_timeout_s)
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError(
                f"max_tasks_per_child must be >= 1 or None (never recycle), "
                f"got {max_tasks_per_child}"
            )
        #: Number of worker processes.
        self.n = n
        #: Batches that may wait for a free worker before submissions are refused.
        self.max_queue = max_queue
        #: How long start() waits for the workers to load the model.
        self.start_timeout_s = start_timeout_s
        #: Batches a worker runs before it is recycled (None: never).
        self.max_tasks_per_child = max_tasks_per_child
        #: Seconds one batch may run before its worker is killed (None: no limit).
        self.batch_timeout_s = batch_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._workers: list[_Worker] = []
        self._queue: deque[_Queued] = deque()
        self._model_blob = b""
        self._model_name = ""
        self._counts = _Counts()
        self._closing = False
        self._stop_supervisor = False
        self._running = False
        self._supervisor: threading.Thread | None = None
        self._wake_r: Connection | None = None
        self._wake_w: Connection | None = None

    def clone(self) -> Processes:
        """A new, unstarted pool with the same settings."""
        return Processes(
            self.n,
            max_queue=self.max_queue,
            start_timeout_s=self.start_timeout_s,
            max_tasks_per_child=self.max_tasks_per_child,
            batch_timeout_s=self.batch_timeout_s,
        )

    @property
    def capacity(self) -> int:
        """``n``: one batch per worker process."""
        return self.n

    @property
    def healthy(self) -> bool:
        """False while workers keep crashing (three or more crashes in a row)."""
        return self._counts.consecutive_crashes < _UNHEALTHY_AFTER

    @property
    def restarts(self) -> int:
        """How many workers have been replaced after a crash."""
        return self._counts.crashes

    @property
    def recycled(self) -> int:
        """How many workers have been recycled after ``max_tasks_per_child`` batches."""
        return self._counts.recycled

    def describe(self) -> str:
        """E.g. ``Processes(2)``."""
        return f"Processes({self.n})"

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        with self._lock:
            return [w.process.pid for w in self._workers if not w.dead and w.process.pid]

    # -- start -------------------------------------------------------------------

    def start(self, model: Model[Any, Any]) -> None:
        """Spawn the workers, load the model in each, and wait until all are ready."""
        self._closing = self._stop_supervisor = False  # a failed start may be retried
        self._model_blob = cloudpickle.dumps(model)
        self._model_name = model.model_name
        workers = [self._spawn(i) for i in range(self.n)]
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(workers)
        error: ModelLoadError | None = None
        while pending and error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = ModelLoadError(
                    f"the worker processes did not load {self._model_name} within "
                    f"{self.start_timeout_s} s; raise start_timeout_s or speed up load()"
                )
                break
            for obj in wait([w.conn for w in pending], remaining):
                worker = next(w for w in pending if w.conn is obj)
                error = self._read_hello(worker)
                pending.remove(worker)
        if error is not None:
            for worker in workers:
                self._stop_worker(worker, 1.0)
            raise error
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._workers = workers
        self._running = True
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"servekit-supervisor-{self._model_name}", daemon=True
        )
        self._supervisor.start()

    def _spawn(self, index: int) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, self._model_blob),
            name=f"servekit-worker-{self._model_name}-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        self._counts.spawned += 1
        return _Worker(process, parent, index)

    def _read_hello(self, worker: _Worker) -> ModelLoadError | None:
        """Read a new worker's first message: ready, or why its model did not load."""
        try:
            hello = _wire.recv(worker.conn)
        except (EOFError, OSError):
            worker.process.join(5.0)
            return ModelLoadError(
                f"a worker process for {self._model_name} died while loading the model "
                f"({_describe_exit(worker.process.exitcode)})"
            )
        if hello[0] == "ready":
            worker.ready = True
            return None
        self._counts.last_load_error = hello[1]
        return ModelLoadError(
            f"{self._model_name}.load() failed in a worker process: {hello[1]}; "
            "fix the model's load() and start again"
        )

    # -- submit ------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Give ``task`` to an idle worker, or queue it until one is free."""
        queued = self._encode(task)
        if queued is None:
            return
        with self._lock:
            if self._closing or not self._running:
                raise Closed("the Processes back end is closed")
            worker = self._idle_worker()
            if worker is None:
                if len(self._queue) >= self.max_queue:
                    raise Overloaded(
                        f"{len(self._queue)} batches are waiting for a worker process "
                        f"(max_queue={self.max_queue}); retry later or add workers",
                        retry_after_s=0.01 * (1 + len(self._queue) // self.n),
                    )
                self._queue.append(queued)
                return
            worker.task = queued.task
            worker.given_at = time.monotonic()
        self._send(worker, queued)

    def _encode(self, task: Task) -> _Queued | None:
        """Pickle a task's items; items that cannot be pickled fail alone."""
        try:
            return _Queued(task, _wire.encode(_wire.pack(list(task.items))))
        except Exception:
            pass
        keep: list[int] = []
        outcomes: list[Any] = [None] * len(task.items)
        for index, item in enumerate(task.items):
            try:
                cloudpickle.dumps(item, protocol=5)
            except Exception as exc:
                outcomes[index] = Failure(_serialization_error("input", exc))
            else:
                keep.append(index)
        if not keep:
            task.done(outcomes)
            return None
        items = [task.items[i] for i in keep]

        def merge(partial: list[Any]) -> None:
            for index, outcome in zip(keep, partial, strict=True):
                outcomes[index] = outcome
            task.done(outcomes)

        return _Queued(Task(items, merge, task.check), _wire.encode(_wire.pack(items)), keep)

    def _idle_worker(self) -> _Worker | None:
        spare: _Worker | None = None
        for worker in self._workers:
            if worker.ready and worker.task is None and not worker.dead and not worker.stopping:
                if not worker.retiring:
                    return worker
                spare = spare or worker  # serves only until its replacement is ready
        return spare

    def _send(self, worker: _Worker, queued: _Queued) -> None:
        # Outside the lock: the worker is reserved for this task (worker.task is set), so
        # no other thread sends on its pipe. If the worker has just died the send fails
        # and the supervisor, seeing the death, fails the task with WorkerCrashed.
        error = None if queued.task.check is None else queued.task.check()
        if error is not None:  # every caller of the batch has gone: do not send it
            with self._lock:
                if worker.task is queued.task:
                    worker.task = None
            queued.task.done(fail_all(len(queued.task.items), error))
            self._dispatch_next()
            return
        try:
            _wire.send(worker.conn, queued.message)
        except (OSError, ValueError):
            pass

    def _dispatch_next(self) -> None:
        """Hand queued tasks to idle workers."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                worker = self._idle_worker()
                if worker is None:
                    return
                queued = self._queue.popleft()
                worker.task = queued.task
                worker.given_at = time.monotonic()
            self._send(worker, queued)

    # -- supervise ---------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._stop_supervisor:
                    return
                workers = [w for w in self._workers if not w.dead]
                wake_at = list(self._counts.respawn_at)
                if self.batch_timeout_s is not None:
                    # A batch given out while this thread waits does not wake it, so it
                    # waits at most one limit: it is then awake again before that batch
                    # is due (it was given out later), and waits for exactly its due time.
                    limit = self.batch_timeout_s
                    wake_at.append(time.monotonic() + limit)
                    wake_at += [
                        w.given_at + limit
                        for w in workers
                        if w.task is not None and not w.timed_out
                    ]
            timeout = None
            if wake_at:
                timeout = max(min(wake_at) - time.monotonic(), 0.0)
            assert self._wake_r is not None
            waitables: list[Any] = [self._wake_r]
            for w in workers:
                waitables.append(w.conn)
                waitables.append(w.process.sentinel)
            ready = wait(waitables, timeout)
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
            for worker in workers:
                if worker.conn in ready and not worker.dead:
                    self._on_message(worker)
                if worker.process.sentinel in ready and not worker.dead:
                    self._on_death(worker)
            self._kill_overdue()
            self._respawn_due()

    def _kill_overdue(self) -> None:
        """Kill the workers whose batch has run past batch_timeout_s (their sentinel
        then fails the batch with ExecutionTimeout and brings a replacement)."""
        if self.batch_timeout_s is None:
            return
        now = time.monotonic()
        with self._lock:
            overdue = [
                w
                for w in self._workers
                if w.task is not None
                and not w.dead
                and not w.timed_out
                and now - w.given_at >= self.batch_timeout_s
            ]
            for worker in overdue:
                worker.timed_out = True
        for worker in overdue:
            logger.warning(
                "servekit: a %s batch ran longer than batch_timeout_s=%s; killing its "
                "worker process (pid %s)",
                self._model_name,
                self.batch_timeout_s,
                worker.process.pid,
            )
            worker.process.kill()

    def _on_message(self, worker: _Worker) -> None:
        try:
            message = _wire.recv(worker.conn)
        except (EOFError, OSError):
            self._on_death(worker)
            return
        except Exception as exc:  # the result could not be unpickled in the parent
            message = (
                "done",
                fail_all(
                    len(worker.task.items) if worker.task else 0,
                    _serialization_error("output", exc),
                ),
            )
        if message[0] == "ready":
            with self._lock:
                worker.ready = True
            self._retire_spare()
            self._dispatch_next()
            return
        if message[0] == "load_failed":
            self._counts.last_load_error = message[1]
            logger.error(
                "servekit: %s.load() failed in a new worker: %s", self._model_name, message[1]
            )
            return  # the worker exits; its sentinel brings it to _on_death
        with self._lock:
            task, worker.task = worker.task, None
            self._counts.consecutive_crashes = 0
            worker.tasks += 1
            recycle = (
                self.max_tasks_per_child is not None
                and worker.tasks >= self.max_tasks_per_child
                and not worker.retiring
                and not self._closing
            )
            if recycle:
                worker.retiring = True
                self._counts.recycled += 1
            self._idle.notify_all()
        if task is not None:
            if message[0] == "unreadable":
                error = SerializationError(
                    f"the worker could not unpickle the inputs ({message[1]}); define their "
                    "types in an importable module, not only in the main script"
                )
                task.done(fail_all(len(task.items), error))
            else:
                task.done(_wire.unpack(message[1]))
        self._retire_spare()
        self._dispatch_next()
        if recycle:  # after the result and the next dispatch: spawning takes a while
            self._adopt(self._spawn(self._counts.spawned))

    def _retire_spare(self) -> None:
        """Stop the idle retiring workers once ``n`` others are ready to serve."""
        with self._lock:
            serving = sum(1 for w in self._workers if w.ready and not w.retiring and not w.dead)
            if serving < self.n:
                return
            spare = [w for w in self._workers if w.retiring and w.task is None and not w.stopping]
            for worker in spare:
                worker.stopping = True  # no task can reach it now (see _idle_worker)
        for worker in spare:
            try:
                _wire.send(worker.conn, _wire.encode(None))  # it exits; its sentinel fires
            except (OSError, ValueError):
                pass  # already gone: the sentinel reports it the same way

    def _on_death(self, worker: _Worker) -> None:
        worker.process.join(2.0)
        exitcode = worker.process.exitcode
        with self._lock:
            worker.dead = True
            if worker in self._workers:
                self._workers.remove(worker)
            task, worker.task = worker.task, None
            self._idle.notify_all()
            # A recycled worker exits as asked, after its last batch: not a crash.
            crashed = not worker.stopping and not self._closing
            if crashed:
                self._counts.crashes += 1
                self._counts.consecutive_crashes += 1
                if not worker.retiring:  # a retiring worker's replacement is spawned already
                    delay = _respawn_delay(self._counts.consecutive_crashes)
                    self._counts.respawn_at.append(time.monotonic() + delay)
        worker.conn.close()
        if task is not None and worker.timed_out:
            task.done(
                fail_all(
                    len(task.items),
                    ExecutionTimeout(
                        f"the batch ran longer than batch_timeout_s={self.batch_timeout_s} s, "
                        "so its worker process was killed and is being replaced; find what "
                        "makes the model hang on this input, or raise batch_timeout_s",
                        exitcode=exitcode,
                    ),
                )
            )
        elif task is not None:
            how = _describe_exit(exitcode)
            task.done(
                fail_all(
                    len(task.items),
                    WorkerCrashed(
                        f"the worker process running this request died ({how}); the request "
                        "was not retried, since it may be what crashed the worker; the "
                        "worker is being replaced",
                        exitcode=exitcode,
                    ),
                )
            )
        if crashed:
            logger.warning(
                "servekit: a %s worker process died (%s); replacing it",
                self._model_name,
                _describe_exit(exitcode),
            )

    def _respawn_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._closing:
                self._counts.respawn_at.clear()
                return
            due = [t for t in self._counts.respawn_at if t <= now]
            self._counts.respawn_at = [t for t in self._counts.respawn_at if t > now]
        for _ in due:
            self._adopt(self._spawn(self._counts.spawned))

    def _adopt(self, worker: _Worker) -> None:
        """Add a new worker to the pool, or stop it if the pool began closing meanwhile."""
        with self._lock:
            if not self._closing:
                self._workers.append(worker)
                return
        self._stop_worker(worker, 1.0)

    # -- close -------------------------------------------------------------------

    def close(self, grace_s: float) -> None:
        """Let running batches finish (up to ``grace_s``), fail the rest, stop every worker."""
        with self._lock:
            if not self._running:
                return
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
        for item in queued:
            item.task.done(
                fail_all(len(item.task.items), Closed("the predictor closed before this ran"))
            )
        with self._lock:
            # The supervisor keeps delivering results while running batches finish.
            self._idle.wait_for(
                lambda: all(w.task is None for w in self._workers), timeout=max(grace_s, 0.0)
            )
            self._stop_supervisor = True
        assert self._wake_w is not None
        assert self._wake_r is not None
        self._wake_w.send_bytes(b"x")
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        # From here on this thread alone touches the workers.
        workers, self._workers = self._workers, []
        for worker in workers:
            self._stop_worker(worker, 2.0)
            if worker.task is not None:
                task, worker.task = worker.task, None
                task.done(fail_all(len(task.items), Closed("the predictor closed while this ran")))
        self._wake_r.close()
        self._wake_w.close()
        self._running = False

    def _stop_worker(self, worker: _Worker, timeout_s: float) -> None:
        """Ask a worker to exit, then terminate and kill it if it does not; reap it."""
        try:
            _wire.send(worker.conn, _wire.encode(None))
        except (OSError, ValueError):
            pass
        worker.process.join(timeout_s)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(1.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.dead = True
        worker.conn.close()
        worker.process.close()


def _respawn_delay(consecutive: int) -> float:
    """No wait after one crash; then 1 s, 2 s, 4 s ... up to 30 s while crashes continue."""
    if consecutive <= 1:
        return 0.0
    return min(2.0 ** (consecutive - 2), _MAX_RESPAWN_DELAY_S)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}, exit code {exitcode}"
    return f"exit code {exitcode}"


def _serialization_error(what: str, exc: BaseException) -> SerializationError:
    error = SerializationError(
        f"the {what} could not be pickled to cross the process boundary "
        f"({type(exc).__name__}: {exc}); use picklable types, or the Threads back end"
    )
    error.__cause__ = exc
    return error


# -- the worker process --------------------------------------------------------


def _worker_main(conn: Connection, model_blob: bytes) -> None:
    # The parent owns shutdown: Ctrl-C in a terminal reaches the whole process group,
    # and the workers must not die of it before the parent has drained them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model: Model[Any, Any] = cloudpickle.loads(model_blob)
        model.load()
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}"
        try:
            _wire.send(conn, _wire.encode(("load_failed", text, traceback.format_exc())))
        finally:
            os._exit(3)
    _wire.send(conn, _wire.encode(("ready",)))
    loop = asyncio.new_event_loop() if model.is_async else None
    run_coro = loop.run_until_complete if loop is not None else None
    try:
        while True:
            try:
                items = _wire.recv(conn)
            except (EOFError, OSError):
                return  # the parent is gone
            except Exception as exc:  # the inputs could not be unpickled here
                text = f"{type(exc).__name__}: {exc}"
                _wire.send(conn, _wire.encode(("unreadable", text)))
                continue
            if items is None:
                return
            outcomes = call_model(model, _wire.unpack(items), run_coro)  # type: ignore[arg-type]
            _wire.send(conn, _encode_outcomes(outcomes))
    finally:
        if loop is not None:
            loop.close()
        model.close()


def _encode_outcomes(outcomes: list[Any]) -> _wire.Encoded:
    try:
        return _wire.encode(("done", _wire.pack(outcomes)))
    except Exception:
        pass
    # Find what cannot be pickled and replace only that.
    safe: list[Any] = []
    for outcome in outcomes:
        try:
            cloudpickle.dumps(outcome, protocol=5)
        except Exception as exc:
            if isinstance(outcome, Failure):
                error = outcome.error
                outcome = Failure(
                    ModelError(
                        f"the model raised {type(error).__name__}: {error} (the exception "
                        "itself could not be pickled back to the parent)",
                        error_type=type(error).__name__,
                    )
                )
            else:
                outcome = Failure(_serialization_error("output", exc))
        safe.append(outcome)
    return _wire.encode(("done", safe))
