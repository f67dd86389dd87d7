from __future__ import annotations

from typing import Any

import pytest

import servekit as sk
from servekit._outcome import Failure, arun_batch, run_batch, to_model_error


class CountingPoison:
    def __init__(self, poison: set[int]) -> None:
        self.poison = poison
        self.calls: list[list[int]] = []

    def __call__(self, batch: list[int]) -> list[int]:
        self.calls.append(list(batch))
        if any(x in self.poison for x in batch):
            raise KeyError("poisoned")
        return [x * 10 for x in batch]


def test_one_poisoned_item_in_32_costs_at_most_11_calls() -> None:
    model = CountingPoison({17})
    outcomes = run_batch(model, list(range(32)))
    assert len(model.calls) <= 1 + 2 * 5
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, Failure)]
    assert failed == [17]
    assert isinstance(outcomes[17].error, KeyError)
    assert [o for i, o in enumerate(outcomes) if i != 17] == [x * 10 for x in range(32) if x != 17]


def test_returned_exception_fails_only_its_item_in_one_call() -> None:
    calls = []

    def model(batch: list[int]) -> list[Any]:
        calls.append(batch)
        return [ValueError("odd") if x % 2 else x for x in batch]

    outcomes = run_batch(model, [0, 1, 2])
    assert len(calls) == 1
    assert outcomes[0] == 0 and outcomes[2] == 2
    assert isinstance(outcomes[1], Failure) and str(outcomes[1].error) == "odd"


@pytest.mark.parametrize("bad", [lambda b: b[:-1], lambda b: None, lambda b: [*b, 0]])
def test_wrong_output_count_fails_the_whole_batch_naming_both_counts(bad: Any) -> None:
    outcomes = run_batch(bad, [1, 2, 3, 4])
    assert all(isinstance(o, Failure) for o in outcomes)
    error = outcomes[0].error
    assert isinstance(error, sk.BatchContractError)
    assert "4 inputs" in str(error)


def test_several_poisoned_items_are_all_isolated() -> None:
    model = CountingPoison({0, 5, 31})
    outcomes = run_batch(model, list(range(32)))
    assert [i for i, o in enumerate(outcomes) if isinstance(o, Failure)] == [0, 5, 31]


@pytest.mark.anyio
async def test_async_driver_isolates_like_the_sync_one() -> None:
    model = CountingPoison({3})

    async def predict(batch: list[int]) -> list[int]:
        return model(batch)

    outcomes = await arun_batch(predict, list(range(8)))
    assert [i for i, o in enumerate(outcomes) if isinstance(o, Failure)] == [3]
    assert len(model.calls) <= 1 + 2 * 3


def test_to_model_error_wraps_foreign_errors_and_chains_the_cause() -> None:
    original = KeyError("k")
    wrapped = to_model_error(original)
    assert isinstance(wrapped, sk.ModelError)
    assert wrapped.__cause__ is original
    assert wrapped.error_type == "KeyError"
    own = sk.Overloaded("full", retry_after_s=1.0)
    assert to_model_error(own) is own
