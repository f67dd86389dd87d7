"""The Predictor: the request-facing object that validates, dispatches and accounts."""

from __future__ import annotations

import enum
import html
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio

from ._batcher import Batcher
from ._model import CollatedModel, Model, as_model
from ._outcome import Failure, deadline_error, to_model_error
from ._signature import Signature
from ._waker import SyncWaiter, make_async_waiter
from .backends import Backend, Inline
from .backends._base import Task
from .errors import Cancelled, Closed, InvalidInput, Overloaded
from .metrics import LatencySummary, LatencyWindow

__all__ = ["Predictor", "PredictorState", "PredictorStatistics"]

In = TypeVar("In")
Out = TypeVar("Out")

_monotonic = time.monotonic
_perf_counter = time.perf_counter


class PredictorState(enum.Enum):
    """Where a predictor is in its life."""

    #: Created; the model is not loaded yet (the first call starts it).
    NEW = "new"
    #: Loaded and serving.
    RUNNING = "running"
    #: ``close()`` was called: no new requests; in-flight ones are draining.
    CLOSING = "closing"
    #: Everything it started has stopped.
    CLOSED = "closed"


# Enum member look-ups cost ~85 ns each on CPython 3.11; the request path uses these.
_NEW = PredictorState.NEW
_RUNNING = PredictorState.RUNNING
_CLOSING = PredictorState.CLOSING


@dataclass(frozen=True, slots=True)
class PredictorStatistics:
    """A snapshot of a predictor's counters (see :meth:`Predictor.statistics`)."""

    #: The predictor's name.
    name: str
    #: Its state when the snapshot was taken.
    state: PredictorState
    #: The back end, e.g. ``Threads(2, shared model)``.
    backend: str
    #: Items requested (each item of ``predict_many`` counts once).
    requests: int
    #: Items that got an output.
    succeeded: int
    #: Items that failed (invalid input, model error, deadline, overload, crash...).
    errors: int
    #: Items accepted and not finished yet.
    in_flight: int
    #: End-to-end latency of recent calls (one observation per call).
    latency: LatencySummary
    #: What the served model is (see :attr:`Predictor.version`), or None.
    version: str | None = None


@dataclass(slots=True, eq=False)
class _Generation:
    """One model on one started back end. A swap starts a new generation and drains the
    old one; requests and batches count themselves in ``active`` (under the lock) while
    they use it, so the old one is closed only when nothing uses it any more."""

    model: Model[Any, Any]
    backend: Backend
    runnable: Model[Any, Any]  # what the back end runs: the model, or it behind collation
    signature: Signature
    validate: bool
    inline: Inline | None  # the back end, when it is Inline: called directly
    version: str | None = None  # what the model is, e.g. the store reference "churn:3"
    active: int = 0
    retired: bool = False


