"""Running one batch through a model with per-item error isolation.

The rule every back end keeps: one item never fails its batch-mates. When the model
raises for a whole batch, the batch is split in halves and each half is retried, until
the items that fail are alone; for one bad item among 32 that is at most
1 + 2 * log2(32) = 11 calls. A model may also return an exception object in an item's
place, which fails only that item. A model that returns the wrong number of outputs
fails the whole batch with :class:`BatchContractError`, because no output can then be
matched to its input safely.

The splitting plan is a generator shared by the sync and async drivers, so the two
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BatchContractError, DeadlineExceeded, ModelError, ServekitError

__all__ = ["Failure", "arun_batch", "deadline_error", "isolate", "run_batch", "to_model_error"]


@dataclass(slots=True)
class Failure:
    """An item's failed outcome; ``error`` is what its caller receives (or its cause)."""

    error: BaseException


# Plan protocol: the generator yields (start, stop) slices of the batch to call; it is
# sent either the list of outputs of that call or the exception the call raised; it
# returns the outcomes of the whole batch, one per item.
_Plan = Generator[tuple[int, int], Any, list[Any]]


def _plan(n: int) -> _Plan:
    outcomes: list[Any] = [None] * n
    stack = [(0, n)]
    while stack:
        start, stop = stack.pop()
        result = yield start, stop
        if isinstance(result, Exception):
            if stop - start == 1:
                outcomes[start] = Failure(result)
            else:
                mid = (start + stop) // 2
                # Pushed in reverse so that the left half runs first.
                stack.append((mid, stop))
                stack.append((start, mid))
            continue
        expected = stop - start
        got = _length(result)
        if got != expected:
            error = BatchContractError(
                f"the model returned {got} outputs for a batch of {expected} inputs; "
                "predict(batch) must return exactly one output per input, in order"
            )
            outcomes[start:stop] = [Failure(error)] * expected
            continue
        for offset, value in enumerate(result):
            outcomes[start + offset] = Failure(value) if isinstance(value, BaseException) else value
    return outcomes


def _length(result: Any) -> int | str:
    try:
        return len(result)
    except TypeError:
        return f"a {type(result).__name__} (not a sequence) instead of"


def _clean(result: Any, n: int) -> bool:
    """True when ``result`` is a list of ``n`` outputs with no exception among them."""
    if type(result) is not list or len(result) != n:
        return False
    for value in result:  # noqa: SIM110 - a plain loop is faster than all() on this path
        if isinstance(value, BaseException):
            return False
    return True


def run_batch(predict: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """Call ``predict`` on ``items`` with error isolation; return one outcome per item."""
    if not items:
        return []
    try:
        result: Any = predict(items)
    except Exception as exc:
        result = exc
    return isolate(predict, items, result)


def isolate(predict: Callable[[Any], Any], items: Sequence[Any], result: Any) -> list[Any]:
    """The outcomes of ``items``, given ``result``: what ``predict(items)`` just returned
    or raised. Items of a batch that raised are retried in halves until the failing
    ones are alone (the plan of :func:`run_batch`)."""
    if _clean(result, len(items)):
        return result  # type: ignore[no-any-return]  # the fast path: no plan needed
    plan = _plan(len(items))
    next(plan)  # the plan starts with the whole batch, which has just been called
    try:
        while True:
            start, stop = plan.send(result)
            try:
                result = predict(items[start:stop])
            except Exception as exc:
                result = exc
    except StopIteration as done:
        outcomes: list[Any] = done.value
        return outcomes


async def arun_batch(predict: Callable[[Any], Awaitable[Any]], items: Sequence[Any]) -> list[Any]:
    """Async twin of :func:`run_batch` for models whose ``predict`` is a coroutine."""
    if not items:
        return []
    try:
        result: Any = await predict(items)
    except Exception as exc:
        result = exc
    else:
        if _clean(result, len(items)):
            return result  # type: ignore[no-any-return]
    plan = _plan(len(items))
    next(plan)
    try:
        while True:
            start, stop = plan.send(result)
            try:
                result = await predict(items[start:stop])
            except Exception as exc:
                result = exc
    except StopIteration as done:
        outcomes: list[Any] = done.value
        return outcomes


def deadline_error(timeout_s: float | None) -> DeadlineExceeded:
    """The error of a request whose ``timeout_s`` passed before its result was ready."""
    within = "within its timeout_s" if timeout_s is None else f"within timeout_s={timeout_s}"
    return DeadlineExceeded(
        f"no result {within}; the request was dropped. Raise timeout_s, or add capacity if "
        "requests are queueing"
    )


def to_model_error(error: BaseException) -> BaseException:
    """The exception a caller receives for a failed item.

    servekit's own errors pass through; anything else is wrapped in :class:`ModelError`
    with the original chained as ``__cause__``.
    """
    if isinstance(error, ServekitError):
        return error
    wrapped = ModelError(
        f"the model raised {type(error).__name__}: {error}", error_type=type(error).__name__
    )
    wrapped.__cause__ = error
    return wrapped
