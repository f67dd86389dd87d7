"""Where batches run: the Batcher's slot threads, its callers' event loop, or a lone
caller's own thread.

:class:`BatchSlots` is the half of :class:`~servekit.Batcher` that takes batches from the
queue and resolves their callers: forming a batch (counts or costs, group keys,
priorities with their starvation bound, items expired on the way), running it (with
per-item error isolation, or on the batch array a stacking batcher filled at
submission), and settling each caller (a chain of caller threads, or one call on the
callers' asyncio loop). :mod:`servekit._batcher` holds the other half, the callers':
options, lifecycle, submission and statistics. Both share the state ``Batcher.__init__``
sets up and the invariants stated in that module.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import anyio
import anyio.lowlevel
import numpy as np

from ._batch_records import CALLER_THREADS, NO_WAITER, Pending, Plain, running_batch
from ._collate import Collate
from ._outcome import Failure, arun_batch, deadline_error, isolate, run_batch
from ._waker import SyncWaiter, wake_all
from .errors import Cancelled, InvalidInput
from .metrics import LatencyWindow

_monotonic = time.monotonic
# The running asyncio loop, or None (trio, or no loop): no exception to catch.
_get_running_loop = asyncio._get_running_loop

# Lifecycle states, in order. Plain ints: compared on every submit.
_NEW = 0  # no thread started yet (the first submit or start() starts them)
_OPEN = 1  # serving
_CLOSING = 2  # close() called: no admission; workers drain the queue at once
_STOPPING = 3  # grace over or queue drained: workers exit when they see it
_CLOSED = 4  # every thread joined

# Weight of the newest batch duration in the moving average behind retry_after_s.
_EWMA_ALPHA = 0.2
# retry_after_s hint before any batch has been timed.
_DEFAULT_RETRY_AFTER_S = 0.05
# Batches taking at most this long (moving average) run on their callers' event loop
# under load, not on a slot thread: a hand-off to a thread and back costs two wake-ups,
# each tens of microseconds on a busy or virtual machine, which is more than such a
# batch takes. Longer batches go to the slots, so the loop works while the model runs.
_LOOP_SLOT_MAX_S = 50e-6

# Batches settled on an event loop are counted (under the lock) this many at a time.
_TALLY_BATCHES = 16

# Made directly, not by loop.create_future(): one Python call less per request. Any
# asyncio loop accepts it (uvloop included).
_FUTURE = asyncio.Future
_NDARRAY = np.ndarray

# A batch as formation takes it: its live records, the records found expired on the
# way, and the loop all the live records' callers await on when formation knows it
# (a batch of plain records, see Pending.odd), else None.
_Formed: TypeAlias = "tuple[list[Pending], list[Pending], asyncio.AbstractEventLoop | None]"


def _single_loop(batch: list[Pending]) -> asyncio.AbstractEventLoop | None:
    """The event loop whose futures every record of ``batch`` waits on, or None."""
    first = batch[0].waiter
    if type(first) is not _FUTURE:
        return None
    loop = first.get_loop()
    for record in batch:
        waiter = record.waiter
        if type(waiter) is not _FUTURE or waiter.get_loop() is not loop:
            return None
    return loop


class BatchSlots:
    """The slot side of :class:`~servekit.Batcher`: the attributes below are set by
    ``Batcher.__init__`` (declared here for the methods of this class)."""

    max_batch_size: int
    max_wait_s: float
    wait_for_full: bool
    max_concurrent_batches: int
    starvation_bound: int
    collate: Collate | None
    size_fn: Callable[[Any], int] | None
    inline_max_s: float
    _fn: Callable[[list[Any]], Any] | None
    _run_fn: Callable[[list[Any]], Any] | None
    _fn_isolates: bool
    _fn_loop_safe: bool
    _inline_ok: bool
    _uniform: bool
    _loop_slot: bool
    _drain_loop: asyncio.AbstractEventLoop | None
    _odd: int
    _tally: deque[tuple[int, float, int, int, list[float]]]
    _plain_loop: asyncio.AbstractEventLoop | Plain | None
    _stacking: bool
    _stack_shape: Any
    _stack_dtype: Any
    _buf_len: int
    _lock: threading.Lock
    _ready: threading.Condition
    _drained: threading.Condition
    _levels: dict[int, deque[Pending]]
    _priorities: list[int]
    _depth: int
    _cost: int
    _formed: int
    _waiting: int
    _state: int
    _running: int
    _batch_s: float
    _batches: int
    _items: int
    _succeeded: int
    _failed: int
    _expired: int
    _cancelled: int
    _sizes: Counter[int]
    _queue_wait: LatencyWindow
    _run_time: LatencyWindow
    _busy_s: float

    # -- forming batches (the slot threads) ------------------------------------------
    def _work(self, fn: Callable[[list[Any]], Any], is_async: bool) -> None:
        """One batch slot: take a batch, run it, resolve its callers; until stopped."""
        loop = asyncio.new_event_loop() if is_async else None
        try:
            while True:
                with self._lock:
                    taken = self._take_locked()
                    if taken is None:
                        return
                    batch, expired, waits_on = taken
                    if batch:
                        self._running += 1
                if expired:
                    wake_all([record.waiter for record in expired])
                if batch:
                    self._run(fn, loop, batch, waits_on, on_slot=True)
        finally:
            if loop is not None:
                loop.close()

    def _take_locked(self) -> _Formed | None:
        """Wait for a batch and take it (see :meth:`_form_locked`).

        None when the worker should exit. Called with the lock held; waits on the
        condition, never polls.
        """
        while True:
            if self._depth and self._running < self.max_concurrent_batches:
                if self.wait_for_full and self._state == _OPEN and self._cost < self.max_batch_size:
                    oldest = min(level[0].enqueued for level in self._levels.values() if level)
                    remaining = oldest + self.max_wait_s - _monotonic()
                    if remaining > 0:
                        self._waiting += 1
                        self._ready.wait(remaining)
                        self._waiting -= 1
                        continue
                return self._form_locked()
            if self._state >= _STOPPING:
                return None
            self._waiting += 1
            self._ready.wait()
            self._waiting -= 1

    def _pick_level_locked(self) -> deque[Pending]:
        """The level to serve: the first non-empty one, unless a lower one starves."""
        self._formed += 1
        first: deque[Pending] | None = None
        for priority in self._priorities:
            level = self._levels[priority]
            if not level:
                continue
            if first is None:
                first = level
            elif self._formed - level[0].seq > self.starvation_bound:
                return level  # passed over for too many batches: its turn now
        assert first is not None  # called only when something is queued
        return first

    def _form_locked(self, on_loop: bool = False) -> _Formed:
        """Take the next batch from the queue: (live records, records expired on the
        way, the loop every live record's caller awaits on when formation knows it;
        None for a plain batch of caller threads, which await no loop).

        ``on_loop``: formed on the callers' event loop (the loop slot), where a
        cancelled caller's task has not yet given its record up.
        """
        queue = self._pick_level_locked()
        expired: list[Pending] = []
        waits_on = None
        if not self._odd:
            batch = self._form_plain_locked(queue, on_loop)
            plain = self._plain_loop
            waits_on = None if plain is CALLER_THREADS else plain
        else:
            batch = []
            now = _monotonic()
            if self._uniform:
                # Every item costs 1 and all may share a batch: take from the head,
                # drop the expired.
                limit = self.max_batch_size
                taken = 0
                while queue and len(batch) < limit:
                    record = queue.popleft()
                    record.queued = False
                    if record.odd:
                        self._odd -= 1
                    taken += 1
                    deadline = record.deadline
                    waiter = record.waiter
                    if deadline is not None and now >= deadline:
                        record.settled = True
                        record.outcome = Failure(deadline_error(None))
                        expired.append(record)
                    elif type(waiter) is _FUTURE and waiter.done():
                        self._drop_cancelled_locked(record)
                    else:
                        batch.append(record)
                self._depth -= taken
                self._cost -= taken
            else:
                self._form_keyed_locked(queue, now, batch, expired)
            if expired:
                self._expired += len(expired)
        if not self._depth and self._state == _CLOSING:
            self._drained.notify_all()
        return batch, expired, waits_on

    def _form_plain_locked(self, queue: deque[Pending], on_loop: bool) -> list[Pending]:
        """Form a batch when every queued record is plain (see Pending.odd).

        They came by asubmit's hot path on one loop (no deadline, cost 1, one group,
        buffer rows in order) or by submit's on caller threads (the same, but no
        buffer rows). Taken from the head with no check per record: this runs on the
        slot thread between two batches, while the model waits (about 5 µs of checks
        for 32 records). A slot thread may take the record of an asyncio caller just
        cancelled: its result is dropped, as for a caller cancelled while its batch
        runs. On the loop (``on_loop``) such records are dropped before the model. (A
        caller thread that gives up takes its record out of the queue itself.)
        """
        limit = self.max_batch_size
        if len(queue) <= limit:
            batch = list(queue)
            queue.clear()
        else:
            popleft = queue.popleft
            batch = [popleft() for _ in range(limit)]
        for record in batch:
            record.queued = False
        self._depth -= len(batch)
        self._cost -= len(batch)
        if not on_loop:
            return batch
        live: list[Pending] = []
        for record in batch:
            waiter = record.waiter
            if type(waiter) is _FUTURE and waiter.done():
                self._drop_cancelled_locked(record)
            else:
                live.append(record)
        return live

    def _drop_cancelled_locked(self, record: Pending) -> None:
        """Settle a record taken from the queue whose asyncio caller was cancelled.

        Its future is cancelled at once, but its task gives the record up only when it
        next runs; a batch formed in between (on the same loop, by the loop slot, it is
        certain to be) must not send its item to the model.
        """
        record.settled = True
        record.outcome = Failure(Cancelled("the caller was cancelled"))
        self._cancelled += 1

    def _form_keyed_locked(
        self, queue: deque[Pending], now: float, batch: list[Pending], expired: list[Pending]
    ) -> None:
        """Form a batch by cost budget and group key (appends to ``batch``/``expired``)."""
        key = queue[0].key
        skipped: list[Pending] = []  # other groups' items, put back in order
        budget = self.max_batch_size
        while queue and budget > 0:
            record = queue[0]
            if record.deadline is not None and now >= record.deadline:
                # Given-up records leave the queue at once (_give_up), so every record
                # here is unsettled; one whose deadline has passed is failed, not sent.
                queue.popleft()
                record.settled = True
                record.outcome = Failure(deadline_error(None))
                expired.append(record)
            elif type(record.waiter) is _FUTURE and record.waiter.done():
                queue.popleft()
                self._drop_cancelled_locked(record)
            elif record.key != key:
                skipped.append(queue.popleft())
                continue
            elif record.size > budget:
                break  # the next item does not fit: it heads the next batch
            else:
                queue.popleft()
                batch.append(record)
                budget -= record.size
            record.queued = False
            if record.odd:
                self._odd -= 1
            self._depth -= 1
            self._cost -= record.size
        queue.extendleft(reversed(skipped))

    # -- running a batch -------------------------------------------------------------
    def _run(
        self,
        fn: Callable[[list[Any]], Any],
        loop: asyncio.AbstractEventLoop | None,
        batch: list[Pending],
        waits_on: asyncio.AbstractEventLoop | None = None,
        *,
        on_slot: bool = False,
    ) -> None:
        """Run ``batch`` (``fn`` on the slot's private ``loop`` for a coroutine
        function) and settle its callers; ``waits_on`` as :meth:`_form_locked` says.
        ``on_slot``: called by a slot thread, which never runs its callers' loop."""
        started = _monotonic()
        running_batch.records = batch
        tag: Any = None
        try:
            if self._stacking:  # a sync fn of arrays, never a Predictor's back end
                outcomes = self._run_stacked(batch, waits_on is not None)
            else:
                items = [record.item for record in batch]
                if self._fn_isolates:
                    # A Predictor's back end: outcomes already per item, and what ran them.
                    outcomes, tag = fn(items)
                elif loop is None:
                    outcomes = run_batch(fn, items)
                else:
                    outcomes = loop.run_until_complete(arun_batch(fn, items))
        except BaseException as exc:
            # run_batch isolates Exceptions; this is SystemExit or the like raised by fn.
            # Fail this batch's callers and keep the slot alive: a dead worker thread would
            # leave every later caller waiting forever.
            outcomes = [Failure(exc)] * len(batch)
        finally:
            running_batch.records = None
        elapsed = _monotonic() - started
        # Callers all awaiting on one asyncio loop (the common case under load) are
        # settled on that loop, in one call, and the batch is accounted for there: the
        # slot thread, whose serial work bounds throughput, then does nothing per item
        # after the batch function returns, and only frees its slot under the lock.
        loop = waits_on or _single_loop(batch)
        with self._lock:
            self._running -= 1
            if self._waiting and self._depth and self._drain_loop is None:
                # A slot is free again (a caller ran its own batch); with a drain
                # scheduled on a loop, that drain takes what is queued.
                self._ready.notify()
            if loop is None:
                self._account_locked(len(batch), elapsed)
                head, others = self._settle_locked(batch, outcomes, tag, started)
        if loop is not None:
            if not on_slot and loop is _get_running_loop():  # (a system call: getpid)
                self._settle_on_loop(batch, outcomes, tag, started, elapsed)
                return
            try:
                loop.call_soon_threadsafe(
                    self._settle_on_loop, batch, outcomes, tag, started, elapsed
                )
            except RuntimeError:  # the loop is closed: nobody waits, but account for them
                with self._lock:
                    self._account_locked(len(batch), elapsed)
                    self._settle_locked(batch, outcomes, tag, started)
            return
        if head is not None:
            head.wake()
        if others:
            wake_all(others)

    def _run_stacked(self, batch: list[Pending], plain: bool) -> Any:
        """Outcomes of a stacking batch: the model on the batch array made at submission.

        An array of outputs (not of objects) with one row per item is returned as it
        is: its rows are taken as views where the callers are settled, so the slot
        thread does nothing per item. Other outputs are split by the collation, and a
        failure is isolated as :func:`run_batch` does, sub-batches collated anew.
        """
        run_fn = self._run_fn
        assert run_fn is not None
        array = self._batch_array(batch, plain)
        if array is None:
            return run_batch(run_fn, [record.item for record in batch])
        fn, collate = self._fn, self.collate
        assert fn is not None
        assert collate is not None
        n = len(batch)
        try:
            out = fn(array)
            if (
                type(out) is _NDARRAY
                and out.ndim
                and len(out) == n
                and out.dtype.kind != "O"  # an object array may hold exceptions
            ):
                return out
            result: Any = collate.split(out, array, n)
        except Exception as exc:
            result = exc
        return isolate(run_fn, [record.item for record in batch], result)

    def _batch_array(self, batch: list[Pending], plain: bool) -> Any:
        """The batch array of a stacking batch, made from its items' buffer rows; None
        when an item has no row (it was stacked at formation: collate them all there).

        Consecutive rows (the common case, one loop's callers) are a view of one buffer,
        or one ``np.concatenate`` of two; otherwise each run of consecutive rows is a
        slice and the slices are joined. ``plain``: every record has a row, in
        increasing order (a batch of plain records), so the end rows tell whether they
        are consecutive.
        """
        first = batch[0]
        start = first.row
        n = len(batch)
        size = self._buf_len
        if plain:
            consecutive = batch[-1].row - start == n - 1
        else:
            consecutive = start >= 0 and [r.row for r in batch] == list(range(start, start + n))
        if consecutive:
            low = start % size
            if low + n <= size:
                return first.buf[low : low + n]
            return np.concatenate((first.buf[low:], batch[-1].buf[: low + n - size]))
        slices: list[Any] = []
        buf: Any = None
        start = last = 0
        for record in batch:
            own = record.buf
            if own is None:
                return None
            if own is buf and record.row == last + 1:
                last += 1
                continue
            if buf is not None:
                slices.append(buf[start % size : last % size + 1])
            buf, start, last = own, record.row, record.row
        slices.append(buf[start % size : last % size + 1])
        return slices[0] if len(slices) == 1 else np.concatenate(slices)

    def _new_buffer(self) -> Any:
        """A new buffer for a stacking batcher's rows (submit-side collation).

        ``asubmit`` copies an asyncio caller's array into the next row as it queues it.
        A batch whose items sit in consecutive rows reaches the model as a view of
        those rows, with no copy on the slot thread, whose serial work bounds
        throughput (np.stack of 32 small arrays costs about as much as 2 µs per item).
        Rows are written once and never reused, so a batch, or an output that is a view
        of it, is never overwritten by later items. Records queued out of row order
        only split the batch into more slices (_batch_array). The buffer has room for
        a few batches: a batch spanning two buffers costs a concatenate.
        """
        return np.empty((self._buf_len, *self._stack_shape), self._stack_dtype)

    def _retry_after_locked(self) -> float:
        """Seconds until a full queue likely has room (for Overloaded.retry_after_s)."""
        # The queue frees max_batch_size places each time a slot takes a batch, which
        # happens about every batch duration / slots.
        if self._batch_s <= 0.0:
            return _DEFAULT_RETRY_AFTER_S
        return max(self._batch_s / self.max_concurrent_batches, 0.001)

    # -- settling its callers --------------------------------------------------------
    def _account_locked(self, size: int, elapsed: float) -> None:
        """Count a finished batch of ``size`` items that ran ``elapsed`` seconds, and
        decide from the moving average of durations where asyncio callers' batches run."""
        self._batches += 1
        self._items += size
        self._sizes[size] += 1
        self._run_time.record(elapsed)
        self._busy_s += elapsed
        self._batch_s = batch_s = (
            elapsed
            if self._batch_s <= 0.0
            else self._batch_s + _EWMA_ALPHA * (elapsed - self._batch_s)
        )
        self._loop_slot = (
            self._inline_ok
            and self._fn_loop_safe
            and batch_s <= min(self.inline_max_s, _LOOP_SLOT_MAX_S)
        )

    def _settle_locked(
        self, batch: list[Pending], outcomes: list[Any], tag: Any, started: float
    ) -> tuple[Any, list[Any]]:
        """Give each record its outcome; return the head of the chain of caller threads
        to wake and every other waiter. Called with the lock held."""
        self._queue_wait.record_many([started - record.enqueued for record in batch])
        settled = failed = 0
        # Caller threads are woken in a chain: the slot wakes the first, each wakes
        # the next as it returns, so they queue for the GIL one at a time instead of
        # all at once (a herd that also starves the slot of the GIL). Linked under
        # the lock, so a caller that times out meanwhile still sees its successor.
        others: list[Any] = []
        head: Any = None
        last: Pending | None = None  # the chain's tail
        for record, outcome in zip(batch, outcomes, strict=True):
            if record.settled:
                continue  # its caller gave up while the batch ran: the result is dropped
            record.settled = True
            record.outcome = outcome
            record.tag = tag
            if type(outcome) is Failure:
                failed += 1
            waiter = record.waiter
            if type(waiter) is SyncWaiter:
                if last is None:
                    head = waiter
                else:
                    last.chain = waiter
                last = record
            else:
                others.append(waiter)
            settled += 1
        self._failed += failed
        self._succeeded += settled - failed
        return head, others

    def _settle_on_loop(
        self,
        batch: list[Pending],
        outcomes: list[Any],
        tag: Any,
        started: float,
        elapsed: float,
    ) -> None:
        """Settle a batch whose callers all await futures of the loop running this, and
        wake them (futures are set outside the lock: each costs a loop callback)."""
        # No lock while settling: every record here belongs to a caller on this thread,
        # and only this thread settles them now (this method, or the caller's own
        # _give_up). Holding the lock would make a slot thread that wants to form the
        # next batch block on it, and then wait for the GIL through the loop's whole
        # burst of work: the model would stand still. (The loop is _settle_locked's,
        # specialised: one kind of waiter, set at once; a shared per-record helper
        # would cost a call per item on this path.)
        waits = [started - record.enqueued for record in batch]
        settled = failed = 0
        for record, outcome in zip(batch, outcomes, strict=True):
            if record.settled:
                continue  # its caller gave up while the batch ran: the result is dropped
            record.settled = True
            record.outcome = outcome
            if type(outcome) is Failure:
                failed += 1
            settled += 1
            try:
                record.waiter.set_result(None)  # type: ignore[union-attr]  # _single_loop
            except asyncio.InvalidStateError:
                pass  # its caller was cancelled meanwhile: its task gives up the record
        if tag is not None:  # a Predictor's version (its callers run after this returns)
            for record in batch:
                record.tag = tag
        # Counted without the lock: the tally is folded into the counters under it
        # every few batches, and by statistics(). A copy of the Batcher without this
        # lock section measured 0.90 of a minimal engine's items/s against 0.85 with
        # it (asyncio callers, C = 256, the MLP of benchmarks/batching.py, paired):
        # the slot thread, forming the next batch, meets the loop there. A cheap
        # batch is folded at once: it may move batches onto the loop.
        tally = self._tally
        tally.append((len(batch), elapsed, settled, failed, waits))
        if (
            len(tally) >= _TALLY_BATCHES
            or self._loop_slot
            or self._batch_s <= 0.0
            or elapsed <= _LOOP_SLOT_MAX_S
        ):
            with self._lock:
                self._fold_tally_locked()

    def _fold_tally_locked(self) -> None:
        """Count the batches settled on event loops since the last fold (_settle_on_loop)."""
        tally = self._tally
        while tally:  # popleft and append are atomic: loops may append meanwhile
            size, elapsed, settled, failed, waits = tally.popleft()
            self._account_locked(size, elapsed)
            self._queue_wait.record_many(waits)
            self._failed += failed
            self._succeeded += settled - failed

    # -- a caller's own thread as a slot ---------------------------------------------

    def _run_here(self, x: Any) -> Pending | None:
        """Run a lone item on the calling thread, if nothing else is waiting or running.

        A thread hand-off costs two wake-ups (tens of microseconds each on a busy or
        virtual machine), more than many models take; when the batcher is idle there is
        no batch to join anyway, so the caller runs its own batch of one (its thread
        would only wait otherwise). Under load items queue as usual.
        """
        if self._depth or self._running >= self.max_concurrent_batches:
            return None  # busy (an unlocked read, only a hint: checked again below)
        if self.size_fn is not None:
            self._size_of(x)  # the same refusal a queued item would get
        with self._lock:
            if self._state != _OPEN or self._depth or self._running >= self.max_concurrent_batches:
                return None
            self._running += 1  # this thread holds a slot until _run gives it back
        record = Pending(x, None, _monotonic(), NO_WAITER)
        record.queued = False
        assert self._run_fn is not None
        self._run(self._run_fn, None, [record])
        return record

    def _size_of(self, x: Any) -> int:
        """``size_fn(x)``, refused with InvalidInput when one item exceeds the budget."""
        assert self.size_fn is not None
        size = int(self.size_fn(x))
        if size > self.max_batch_size:
            raise InvalidInput(
                f"this item's size is {size}, more than the batch budget "
                f"max_batch_size={self.max_batch_size}; split it into smaller requests"
            )
        return size

    # -- the callers' event loop as a slot -------------------------------------------
    def _may_run_on_loop(self) -> bool:
        """Whether an event-loop caller may run its item itself, if it stays alone.

        Only for a function that does not block on other threads, while recent batches
        took at most ``inline_max_s``, and while nothing is queued or running (an
        unlocked read: a hint, checked again under the lock by :meth:`_ran_on_loop`).
        """
        return (
            self._inline_ok
            and self._fn_loop_safe
            and 0.0 < self._batch_s <= self.inline_max_s
            and not self._depth
            and self._running < self.max_concurrent_batches
        )

    async def _ran_on_loop(self, record: Pending) -> bool:
        """Let the loop's other ready callers queue first; if ``record`` is then still
        alone, run it here and return True. Otherwise make sure a slot takes it.

        Queued callers of one loop arrive one after another, never at once: deciding at
        submission would run every item alone, one by one, and never form a batch. One
        pass of the loop lets them all queue, so only a truly lone item runs here.
        """
        await anyio.lowlevel.checkpoint()
        with self._lock:
            if (
                record.queued
                and self._depth == 1
                and self._state == _OPEN
                and self._running < self.max_concurrent_batches
            ):
                self._levels[record.priority].remove(record)
                if record.odd:
                    self._odd -= 1
                self._depth -= 1
                self._cost -= record.size
                record.queued = False
                record.waiter = NO_WAITER
                self._running += 1  # this caller holds a slot until _run gives it back
                stolen = True
            else:
                stolen = False
                if self._waiting and self._depth:
                    self._ready.notify()  # it was queued without waking a slot
        if stolen:
            assert self._run_fn is not None
            self._run(self._run_fn, None, [record])
        return stolen

    def _drain_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run one batch on this event loop (cheap batches, see _LOOP_SLOT_MAX_S), then
        come back for the next while the queue holds items and batches stay cheap.

        One batch per loop callback: the callers just woken queue their next items in
        between, so the next batch is full.
        """
        with self._lock:
            batch: list[Pending] = []
            expired: list[Pending] = []
            if (
                self._depth
                and self._running < self.max_concurrent_batches
                and self._state in (_OPEN, _CLOSING)
            ):
                batch, expired, waits_on = self._form_locked(on_loop=True)
                if batch:
                    self._running += 1
        try:
            if expired:
                wake_all([record.waiter for record in expired])
            if batch:
                assert self._run_fn is not None
                self._run(self._run_fn, None, batch, waits_on)
        finally:
            with self._lock:
                # Only after a batch ran here: with every slot busy, the slot threads take
                # what is queued as they free up (no polling from the loop).
                again = bool(batch) and bool(self._depth) and self._loop_slot
                again = again and self._state == _OPEN
                if not again:
                    self._drain_loop = None
                    if self._waiting and self._depth:
                        self._ready.notify()  # what is left goes to a slot thread
        if again:
            loop.call_soon(self._drain_on_loop, loop)

    # -- a caller giving up ----------------------------------------------------------
    def _abandon(self, records: Iterable[Pending]) -> None:
        """A caller thread's wait raised (a signal handler's KeyboardInterrupt, say):
        give its records up, and pass on the wake-up each record a worker settled first
        owes the next caller thread of its batch (without it they would wait forever)."""
        for record in records:
            self._give_up(record, Cancelled("the caller was interrupted while it waited"))
            if record.chain is not None:  # final: linked under the lock _give_up took
                record.chain.wake()

    def _give_up(self, record: Pending, error: BaseException, *, expired: bool = False) -> None:
        """The caller stops waiting: settle its record with ``error`` unless already settled.

        Returns normally when the record was settled first by a worker (the caller then
        takes that outcome, which is at least as good).
        """
        with self._lock:
            if record.settled:
                return
            record.settled = True
            record.outcome = Failure(error)
            if expired:
                self._expired += 1
            else:
                self._cancelled += 1
            if record.queued:
                record.queued = False
                self._levels[record.priority].remove(record)  # O(queue), bounded by max_queue
                if record.odd:
                    self._odd -= 1
                self._depth -= 1
                self._cost -= record.size
                if not self._depth and self._state == _CLOSING:
                    self._drained.notify_all()