class _Call:
    """One hand-off to a back end, waited on by one caller.

    ``abandoned`` is set by the caller when it stops waiting (deadline, cancellation);
    the back end then skips the batch if it has not started, and its outcomes are
    dropped if it has.
    """

    __slots__ = ("abandoned", "deadline", "outcomes", "waiter")

    def __init__(self, waiter: Any, deadline: float | None) -> None:
        self.waiter = waiter
        self.deadline = deadline
        self.abandoned = False
        self.outcomes: list[Any] | None = None

    def done(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.waiter.wake()

    def check(self) -> BaseException | None:
        """Asked by the back end before the model runs: the error to fail with, or None."""
        if self.abandoned:
            return Cancelled("the caller stopped waiting for this request")
        if self.deadline is not None and _monotonic() >= self.deadline:
            return deadline_error(None)
        return None


class Predictor(Generic[In, Out]):
    """Serve one model: validate inputs, run them on a back end, return outputs.

    ``model`` is a :class:`~servekit.Model` or a plain function (a batch function, or a
    per-item function with ``per_item=True``). ``backend`` says where the model runs
    (default :class:`~servekit.Inline`). With ``validate=True`` each input is checked
    against the model's signature before it is queued, and a bad one raises
    :class:`~servekit.InvalidInput` naming the field.

    Every method is thread-safe. Sync methods work from any thread, including one that
    runs an event loop (a notebook cell); async methods work on asyncio and trio.
    The predictor starts on first use or with :meth:`start`; prefer ``with predictor:``
    (or ``async with``) so that :meth:`close` stops every thread and process it started.

    Example::

        with sk.Predictor(double, backend=sk.Threads(2)) as predictor:
            predictor.predict(2.0)                  # 4.0
            predictor.predict_many([1.0, 2.0])      # [2.0, 4.0]
    """

    def __init__(
        self,
        model: Model[In, Out] | Any,
        *,
        backend: Backend | None = None,
        batcher: Batcher[Any, Any] | None = None,
        validate: bool = True,
        name: str | None = None,
        per_item: bool = False,
        version: str | None = None,
    ) -> None:
        if per_item and isinstance(model, Model):
            raise TypeError("per_item=True applies to plain functions, not to a Model instance")
        first = as_model(model, per_item=per_item)
        #: The :class:`~servekit.Batcher` gathering concurrent requests, if any.
        self.batcher = batcher
        self._validate_inputs = validate
        self._gen = self._generation(first, backend if backend is not None else Inline(), version)
        #: The predictor's name (default: the model's name).
        self.name: str = name or first.model_name
        if batcher is not None:
            # On Inline the batch runs on the calling thread, so a lone request may run
            # on its caller's event loop; other back ends block while they wait.
            batcher._attach(
                self._run_batch,
                self._gen.backend.capacity,
                loop_safe=self._gen.inline is not None,
            )
        self._swap_lock = threading.Lock()
        self._starting = False
        self._state = PredictorState.NEW
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._in_flight = 0
        self._requests = 0
        self._succeeded = 0
        self._errors = 0
        self._latency = LatencyWindow()

    # -- lifecycle ---------------------------------------------------------------

    def _generation(
        self, model: Model[Any, Any], backend: Backend, version: str | None = None
    ) -> _Generation:
        signature = model.signature()
        runnable = model
        if self.batcher is not None and self.batcher.collate is not None:
            # Collated where the model runs, so a worker process receives plain items.
            runnable = CollatedModel(model, self.batcher.collate)
        inline = backend if isinstance(backend, Inline) else None
        validate = self._validate_inputs and signature.validates
        return _Generation(model, backend, runnable, signature, validate, inline, version)

    @property
    def model(self) -> Model[In, Out]:
        """The model this predictor serves (the new one, once a swap has switched)."""
        return self._gen.model

    @property
    def backend(self) -> Backend:
        """The execution back end."""
        return self._gen.backend

    @property
    def version(self) -> str | None:
        """What the served model is (``version=`` or the store reference it was swapped
        to, e.g. ``"churn:3"``); None when not given."""
        return self._gen.version

    @property
    def signature(self) -> Signature:
        """The model's :class:`~servekit.Signature` (input and output item types)."""
        return self._gen.signature

    @property
    def validates(self) -> bool:
        """True if calls check inputs against the signature (``validate=True`` and the
        input type is described)."""
        return self._validate_inputs and self._gen.signature.validates

    @property
    def state(self) -> PredictorState:
        """The current :class:`PredictorState`."""
        return self._state

    @property
    def ready(self) -> bool:
        """True when running and its back end is healthy (for readiness probes)."""
        return self._state is PredictorState.RUNNING and getattr(self._gen.backend, "healthy", True)

    def start(self) -> None:
        """Load the model on the back end. Idempotent; raises ModelLoadError if it fails."""
        with self._lock:
            while True:
                if self._state is PredictorState.RUNNING:
                    return
                if self._state in (PredictorState.CLOSING, PredictorState.CLOSED):
                    raise Closed(
                        f"predictor {self.name!r} is closed; create a new Predictor to serve again"
                    )
                if not self._starting:
                    self._starting = True
                    break
                self._changed.wait()
        try:
            self._gen.backend.start(self._gen.runnable)
            if self.batcher is not None:
                self.batcher.start()
        finally:
            with self._lock:
                self._starting = False
                self._changed.notify_all()
        with self._lock:
            self._state = PredictorState.RUNNING
            self._changed.notify_all()

    async def astart(self) -> None:
        """Async twin of :meth:`start`: the model loads on a worker thread, not the loop."""
        await anyio.to_thread.run_sync(self.start)

    def close(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, drain in-flight ones within ``grace_s``, stop everything.

        New calls raise :class:`~servekit.Closed` at once. What is still queued after
        the grace fails with ``Closed``. A batch already running when the grace ends is
        handled by the back end: a thread cannot be interrupted, so on ``Inline`` and
        ``Threads`` it finishes and its callers get their results; on ``Processes`` the
        worker is stopped and its callers get ``Closed``. Idempotent: a second call waits
        for the first.
        """
        with self._lock:
            if self._state is PredictorState.NEW:
                self._state = PredictorState.CLOSED
                return
            if self._state is not PredictorState.RUNNING:
                self._changed.wait_for(lambda: self._state is PredictorState.CLOSED)
                return
            self._state = PredictorState.CLOSING
            deadline = _monotonic() + max(grace_s, 0.0)
            self._changed.wait_for(lambda: self._in_flight == 0, timeout=max(grace_s, 0.0))
        try:
            if self.batcher is not None:
                self.batcher.close(max(deadline - _monotonic(), 0.0))
            self._gen.backend.close(max(deadline - _monotonic(), 0.0))
        finally:
            with self._lock:
                self._state = PredictorState.CLOSED
                self._changed.notify_all()

    async def aclose(self, grace_s: float = 30.0) -> None:
        """Async twin of :meth:`close` (drains on a worker thread, not the loop)."""
        await anyio.to_thread.run_sync(self.close, grace_s)

    def swap(
        self,
        model: Model[Any, Any] | Any,
        *,
        store: Any = None,
        version: str | None = None,
        grace_s: float = 30.0,
    ) -> None:
        """Replace the model without dropping a request.

        ``model`` is a Model or a function, or a reference such as ``"churn@champion"``
        loaded from ``store`` (a :class:`~servekit.registry.ModelStore`); ``version``
        (default: the resolved ``name:version`` of a reference) becomes
        :attr:`version`. The new model is loaded on a fresh back end of the same
        kind and settings; if its ``load()`` fails, :class:`~servekit.ModelLoadError` is
        raised and the old model keeps serving. Then new requests (and new batches) go
        to the new model, while requests already running on the old one finish there
        (within ``grace_s``); then the old back end is closed. No request is dropped and
        no batch mixes the two models. The signature becomes the new model's for
        requests that arrive after the switch. One swap runs at a time.
        """
        if isinstance(model, str):
            if store is None:
                raise TypeError(f"swap({model!r}) needs store=ModelStore(...) to load it from")
            if version is None:
                version = store.info(model).ref
            model = store.load(version)
        new_model = as_model(model)
        with self._swap_lock:
            self.start()
            backend = self._gen.backend.clone()
            gen = self._generation(new_model, backend, version)
            backend.start(gen.runnable)  # loads; on failure the old model keeps serving
            with self._lock:
                if self._state is not _RUNNING:
                    closing = True
                else:
                    closing = False
                    old, self._gen = self._gen, gen
                    old.retired = True
                    deadline = _monotonic() + max(grace_s, 0.0)
                    self._changed.wait_for(lambda: not old.active, timeout=max(grace_s, 0.0))
            if closing:
                backend.close(0.0)
                raise Closed(f"predictor {self.name!r} closed during the swap; nothing changed")
            old.backend.close(max(deadline - _monotonic(), 0.0))

    async def aswap(
        self,
        model: Model[Any, Any] | Any,
        *,
        store: Any = None,
        version: str | None = None,
        grace_s: float = 30.0,
    ) -> None:
        """Async twin of :meth:`swap` (loads and drains on a worker thread, not the loop)."""
        await anyio.to_thread.run_sync(
            lambda: self.swap(model, store=store, version=version, grace_s=grace_s)
        )

    def __enter__(self) -> Predictor[In, Out]:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Predictor[In, Out]:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- accounting ----------------------------------------------------------------

    def _admit(self, n: int) -> _Generation:
        """Count ``n`` items in, or raise Closed; the generation they run on.

        Starts the predictor on first use.
        """
        if self._state is _NEW:
            self.start()
        with self._lock:
            if self._state is not _RUNNING:
                self._requests += n
                self._errors += n
                raise Closed(f"predictor {self.name!r} is closing or closed")
            self._in_flight += n
            self._requests += n
            gen = self._gen
            gen.active += n
            return gen

    def _finish(self, n: int, failed: int, started: float, gen: _Generation) -> None:
        elapsed = _perf_counter() - started
        with self._lock:
            self._in_flight -= n
            gen.active -= n
            if gen.retired and not gen.active:
                self._changed.notify_all()
            self._succeeded += n - failed
            self._errors += failed
            self._latency.record(elapsed)
            if self._in_flight == 0 and self._state is _CLOSING:
                self._changed.notify_all()

    def _reject(self, n: int) -> None:
        with self._lock:
            self._requests += n
            self._errors += n

    def refuse_if_full(self) -> Overloaded | None:
        """The :class:`~servekit.Overloaded` error a request would get now because its
        batcher's queue is full (counted as a failed request and a rejection), or None
        (no batcher, room in the queue, or not running: a request finds out itself).

        Cheap when there is room; the HTTP transports call it before reading a request's
        body, so that refusing the excess of an overload costs little (LD-02).
        """
        batcher = self.batcher
        if batcher is None or self._state is not _RUNNING:
            return None
        refused = batcher.refuse_if_full()
        if refused is not None:
            self._reject(1)
        return refused

    def statistics(self) -> PredictorStatistics:
        """A consistent snapshot of the counters."""
        with self._lock:
            return PredictorStatistics(
                name=self.name,
                state=self._state,
                backend=self._gen.backend.describe(),
                requests=self._requests,
                succeeded=self._succeeded,
                errors=self._errors,
                in_flight=self._in_flight,
                latency=self._latency.summary(),
                version=self._gen.version,
            )

    # -- one item ------------------------------------------------------------------

    def predict(self, x: In, *, timeout_s: float | None = None, priority: int = 0) -> Out:
        """Return the model's output for one input ``x``.

        Raises :class:`~servekit.InvalidInput` (before queueing),
        :class:`~servekit.ModelError`, :class:`~servekit.DeadlineExceeded` when
        ``timeout_s`` passes first, :class:`~servekit.Overloaded`,
        :class:`~servekit.Closed`, or :class:`~servekit.WorkerCrashed`. ``priority``
        orders queued requests when the predictor has a batcher (lower first).
        """
        return self._predict(x, timeout_s, priority)[0]

    def predict_with_version(
        self, x: In, *, timeout_s: float | None = None, priority: int = 0
    ) -> tuple[Out, str | None]:
        """Like :meth:`predict`, and also the :attr:`version` of the model that produced
        the output (exact across a :meth:`swap`: the model that ran it, not the one
        serving when the call returned)."""
        return self._predict(x, timeout_s, priority)

    def _predict(self, x: Any, timeout_s: float | None, priority: int) -> tuple[Out, str | None]:
        if self._gen.validate:
            x = self._checked(x)
        gen = self._admit(1)
        started = _perf_counter()
        outcome: Any = None
        version = gen.version
        try:
            if self.batcher is not None:
                record = self.batcher._outcome(x, timeout_s, priority)
                outcome, version = record.outcome, record.tag
            elif gen.inline is not None:
                if timeout_s is not None and timeout_s <= 0:
                    raise deadline_error(timeout_s)
                outcome = gen.inline.run([x])[0]
            else:
                outcome = self._wait_sync(gen.backend, [x], timeout_s)[0]
        except BaseException:
            self._finish(1, 1, started, gen)
            raise
        return self._settle(outcome, started, gen), version

    async def apredict(self, x: In, *, timeout_s: float | None = None, priority: int = 0) -> Out:
        """Async twin of :meth:`predict`; cancelling the caller drops its request."""
        return (await self._apredict(x, timeout_s, priority))[0]

    async def apredict_with_version(
        self, x: In, *, timeout_s: float | None = None, priority: int = 0
    ) -> tuple[Out, str | None]:
        """Async twin of :meth:`predict_with_version`."""
        return await self._apredict(x, timeout_s, priority)

    async def _apredict(
        self, x: Any, timeout_s: float | None, priority: int
    ) -> tuple[Out, str | None]:
        if self._gen.validate:
            x = self._checked(x)
        if self._state is _NEW:
            await self.astart()
        gen = self._admit(1)
        started = _perf_counter()
        outcome: Any = None
        version = gen.version
        try:
            if self.batcher is not None:
                record = await self.batcher._aoutcome(x, timeout_s, priority)
                outcome, version = record.outcome, record.tag
            elif gen.inline is not None:
                if timeout_s is not None and timeout_s <= 0:
                    raise deadline_error(timeout_s)
                outcome = (await gen.inline.arun([x]))[0]
            else:
                outcome = (await self._wait_async(gen.backend, [x], timeout_s))[0]
        except BaseException:
            self._finish(1, 1, started, gen)
            raise
        return self._settle(outcome, started, gen), version

    def _checked(self, x: Any) -> Any:
        try:
            return self.signature.validate(x)
        except InvalidInput:
            self._reject(1)
            raise

    def _settle(self, outcome: Any, started: float, gen: _Generation) -> Out:
        """Account for one finished item; return its output or raise its error."""
        if type(outcome) is Failure:
            self._finish(1, 1, started, gen)
            raise to_model_error(outcome.error)
        self._finish(1, 0, started, gen)
        result: Out = outcome
        return result

    def _run_batch(self, items: list[Any]) -> tuple[list[Any], str | None]:
        """The batcher's function: run one formed batch on the back end, wait, return its
        outcomes and the version that produced them.

        Runs on a batcher slot thread; the batcher has already dropped cancelled and
        expired items, so the task carries no check. The batch runs whole on the
        generation current when it starts, so no batch mixes two models.
        """
        with self._lock:
            gen = self._gen
            gen.active += 1
        try:
            if gen.inline is not None:
                return gen.inline.run(items), gen.version
            call = _Call(SyncWaiter(), None)
            try:
                gen.backend.submit(Task(items, call.done))
            except (Overloaded, Closed) as exc:
                return [Failure(exc)] * len(items), gen.version
            call.waiter.wait(None)
            assert call.outcomes is not None
            return call.outcomes, gen.version
        finally:
            with self._lock:
                gen.active -= 1
                if gen.retired and not gen.active:
                    self._changed.notify_all()

    def _wait_sync(self, backend: Backend, items: list[Any], timeout_s: float | None) -> list[Any]:
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        call = _Call(SyncWaiter(), deadline)
        backend.submit(Task(items, call.done, call.check))
        try:
            woken = call.waiter.wait(timeout_s)
        except BaseException:
            call.abandoned = True  # interrupted (KeyboardInterrupt): skipped if not started
            raise
        if not woken:
            call.abandoned = True
            raise deadline_error(timeout_s)
        assert call.outcomes is not None
        return call.outcomes

    async def _wait_async(
        self, backend: Backend, items: list[Any], timeout_s: float | None
    ) -> list[Any]:
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        call = _Call(make_async_waiter(), deadline)
        backend.submit(Task(items, call.done, call.check))
        try:
            woken = await call.waiter.wait(timeout_s)
        except BaseException:
            call.abandoned = True  # cancelled: the back end skips it if not started
            raise
        if not woken:
            call.abandoned = True
            raise deadline_error(timeout_s)
        assert call.outcomes is not None
        return call.outcomes

    # -- many items ----------------------------------------------------------------

    def predict_many(
        self,
        xs: Iterable[In],
        *,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
        priority: int = 0,
    ) -> list[Any]:
        """Return one output per input, in order.

        Every item finishes before anything is raised; then the first failure (in input
        order) is raised, unless ``return_exceptions=True``, which puts each failure's
        exception in its item's place instead. With a batcher each item is queued on its
        own (and batched with other callers' items); without one the items are sent as
        one batch per worker of the back end.
        """
        items = list(xs)
        outcomes, valid = self._validate_many(items)
        if valid:
            gen = self._admit(len(valid))
            started = _perf_counter()
            failed = len(valid)
            try:
                values = [items[i] for i in valid]
                if self.batcher is not None:
                    results = self.batcher._outcomes(values, timeout_s, priority)
                elif gen.inline is not None:
                    results = gen.inline.run(values)
                else:
                    results = self._many_sync(gen.backend, values, timeout_s)
                for index, outcome in zip(valid, results, strict=True):
                    outcomes[index] = outcome
                failed = sum(type(o) is Failure for o in results)
            finally:
                self._finish(len(valid), failed, started, gen)
        return _unwrap_many(outcomes, return_exceptions)

    async def apredict_many(
        self,
        xs: Iterable[In],
        *,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
        priority: int = 0,
    ) -> list[Any]:
        """Async twin of :meth:`predict_many`."""
        items = list(xs)
        outcomes, valid = self._validate_many(items)
        if valid:
            if self._state is _NEW:
                await self.astart()
            gen = self._admit(len(valid))
            started = _perf_counter()
            failed = len(valid)
            try:
                values = [items[i] for i in valid]
                if self.batcher is not None:
                    results = await self.batcher._aoutcomes(values, timeout_s, priority)
                elif gen.inline is not None:
                    results = await gen.inline.arun(values)
                else:
                    results = await self._many_async(gen.backend, values, timeout_s)
                for index, outcome in zip(valid, results, strict=True):
                    outcomes[index] = outcome
                failed = sum(type(o) is Failure for o in results)
            finally:
                self._finish(len(valid), failed, started, gen)
        return _unwrap_many(outcomes, return_exceptions)

    def _validate_many(self, items: list[Any]) -> tuple[list[Any], list[int]]:
        outcomes: list[Any] = [None] * len(items)
        if not self._gen.validate:
            return outcomes, list(range(len(items)))
        valid: list[int] = []
        for index, item in enumerate(items):
            try:
                items[index] = self.signature.validate(item, index=index)
            except InvalidInput as exc:
                outcomes[index] = Failure(exc)
            else:
                valid.append(index)
        if len(valid) < len(items):
            self._reject(len(items) - len(valid))
        return outcomes, valid

    @staticmethod
    def _chunks(backend: Backend, items: list[Any]) -> list[list[Any]]:
        parts = max(1, min(backend.capacity, len(items)))
        size = -(-len(items) // parts)
        return [items[i : i + size] for i in range(0, len(items), size)]

    def _many_sync(self, backend: Backend, items: list[Any], timeout_s: float | None) -> list[Any]:
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        chunks = self._chunks(backend, items)
        calls = [_Call(SyncWaiter(), deadline) for _ in chunks]
        for call, chunk in zip(calls, chunks, strict=True):
            backend.submit(Task(chunk, call.done, call.check))
        results: list[Any] = []
        try:
            for call, chunk in zip(calls, chunks, strict=True):
                remaining = None if deadline is None else deadline - _monotonic()
                if call.waiter.wait(remaining):
                    assert call.outcomes is not None
                    results.extend(call.outcomes)
                else:
                    call.abandoned = True
                    results.extend([Failure(deadline_error(timeout_s))] * len(chunk))
        except BaseException:  # interrupted (KeyboardInterrupt): chunks not started are skipped
            for call in calls:
                call.abandoned = True
            raise
        return results

    async def _many_async(
        self, backend: Backend, items: list[Any], timeout_s: float | None
    ) -> list[Any]:
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        chunks = self._chunks(backend, items)
        calls = [_Call(make_async_waiter(), deadline) for _ in chunks]
        for call, chunk in zip(calls, chunks, strict=True):
            backend.submit(Task(chunk, call.done, call.check))
        results: list[Any] = []
        try:
            for call, chunk in zip(calls, chunks, strict=True):
                remaining = None if deadline is None else deadline - _monotonic()
                if await call.waiter.wait(remaining):
                    assert call.outcomes is not None
                    results.extend(call.outcomes)
                else:
                    call.abandoned = True
                    results.extend([Failure(deadline_error(timeout_s))] * len(chunk))
        except BaseException:
            for call in calls:
                call.abandoned = True
            raise
        return results

    # -- display -------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"<Predictor {self.name!r} {self._state.value} on {self._gen.backend.describe()}, "
            f"{self.signature!r}>"
        )

    def _repr_html_(self) -> str:
        stats = self.statistics()
        rows = [
            ("state", stats.state.value),
            ("back end", stats.backend),
            ("signature", repr(self.signature)),
            ("requests", f"{stats.requests:,}"),
            ("succeeded", f"{stats.succeeded:,}"),
            ("errors", f"{stats.errors:,}"),
            ("in flight", f"{stats.in_flight:,}"),
            (
                "latency p50 / p99",
                f"{stats.latency.p50_s * 1e3:.3f} / {stats.latency.p99_s * 1e3:.3f} ms",
            ),
        ]
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        return f"<table><caption>Predictor {html.escape(self.name)}</caption>{body}</table>"


def _unwrap_many(outcomes: Sequence[Any], return_exceptions: bool) -> list[Any]:
    results: list[Any] = []
    first_error: BaseException | None = None
    for outcome in outcomes:
        if type(outcome) is Failure:
            error = to_model_error(outcome.error)
            if first_error is None:
                first_error = error
            results.append(error)
        else:
            results.append(outcome)
    if first_error is not None and not return_exceptions:
        raise first_error
    return results
