"""The batching engine: many single-item callers in, batches of items out.

:class:`Batcher` stands alone around any batch function::

    with Batcher(double_all, max_batch_size=32) as b:
        b.submit(2.0)             # from any thread
        await b.asubmit(2.0)      # from asyncio or trio

How it runs. Callers append a record to a lock-protected deque and notify a
:class:`threading.Condition`. The Batcher owns ``max_concurrent_batches`` worker threads
(``servekit-batcher-<name>-<i>``); each one is one batch slot. An idle worker waits on the
condition (never a polling loop), takes a batch from the head of the queue, runs the
function on it with per-item error isolation (:func:`~servekit._outcome.run_batch`), and
resolves every caller of the batch. While a worker runs a batch, callers keep queueing, and
the next idle worker takes what has gathered: under load batches grow by themselves, with
no timer.

Why the worker forms its own batch (and there is no separate engine thread that hands
batches to workers): a batch cannot go anywhere until a slot is free, so forming it any
earlier gains nothing, and a hand-off from an engine thread to a worker would cost one more
thread wake-up per batch — on the lone caller's path, the one that matters most (DESIGN.md
§5). Deadlines need no timer thread either: each caller waits with its own timeout and
takes its item out of the queue itself when it gives up. With ``max_concurrent_batches=1``
(the default) this is exactly the recommended shape: one thread that owns the batching.

This module is the callers' side (options, lifecycle, submission, statistics);
:mod:`servekit._batch_slots` is where batches are formed, run and settled.

Invariants (all under ``self._lock``):

* a record is in ``self._levels[record.priority]`` iff ``record.queued``, and ``_depth``
  and ``_cost`` count exactly the queued records, ``_odd`` those with ``record.odd``;
* every queued record that is not odd awaits on ``self._plain_loop`` (which changes only
  while every queued record is odd), or is a caller thread's when that is
  ``CALLER_THREADS``;
* ``record.settled`` goes from False to True exactly once, together with ``outcome``; who
  settles a record wakes its caller, unless the caller settled it itself (it gave up).
  The one settling done without the lock: a finished batch whose callers all await on
  one asyncio loop, settled on that loop's thread (``_settle_on_loop``), where the only
  other writer of those records is their callers' own ``_give_up``, on the same thread;
* an item whose record is settled before its batch is formed never reaches the function.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from ._batch_records import (
    CALLER_THREADS,
    BatcherStatistics,
    Pending,
    Plain,
    is_cancelled,
)
from ._batch_slots import (
    _CLOSED,
    _CLOSING,
    _FUTURE,
    _NDARRAY,
    _NEW,
    _OPEN,
    _STOPPING,
    BatchSlots,
)
from ._collate import Collate, Stack, acollated, collated
from ._outcome import Failure, deadline_error, to_model_error
from ._waker import AsyncWaiter, SyncWaiter, Waiter, make_async_waiter, wake_all
from .errors import Cancelled, Closed, DeadlineExceeded, InvalidInput, Overloaded
from .metrics import LatencyWindow

__all__ = ["Batcher", "BatcherStatistics", "is_cancelled"]

In = TypeVar("In")
Out = TypeVar("Out")

_monotonic = time.monotonic
# The running asyncio loop, or None (trio, or no loop): no exception to catch.
_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident

# Batches' worth of rows in one buffer of a stacking batcher (see Batcher._new_buffer).
_STACK_BUFFER_BATCHES = 4

_names = iter(range(1, 1 << 62))


class Batcher(BatchSlots, Generic[In, Out]):
    """Batch single-item calls to ``fn``, a function from a list of inputs to their outputs.

    ``fn(batch: list[In]) -> Sequence[Out]`` returns one output per input, in order; it may
    be a coroutine function (run on a private event loop of the worker thread). It may
    return an exception object in an item's place to fail that item alone; if it raises,
    the batch is split in halves and retried until the failing items are alone, and only
    their callers get :class:`~servekit.ModelError` — one item never fails its batch-mates.

    **When a batch is sent.** A batch is at most ``max_batch_size`` items. There are
    ``max_concurrent_batches`` batch slots (worker threads).

    * Default (``wait_for_full=False``): a free slot takes *at once* whatever is queued, up
      to ``max_batch_size`` items. A lone caller never waits for company; under load,
      items gather while every slot is busy, so batches grow with load by themselves.
      ``max_wait_s`` plays no part: no item ever waits while a slot is free.
    * ``wait_for_full=True``: a free slot waits until ``max_batch_size`` items are queued,
      or the oldest queued item has waited ``max_wait_s``, whichever comes first. Use it
      when a fuller batch is worth the latency (a GPU). With ``max_wait_s=0`` it is the
      same as the default.

    **Collation.** ``collate`` says how items become the batch ``fn`` receives: a list
    (the default), :class:`~servekit.Stack` (one numpy array),
    :class:`~servekit.Pad` (ragged arrays padded, with lengths and an optional mask, and
    outputs un-padded), or :class:`~servekit.DictOfArrays`; outputs are split back one
    per item. Items only share a batch when the collation can put them together (the
    same shape and dtype).

    **Cost, groups and priorities.** With ``size_fn`` a batch is bounded by cost rather
    than count: ``max_batch_size`` is then a budget in ``size_fn`` units (tokens, rows),
    and an item whose own cost exceeds it is refused with
    :class:`~servekit.InvalidInput`. With ``group_key`` only items with equal keys share
    a batch (per-request parameters, a shape bucket, a model version); the batch takes
    the key of the oldest item of the level it serves. ``submit(x, priority=p)``: lower
    values are served first, FIFO within a level; a level whose oldest item has been
    passed over for ``starvation_bound`` batches is served next, so nothing starves.
    ``max_timeout_s`` caps every request's ``timeout_s`` (a request may shorten it, never
    lengthen it), and applies to requests that give none.

    **Deadlines.** ``submit(x, timeout_s=...)``: when the timeout passes the caller gets
    :class:`~servekit.DeadlineExceeded` on time. A queued item is taken out of the queue
    and never reaches ``fn``; if its batch is already running, its result is dropped.

    **Cancellation.** An async caller that is cancelled takes its item out of the queue; if
    its batch already runs, the result is dropped.

    **Backpressure.** At most ``max_queue`` items wait (default 1024). When the queue is
    full, :meth:`submit` raises :class:`~servekit.Overloaded` at once, with a
    ``retry_after_s`` hint: the expected time until a slot takes the next batch.

    **Lifecycle.** Threads start on first use, or with :meth:`start` / ``with`` /
    ``async with``. :meth:`close` stops admission (:class:`~servekit.Closed`), drains the
    queue within ``grace_s``, fails what is left with ``Closed``, and joins every thread.

    Example::

        def double_all(xs: list[float]) -> list[float]:
            return [2 * x for x in xs]

        with Batcher(double_all, max_batch_size=64) as b:
            b.submit(2.0)  # 4.0
    """

    def __init__(
        self,
        fn: Callable[[list[In]], Any] | None = None,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        wait_for_full: bool = False,
        max_queue: int = 1024,
        max_concurrent_batches: int | None = None,
        size_fn: Callable[[Any], int] | None = None,
        group_key: Callable[[Any], Hashable] | None = None,
        starvation_bound: int = 8,
        max_timeout_s: float | None = None,
        collate: Collate | None = None,
        inline_max_s: float = 0.001,
        name: str | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if max_wait_s < 0 or math.isnan(max_wait_s):
            raise ValueError(f"max_wait_s must be 0 or more seconds, not {max_wait_s}")
        if max_queue < 1:
            raise ValueError(
                f"max_queue must be at least 1, not {max_queue}; the queue is always bounded"
            )
        if max_concurrent_batches is not None and max_concurrent_batches < 1:
            raise ValueError(
                f"max_concurrent_batches must be at least 1, not {max_concurrent_batches}"
            )
        if starvation_bound < 1:
            raise ValueError(f"starvation_bound must be at least 1, not {starvation_bound}")
        self._fn = fn
        #: Most items in one batch.
        self.max_batch_size: int = max_batch_size
        #: With ``wait_for_full``, the longest the oldest queued item waits for company.
        self.max_wait_s: float = max_wait_s
        #: Whether a free slot waits for a full batch (up to ``max_wait_s``).
        self.wait_for_full: bool = wait_for_full
        #: Most items waiting in the queue.
        self.max_queue: int = max_queue
        #: Number of batch slots (worker threads); with a Predictor, default one per worker
        #: of its back end, else 1.
        self.max_concurrent_batches: int = max_concurrent_batches or 1
        self._slots_given = max_concurrent_batches is not None
        #: The cost of one item against ``max_batch_size`` (None: each item costs 1).
        self.size_fn = size_fn
        #: Items share a batch only with items of equal ``group_key(item)`` (None: all do).
        self.group_key = group_key
        #: Batches a waiting priority level may be passed over before it is served.
        self.starvation_bound: int = starvation_bound
        #: How items become the model's batch (default: a list); see :class:`~servekit.Stack`.
        self.collate = collate
        #: A lone item (nothing queued, a slot free) runs on its caller's own thread, with
        #: no hand-off, when recent batches took at most this long (0 turns it off).
        self.inline_max_s = inline_max_s
        #: The longest a request may wait: a larger (or no) ``timeout_s`` is cut to it.
        self.max_timeout_s = max_timeout_s
        # True when fn returns outcomes already isolated per item (a Predictor's back end).
        self._fn_isolates = False
        # Whether fn may run on an event loop's thread (it does not block on other
        # threads); a Predictor says so for its Inline back end.
        self._fn_loop_safe = True
        self._run_fn: Callable[[list[Any]], Any] | None = None  # fn as the slots run it
        self._inline_ok = False  # decided at start: a sync fn, no wait_for_full
        # Decided at start: every item costs 1 and may share any batch (no size_fn,
        # group key or collation), so enqueueing and forming skip keys and costs.
        self._uniform = False
        # Decided at start: uniform items and no timeout imposed: asubmit's inlined
        # hot path.
        self._plain = False
        # Whether asyncio callers' batches run on their loop (see _LOOP_SLOT_MAX_S), and
        # the loop that has a drain scheduled (None: none has).
        self._loop_slot = False
        self._drain_loop: asyncio.AbstractEventLoop | None = None
        # Queued records that are odd (not from asubmit's hot path on _plain_loop, see
        # Pending.odd); with none, a batch is formed with no check per record.
        self._odd = 0
        self._plain_loop: asyncio.AbstractEventLoop | Plain | None = None
        # Batches settled on event loops and not yet counted: (size, seconds, settled,
        # failed, queue waits), folded into the counters below under the lock.
        self._tally: deque[tuple[int, float, int, int, list[float]]] = deque()
        # The asyncio loop asubmit last found running, when it is one of asyncio's own
        # (see asubmit). Read and written by callers' threads without the lock: a reader
        # checks whatever loop it finds (it only ever holds a loop), and a stale one is
        # replaced at the next miss.
        self._last_loop: Any = None
        # Decided at start: a Stack collation done at submission (see _new_buffer),
        # for items of the shape and dtype of the first one (_stack_key), into _buf.
        self._stacking = False
        self._stack_key: Any = None
        self._stack_shape: Any = None
        self._stack_dtype: Any = None
        self._buf: Any = None  # the buffer new rows go to
        # Rows reserved so far, over all buffers: row r is row r % _buf_len of the buffer
        # made when r was a multiple of _buf_len.
        self._buf_rows = 0
        self._buf_len = _STACK_BUFFER_BATCHES * max(1, int(max_batch_size))
        #: The name used in thread names and messages.
        self.name: str = name or f"{getattr(fn, '__name__', 'batcher')}-{next(_names)}"
        self._lock = threading.Lock()
        # Idle workers wait here for items (or for max_wait_s of the oldest item).
        self._ready = threading.Condition(self._lock)
        # close() waits here for the queue to empty.
        self._drained = threading.Condition(self._lock)
        # One FIFO per priority level; _priorities lists the levels in serving order.
        # Level 0 (the default priority) exists from the start: asubmit's hot path
        # queues only into an existing level, and the first request of a new batcher
        # must not take the general path, which wakes a slot thread even when the
        # loop slot serves (a race the loop-slot test saw, one run in four).
        self._levels: dict[int, deque[Pending]] = {0: deque()}
        self._priorities: list[int] = [0]
        self._depth = 0  # items queued over all levels
        self._cost = 0  # their total size
        self._formed = 0  # batches formed so far (the clock of the starvation bound)
        self._waiting = 0  # workers blocked on _ready, so submissions know to notify
        self._state = _NEW
        self._threads: list[threading.Thread] = []
        self._closed_event = threading.Event()  # set when close() has finished
        self._running = 0
        self._batch_s = 0.0  # moving average of batch durations (0.0: none timed yet)
        self._batches = 0
        self._items = 0
        self._succeeded = 0
        self._failed = 0
        self._rejected = 0
        self._expired = 0
        self._cancelled = 0
        self._closed = 0
        self._sizes: Counter[int] = Counter()
        self._queue_wait = LatencyWindow()
        self._run_time = LatencyWindow()
        self._busy_s = 0.0  # slot-seconds spent running batches
        self._started_at = 0.0  # monotonic time of start, for utilisation

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads. Idempotent; raises ``Closed`` after :meth:`close`."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._state == _OPEN:
            return
        if self._state != _NEW:
            raise Closed(f"batcher {self.name!r} is closing or closed; create a new Batcher")
        if self._fn is None:
            raise TypeError(
                f"batcher {self.name!r} has no function to batch; pass one: Batcher(fn, ...)"
            )
        fn = self._fn
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
        )
        if self.collate is not None and not self._fn_isolates:
            fn = acollated(fn, self.collate) if is_async else collated(fn, self.collate)
        self._run_fn = fn
        self._inline_ok = not is_async and not self.wait_for_full and self.inline_max_s > 0
        self._uniform = self.size_fn is None and self.group_key is None and self.collate is None
        self._plain = self._uniform and self.max_timeout_s is None
        self._stacking = (
            type(self.collate) is Stack
            and not is_async
            and not self._fn_isolates
            and self.size_fn is None
            and self.group_key is None
            and self.max_timeout_s is None
        )
        for index in range(self.max_concurrent_batches):
            thread = threading.Thread(
                target=self._work,
                args=(fn, is_async),
                name=f"servekit-batcher-{self.name}-{index}",
                daemon=True,
            )
            self._threads.append(thread)
        self._state = _OPEN
        self._started_at = _monotonic()
        for thread in self._threads:
            thread.start()

    def close(self, grace_s: float = 30.0) -> None:
        """Stop admission, drain the queue within ``grace_s``, fail the rest, join threads.

        New submissions raise :class:`~servekit.Closed` at once. Queued items are sent in
        batches as fast as slots allow (without waiting for full batches); what is still
        queued when ``grace_s`` runs out fails with ``Closed``. A batch already running
        cannot be interrupted (it is a thread): ``close`` waits for it, and its callers get
        their results. Idempotent: a second call waits for the first to finish.
        """
        grace_s = max(grace_s, 0.0)
        if threading.current_thread() in self._threads:
            raise RuntimeError(
                f"batcher {self.name!r} cannot be closed from its own batch function: "
                "close would wait for the very batch that calls it"
            )
        with self._lock:
            if self._state == _NEW:
                self._state = _CLOSED
                self._closed_event.set()
                return
            if self._state != _OPEN:
                first = False
            else:
                first = True
                self._state = _CLOSING
                self._ready.notify_all()  # workers waiting for a full batch send it now
                self._drained.wait_for(lambda: not self._depth, timeout=grace_s)
                leftover = [record for level in self._levels.values() for record in level]
                for level in self._levels.values():
                    level.clear()
                self._depth = self._cost = self._odd = 0
                error = Closed(
                    f"batcher {self.name!r} closed before this item was sent "
                    f"(grace_s={grace_s} ran out); retry on a new Batcher"
                )
                for record in leftover:
                    record.queued = False
                    record.settled = True
                    record.outcome = Failure(error)
                self._closed += len(leftover)
                self._state = _STOPPING
                self._ready.notify_all()
        if not first:
            self._closed_event.wait()
            return
        try:
            wake_all([record.waiter for record in leftover])
            for thread in self._threads:
                thread.join()
        finally:
            with self._lock:
                self._state = _CLOSED
            self._closed_event.set()

    async def aclose(self, grace_s: float = 30.0) -> None:
        """Async twin of :meth:`close` (waits on a worker thread, not on the loop)."""
        await anyio.to_thread.run_sync(self.close, grace_s)

    def __enter__(self) -> Batcher[In, Out]:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Batcher[In, Out]:
        self.start()  # only starts threads: does not block the loop
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- submitting --------------------------------------------------------------------

    def submit(self, x: In, *, timeout_s: float | None = None, priority: int = 0) -> Out:
        """Return ``fn``'s output for one input ``x``, batched with concurrent callers.

        Blocks the calling thread. Raises :class:`~servekit.Overloaded` (queue full, at
        once), :class:`~servekit.Closed`, :class:`~servekit.DeadlineExceeded` when
        ``timeout_s`` passes first, or :class:`~servekit.ModelError` when ``fn`` failed for
        this item.
        """
        outcome = self._outcome(x, timeout_s, priority).outcome
        if type(outcome) is Failure:  # unwrap(), inlined: one call less per request
            raise to_model_error(outcome.error)
        result: Out = outcome
        return result

    def _outcome(self, x: Any, timeout_s: float | None, priority: int) -> Pending:
        """Submit one item and wait; its settled record: ``outcome`` is the output or a
        Failure (this never raises for the item), ``tag`` what ran it."""
        if timeout_s is None and (
            self._plain
            or (
                self._stacking
                and type(x) is _NDARRAY
                and x.shape == self._stack_shape
                and x.dtype == self._stack_dtype
            )
        ):
            # The hot path of caller threads, inlined as in asubmit: under load the
            # callers' Python work competes with the model for the GIL (the model needs
            # it between its numpy calls), so each call saved here shows in
            # throughput. With 64 caller threads, the general path's calls (_clamp,
            # _enqueue, the collation's group_key, the waiter's methods) cost about a
            # fifth of it (benchmarks/batching.py, the threads row). The waiter's
            # wait stays a call: it is where an interrupted caller is seen.
            if self._inline_ok and not self._depth and self._running < self.max_concurrent_batches:
                ran = self._run_here(x)  # idle: a lone item runs on this thread
                if ran is not None:
                    return ran
            waiter = SyncWaiter()
            record = Pending(x, None, _monotonic(), waiter, priority, self._stack_key)
            with self._lock:
                level = self._levels.get(priority)
                queued = self._state == _OPEN and self._depth < self.max_queue and level is not None
                if queued:
                    record.seq = self._formed
                    if self._plain_loop is not CALLER_THREADS:
                        if self._depth > self._odd:
                            # Plain records of a loop are queued: this one is odd.
                            record.odd = True
                            self._odd += 1
                        else:
                            # None is: caller threads' records are the plain ones now.
                            self._plain_loop = CALLER_THREADS
                    level.append(record)  # type: ignore[union-attr]  # not None: queued
                    self._depth += 1
                    self._cost += 1
                    if self._waiting:
                        self._ready.notify()
            if not queued:  # closed, full, or a new priority level: the general path
                record = self._enqueue(x, None, waiter, priority)
            try:
                waiter.wait(None)
            except BaseException:
                self._abandon([record])
                raise
            if record.chain is not None:
                record.chain.wake()
            return record
        timeout_s = self._clamp(timeout_s)
        if timeout_s is None and self._inline_ok:
            ran = self._run_here(x)
            if ran is not None:
                return ran
        waiter = SyncWaiter()
        record = self._enqueue(x, timeout_s, waiter, priority)
        try:
            woken = waiter.wait(timeout_s)
        except BaseException:
            self._abandon([record])
            raise
        if not woken:
            self._give_up(record, deadline_error(timeout_s), expired=True)
        if record.chain is not None:
            record.chain.wake()
        return record

    def _outcomes(self, xs: Iterable[Any], timeout_s: float | None, priority: int) -> list[Any]:
        """Submit many items at once, then wait for all: one outcome per item, in order.

        An item refused at submission (queue full, closed) gets its error as its outcome.
        """
        timeout_s = self._clamp(timeout_s)
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        records: list[Pending | Failure] = []
        for x in xs:
            waiter = SyncWaiter()
            try:
                records.append(self._enqueue(x, timeout_s, waiter, priority))
            except (Overloaded, Closed, InvalidInput, DeadlineExceeded) as exc:
                records.append(Failure(exc))
        outcomes: list[Any] = []
        for index, record in enumerate(records):
            if isinstance(record, Failure):
                outcomes.append(record)
                continue
            remaining = None if deadline is None else deadline - _monotonic()
            assert isinstance(record.waiter, SyncWaiter)
            try:
                woken = record.waiter.wait(remaining)
            except BaseException:
                self._abandon(r for r in records[index:] if type(r) is Pending)
                raise
            if not woken:
                self._give_up(record, deadline_error(timeout_s), expired=True)
            if record.chain is not None:
                record.chain.wake()
            outcomes.append(record.outcome)
        return outcomes

    async def asubmit(self, x: In, *, timeout_s: float | None = None, priority: int = 0) -> Out:
        """Async twin of :meth:`submit` for asyncio and trio.

        Cancelling the caller takes its item out of the queue; if its batch already runs,
        the result is dropped.
        """
        # asyncio's own loops say which thread runs them (_thread_id, set by run_forever
        # and reset when it returns), and a thread runs one loop at a time: a loop found
        # before that this thread runs now is the running loop, known without
        # _get_running_loop, which makes a system call (getpid, against a fork) each
        # time. (A child forked inside a coroutine would see its parent's loop here,
        # where _get_running_loop says None; it cannot use that loop either way.)
        loop = self._last_loop
        if loop is None or loop._thread_id != _get_ident():
            loop = _get_running_loop()
            if loop is not None and hasattr(loop, "_thread_id"):
                self._last_loop = loop
        if (
            loop is not None
            and timeout_s is None
            and (
                self._plain
                or (
                    self._stacking
                    and type(x) is _NDARRAY
                    and x.shape == self._stack_shape  # type: ignore[attr-defined]
                    and x.dtype == self._stack_dtype  # type: ignore[attr-defined]
                )
            )
            and (self._loop_slot or self._depth or not self._may_run_on_loop())
        ):
            # The hot path, inlined (this runs once per request on the event loop, whose
            # per-request work bounds throughput; DESIGN.md §5): a bare future is the
            # waiter, set by _settle_on_loop or wake_all, one loop call per batch.
            future: asyncio.Future[None] = _FUTURE(loop=loop)
            now = _monotonic()
            record = Pending(x, None, now, future, priority, self._stack_key)
            with self._lock:
                level = self._levels.get(priority)
                queued = self._state == _OPEN and self._depth < self.max_queue and level is not None
                drain = False
                if queued:
                    if self._stacking:
                        # Copied into the next buffer row (see _new_buffer) under the
                        # lock, which only the slot threads contend for, once a batch:
                        # one lock section per request instead of two. Before it is
                        # queued, so no batch can take the row before it is filled.
                        row = self._buf_rows
                        index = row % self._buf_len
                        if not index:
                            self._buf = self._new_buffer()
                        self._buf_rows = row + 1
                        buf = record.buf = self._buf
                        buf[index] = x
                        record.row = row
                    if loop is not self._plain_loop:
                        if self._depth > self._odd:
                            # Plain records of another loop are queued: this one is odd.
                            record.odd = True
                            self._odd += 1
                        else:
                            # None is: this loop's records are the plain ones now.
                            # (Waiting for an empty queue instead left every record
                            # odd under a load that never empties it.)
                            self._plain_loop = loop
                    record.seq = self._formed
                    level.append(record)  # type: ignore[union-attr]  # not None: queued
                    self._depth += 1
                    self._cost += 1
                    if self._loop_slot and self._drain_loop in (None, loop):
                        drain = self._drain_loop is None
                        self._drain_loop = loop
                    elif self._waiting:
                        self._ready.notify()
            if drain:
                loop.call_soon(self._drain_on_loop, loop)
            elif not queued:  # closed, full, or a new priority level: the general path
                record = self._enqueue(x, None, future, priority)
            try:
                await future
            except BaseException:
                self._give_up(record, Cancelled("the caller was cancelled"))
                raise
        else:
            record = await self._aoutcome(x, timeout_s, priority)
        outcome = record.outcome
        if type(outcome) is Failure:  # unwrap(), inlined: one call less per request
            raise to_model_error(outcome.error)
        result: Out = outcome
        return result

    async def _aoutcomes(
        self, xs: Iterable[Any], timeout_s: float | None, priority: int
    ) -> list[Any]:
        """Async twin of :meth:`_outcomes`: submit all, then await each."""
        timeout_s = self._clamp(timeout_s)
        deadline = None if timeout_s is None else _monotonic() + timeout_s
        records: list[Pending | Failure] = []
        waiters: list[AsyncWaiter | None] = []
        for x in xs:
            made = make_async_waiter()
            try:
                records.append(self._enqueue(x, timeout_s, made, priority))
                waiters.append(made)
            except (Overloaded, Closed, InvalidInput, DeadlineExceeded) as exc:
                records.append(Failure(exc))
                waiters.append(None)
        outcomes: list[Any] = []
        try:
            for record, waiter in zip(records, waiters, strict=True):
                if isinstance(record, Failure) or waiter is None:
                    outcomes.append(record)
                    continue
                remaining = None if deadline is None else deadline - _monotonic()
                if not await waiter.wait(remaining):
                    self._give_up(record, deadline_error(timeout_s), expired=True)
                outcomes.append(record.outcome)
        except BaseException:
            for record in records:
                if isinstance(record, Pending):
                    self._give_up(record, Cancelled("the caller was cancelled"))
            raise
        return outcomes

    async def _aoutcome(self, x: Any, timeout_s: float | None, priority: int) -> Pending:
        """Async twin of :meth:`_outcome`."""
        timeout_s = self._clamp(timeout_s)
        if timeout_s is None:
            loop = _get_running_loop()
            if loop is not None:
                # asyncio: the future is the waiter, awaited directly (wake_all sets a
                # whole batch's futures in one loop call). Busy batchers take the same
                # path inlined in asubmit.
                future = loop.create_future()
                alone = self._may_run_on_loop()
                record = self._enqueue(x, None, future, priority, not alone)
                try:
                    if alone and await self._ran_on_loop(record):
                        return record
                    await future
                except BaseException:
                    self._give_up(record, Cancelled("the caller was cancelled"))
                    raise
                return record
        waiter = make_async_waiter()
        alone = timeout_s is None and self._may_run_on_loop()
        record = self._enqueue(x, timeout_s, waiter, priority, not alone)
        try:
            if alone and await self._ran_on_loop(record):
                return record
            woken = await waiter.wait(timeout_s)
        except BaseException:
            self._give_up(record, Cancelled("the caller was cancelled before its result was ready"))
            raise
        if not woken:
            self._give_up(record, deadline_error(timeout_s), expired=True)
        return record

    def _enqueue(
        self,
        x: Any,
        timeout_s: float | None,
        waiter: Waiter | asyncio.Future[None],
        priority: int = 0,
        notify: bool = True,
    ) -> Pending:
        now = _monotonic()
        if self._uniform:
            # The common case, kept short: this runs once per request on the caller's
            # thread (often the event loop, whose per-item work bounds throughput).
            # Before start() it is False, and the general path makes the same record.
            record = Pending(
                x, None if timeout_s is None else now + timeout_s, now, waiter, priority
            )
        else:
            size = 1 if self.size_fn is None else self._size_of(x)
            key: Hashable = None
            if self.group_key is not None:
                key = self.group_key(x)
            if self.collate is not None:
                # Only items the collation can put in one batch share it (same shape, dtype).
                shape_key = self.collate.group_key(x)
                key = shape_key if key is None else (key, shape_key)
                if (
                    self._stacking
                    and self._stack_key is None
                    and type(x) is _NDARRAY
                    and x.dtype == shape_key[1]  # type: ignore[index]
                ):
                    # The first array already of the batch dtype sets the shape and dtype
                    # asubmit stacks at submission (the key first: asubmit reads it after
                    # checking the other two); other items are collated at formation.
                    self._stack_key = shape_key
                    self._stack_shape, self._stack_dtype = shape_key  # type: ignore[misc]
            deadline = None if timeout_s is None else now + timeout_s
            record = Pending(x, deadline, now, waiter, priority, key, size)
        with self._lock:
            if self._state != _OPEN:
                self._start_locked()  # raises Closed once close() has been called
            if self._depth >= self.max_queue:
                raise self._overloaded_locked()
            if timeout_s is not None and timeout_s <= 0:
                self._expired += 1
                raise deadline_error(timeout_s)
            level = self._levels.get(priority)
            if level is None:
                level = self._levels[priority] = deque()
                bisect.insort(self._priorities, priority)
            record.seq = self._formed
            record.odd = True
            level.append(record)
            self._depth += 1
            self._cost += record.size
            self._odd += 1
            if self._waiting and notify:
                # Condition.notify costs ~0.5 µs even with nobody waiting; under load
                # every worker is busy, so most submissions skip it.
                self._ready.notify()
        return record

    def _clamp(self, timeout_s: float | None) -> float | None:
        if self.max_timeout_s is None:  # the common case, first
            return timeout_s
        return self.max_timeout_s if timeout_s is None else min(timeout_s, self.max_timeout_s)

    def _attach(
        self,
        fn: Callable[[list[Any]], tuple[list[Any], Any]],
        slots: int,
        *,
        loop_safe: bool = False,
    ) -> None:
        """Make this Batcher feed a Predictor: ``fn`` runs a batch on its back end and
        returns per-item outcomes and a tag (the version that ran them); one slot per
        back-end worker unless set explicitly."""
        with self._lock:
            if self._fn is not None or self._state != _NEW:
                raise ValueError(
                    f"batcher {self.name!r} already batches a function; give each Predictor "
                    "a Batcher of its own"
                )
            self._fn = fn
            self._fn_isolates = True
            self._fn_loop_safe = loop_safe
            if not self._slots_given:
                self.max_concurrent_batches = slots

    # -- accounting ------------------------------------------------------------------

    def refuse_if_full(self) -> Overloaded | None:
        """The :class:`~servekit.Overloaded` error a submission would get now because
        the queue is full (counted as a rejection), or None.

        For transports, to refuse a request before reading and decoding it. A hint,
        like any look at a queue others use: None promises no room, and a submission
        still checks under the lock.
        """
        if self._depth < self.max_queue:  # an unlocked read: the common case is cheap
            return None
        with self._lock:
            if self._state != _OPEN or self._depth < self.max_queue:
                return None  # closed: the submission says so; or room was made
            return self._overloaded_locked()

    def _overloaded_locked(self) -> Overloaded:
        """The error of a submission to a full queue, counted as a rejection."""
        self._rejected += 1
        retry_after_s = self._retry_after_locked()
        return Overloaded(
            f"batcher {self.name!r} has {self._depth} items queued "
            f"(max_queue={self.max_queue}); retry after {retry_after_s:.3f} s, or add "
            "capacity (max_concurrent_batches, max_batch_size)",
            retry_after_s=retry_after_s,
        )

    def statistics(self) -> BatcherStatistics:
        """A consistent snapshot of the counters."""
        with self._lock:
            self._fold_tally_locked()
            return BatcherStatistics(
                queue_depth=self._depth,
                running_batches=self._running,
                batches=self._batches,
                items=self._items,
                mean_batch_size=self._items / self._batches if self._batches else 0.0,
                succeeded=self._succeeded,
                failed=self._failed,
                rejected=self._rejected,
                expired=self._expired,
                cancelled=self._cancelled,
                closed=self._closed,
                batch_sizes=MappingProxyType(dict(sorted(self._sizes.items()))),
                queue_wait=self._queue_wait.summary(),
                run_time=self._run_time.summary(),
                utilisation=self._utilisation_locked(),
            )

    def _utilisation_locked(self) -> float:
        if self._started_at == 0.0:
            return 0.0
        span = (_monotonic() - self._started_at) * self.max_concurrent_batches
        return min(self._busy_s / span, 1.0) if span > 0 else 0.0

    def __repr__(self) -> str:
        states = {_NEW: "new", _OPEN: "open", _CLOSING: "closing", _STOPPING: "closing"}
        state = states.get(self._state, "closed")
        return (
            f"<Batcher {self.name!r} {state}, max_batch_size={self.max_batch_size}, "
            f"max_concurrent_batches={self.max_concurrent_batches}, "
            f"queued={self._depth}/{self.max_queue}>"
        )
