"""The Batcher's records: one pending item, its statistics, and ``is_cancelled``.

Kept apart from the engine (``_batcher.py``, the callers' side, and ``_batch_slots.py``,
where batches run) so those modules hold only the queue and its slots.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._outcome import Failure, to_model_error
from ._waker import Waiter
from .metrics import LatencySummary

__all__ = [
    "CALLER_THREADS",
    "NO_WAITER",
    "BatcherStatistics",
    "Pending",
    "Plain",
    "is_cancelled",
    "running_batch",
    "unwrap",
]


class Plain(enum.Enum):
    """Whose records are plain when they are not an asyncio loop's (see Pending.odd)."""

    CALLER_THREADS = "caller threads"


#: ``Batcher._plain_loop`` when the plain records are those of ``submit``'s hot path
#: (caller threads, each blocked on its own lock) rather than one asyncio loop's.
CALLER_THREADS: Final = Plain.CALLER_THREADS


class _NoWaiter:
    """The waiter of an item its own caller runs: nobody waits to be woken."""

    def wake(self) -> None:
        """Nothing to wake."""


NO_WAITER = _NoWaiter()

# The batch a slot thread is running, for is_cancelled(); None outside a batch.
running_batch = threading.local()


def is_cancelled(item: Any) -> bool:
    """Whether every caller waiting for ``item`` has gone (cancelled, or past its deadline).

    For a batch function that can stop early: call it with an item of the batch it was
    given, and skip the work for items nobody waits for any more (their outputs are
    dropped anyway; return anything in their place). It answers for batches run on the
    Batcher's own threads: a standalone Batcher, or a Predictor on the Inline back end.
    Elsewhere (worker threads of another back end, worker processes) it returns False.

    Example::

        def generate(prompts: list[str]) -> list[str]:
            return ["" if sk.is_cancelled(p) else long_generation(p) for p in prompts]
    """
    batch: list[Pending] | None = getattr(running_batch, "records", None)
    if not batch:
        return False
    mine = [record for record in batch if record.item is item]
    return bool(mine) and all(record.settled for record in mine)


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A consistent snapshot of a :class:`Batcher`'s counters (see :meth:`Batcher.statistics`).

    Every accepted item ends in exactly one of ``succeeded``, ``failed``, ``expired``,
    ``cancelled`` or ``closed``. ``rejected`` items were never accepted, nor were items
    submitted with ``timeout_s <= 0`` (counted in ``expired``).
    """

    #: Items waiting in the queue now.
    queue_depth: int
    #: Batches running now.
    running_batches: int
    #: Batches sent to the function so far (a batch retried in halves counts once).
    batches: int
    #: Items sent to the function so far.
    items: int
    #: ``items / batches`` (0.0 before the first batch).
    mean_batch_size: float
    #: Items whose caller got the function's output.
    succeeded: int
    #: Items whose caller got an error from the function (``ModelError`` and the like).
    failed: int
    #: Items refused with ``Overloaded`` because the queue was full.
    rejected: int
    #: Items whose ``timeout_s`` passed before a result (``DeadlineExceeded``).
    expired: int
    #: Items whose async caller was cancelled, or whose caller thread was interrupted
    #: (a signal handler raised in its wait), before a result.
    cancelled: int
    #: Items failed with ``Closed`` because the grace period of ``close`` ran out.
    closed: int
    #: How many batches of each size have run: ``{size: count}`` (read-only).
    batch_sizes: Mapping[int, int]
    #: Time items waited in the queue, from submission to their batch's start.
    queue_wait: LatencySummary
    #: Time the function took per batch.
    run_time: LatencySummary
    #: Share of the slots' time spent running batches since start (0.0 to 1.0).
    utilisation: float


@dataclass(slots=True, eq=False)  # eq=False: identity, so deque.remove finds this record
class Pending:
    """One submitted item and the caller waiting for it."""

    item: Any
    deadline: float | None  # monotonic seconds; None = no deadline
    enqueued: float  # monotonic seconds, for max_wait_s
    waiter: Waiter | asyncio.Future[None]  # wakes the caller's thread or event loop
    priority: int = 0  # lower is served first
    key: Hashable = None  # only items with equal keys share a batch
    size: int = 1  # cost against max_batch_size (size_fn), 1 when counting items
    seq: int = 0  # batches formed before this item arrived, for the starvation bound
    queued: bool = True  # True while in its priority level's queue
    chain: Any = None  # the next sync caller of the same batch, woken by this one
    tag: Any = None  # what the attached fn said ran the batch (a Predictor: the version)
    settled: bool = False  # set once, with outcome, under the Batcher's lock
    outcome: Any = None  # the output, or a Failure
    buf: Any = None  # a Stack batcher's buffer holding a copy of item (see Batcher._new_buffer)
    row: int = -1  # its row number over all the buffers (see Batcher._new_buffer); -1: none
    # False only for a record queued by a hot path: asubmit's on the batcher's current
    # loop (no deadline, cost 1, the batcher's one group, a buffer row of a stacking
    # batcher), or submit's while the plain records are caller threads' (no deadline,
    # cost 1, one group, no buffer row: stacked at formation). A batch of such records
    # only is formed with no check per record.
    odd: bool = False


def unwrap(outcome: Any) -> Any:
    if type(outcome) is Failure:
        raise to_model_error(outcome.error)
    return outcome
