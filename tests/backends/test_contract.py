"""One contract, every back end: what a Predictor promises does not depend on where
the model runs."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import servekit as sk


class Contract(sk.Model[Any, Any]):
    """Doubles numbers and arrays; fails on chosen inputs; reports where it runs."""

    def load(self) -> None:
        self.where = (os.getpid(), threading.get_ident())

    def predict(self, batch: list[Any]) -> list[Any]:
        if "raise" in [x for x in batch if isinstance(x, str)]:
            raise RuntimeError("asked to raise")
        out: list[Any] = []
        for x in batch:
            if isinstance(x, str) and x == "where":
                out.append(self.where)
            elif isinstance(x, str) and x == "return-error":
                out.append(KeyError("returned"))
            else:
                out.append(x * 2)
        return out


class AsyncContract(Contract):
    async def predict(self, batch: list[Any]) -> list[Any]:  # type: ignore[override]
        return Contract.predict(self, batch)


BACKENDS: dict[str, Callable[[], sk.Backend]] = {
    "inline": sk.Inline,
    "threads": lambda: sk.Threads(2),
    "threads-per-thread-model": lambda: sk.Threads(2, share_model=False),
    "processes": lambda: sk.Processes(2),
}


PARAMS = [(b, m, False) for b in BACKENDS for m in ("sync", "async")]
PARAMS += [(b, "sync", True) for b in BACKENDS if b != "threads-per-thread-model"]


@pytest.fixture(
    scope="module",
    params=PARAMS,
    ids=[f"{b}-{m}{'-batcher' if batched else ''}" for b, m, batched in PARAMS],
)
def predictor(request: pytest.FixtureRequest) -> Iterator[sk.Predictor[Any, Any]]:
    backend_name, kind, batched = request.param
    model = Contract() if kind == "sync" else AsyncContract()
    batcher = sk.Batcher(max_batch_size=4) if batched else None
    with sk.Predictor(model, backend=BACKENDS[backend_name](), batcher=batcher) as p:
        p.kind = backend_name  # type: ignore[attr-defined]
        yield p


def test_predict_and_predict_many(predictor: sk.Predictor[Any, Any]) -> None:
    assert predictor.predict(21) == 42
    assert predictor.predict_many(range(10)) == [2 * i for i in range(10)]
    assert predictor.predict_many([]) == []


def test_numpy_arrays_round_trip(predictor: sk.Predictor[Any, Any]) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = predictor.predict(x)
    np.testing.assert_array_equal(out, x * 2)
    assert out.dtype == np.float32 and out.flags.writeable


def test_one_failing_item_does_not_fail_its_batch_mates(predictor: sk.Predictor[Any, Any]) -> None:
    out = predictor.predict_many([1, "raise", 3, "return-error", 5], return_exceptions=True)
    assert out[0] == 2 and out[2] == 6 and out[4] == 10
    assert isinstance(out[1], sk.ModelError) and out[1].error_type == "RuntimeError"
    assert isinstance(out[3], sk.ModelError) and out[3].error_type == "KeyError"
    with pytest.raises(sk.ModelError, match="asked to raise"):
        predictor.predict("raise")
    assert predictor.predict(4) == 8  # the back end is still serving


def test_load_runs_where_the_model_runs(predictor: sk.Predictor[Any, Any]) -> None:
    pid, thread = predictor.predict("where")
    kind = predictor.kind  # type: ignore[attr-defined]
    if kind == "processes":
        assert pid != os.getpid()
    else:
        assert pid == os.getpid()
    if kind == "threads-per-thread-model" and not predictor.model.is_async:
        seen = {predictor.predict("where")[1] for _ in range(50)}
        assert thread != threading.get_ident()
        assert all(t != threading.get_ident() for t in seen)


@pytest.mark.anyio
async def test_async_calls(predictor: sk.Predictor[Any, Any]) -> None:
    assert await predictor.apredict(5) == 10
    assert await predictor.apredict_many([1, 2]) == [2, 4]
    with pytest.raises(sk.ModelError):
        await predictor.apredict("raise")


def test_statistics_count_every_item(predictor: sk.Predictor[Any, Any]) -> None:
    before = predictor.statistics()
    predictor.predict_many([1, "raise", 2], return_exceptions=True)
    after = predictor.statistics()
    assert after.requests - before.requests == 3
    assert after.errors - before.errors == 1
    assert after.in_flight == 0


@pytest.mark.parametrize("backend_name", list(BACKENDS))
def test_load_failure_fails_start_and_closing_twice_is_fine(backend_name: str) -> None:
    class Broken(Contract):
        def load(self) -> None:
            raise OSError("no weights here")

    p = sk.Predictor(Broken(), backend=BACKENDS[backend_name]())
    with pytest.raises(sk.ModelLoadError, match="no weights here"):
        p.start()
    p.close()
    p.close()
    with pytest.raises(sk.Closed):
        p.predict(1)
