"""servekit quickstart: one model, called from sync code, async code and many threads.

Run it from the root of a clone:

    python examples/quickstart.py

It needs only servekit (numpy and pydantic come with it). If trio is installed
(``pip install -e ".[trio]"``), the async part also runs on trio; otherwise that step
is skipped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydantic import BaseModel, Field

import servekit as sk


class House(BaseModel):
    """One input item. servekit validates each input against it before queueing."""

    rooms: int = Field(ge=1)
    area_m2: float = Field(gt=0)
    age_years: float = Field(ge=0)


class PriceModel(sk.Model):
    """A linear model over a batch of houses: one numpy matrix product per batch."""

    def load(self) -> None:
        # Runs once in each worker, before the first predict: load weights here.
        self.weights = np.array([12_000.0, 2_500.0, -800.0])
        self.bias = 40_000.0

    def predict(self, batch: list[House]) -> list[float]:
        features = np.array([[h.rooms, h.area_m2, h.age_years] for h in batch])
        prices = features @ self.weights + self.bias
        return [round(float(p), 2) for p in prices]


HOUSES = [
    {"rooms": 3, "area_m2": 80, "age_years": 10},
    {"rooms": 5, "area_m2": 140.5, "age_years": 2},
    {"rooms": 2, "area_m2": 55, "age_years": 40},
]


def sync_use() -> None:
    print("== sync: Inline back end (the model runs on the calling thread)")
    with sk.Predictor(PriceModel()) as predictor:
        print("signature:", predictor.signature)
        print("one house:", predictor.predict(HOUSES[0]))
        print("many houses:", predictor.predict_many(HOUSES))

        # Bad input is rejected before it is queued, with the field that is wrong.
        try:
            predictor.predict({"rooms": 0, "area_m2": 80, "age_years": 10})
        except sk.InvalidInput as exc:
            print("rejected:", exc.errors[0]["loc"], "-", exc.errors[0]["msg"])

        # predict_many can put each failure in its item's place instead of raising.
        mixed = [HOUSES[0], {"rooms": "many"}, HOUSES[1]]
        results = predictor.predict_many(mixed, return_exceptions=True)
        print("mixed:", [type(r).__name__ if isinstance(r, Exception) else r for r in results])

        stats = predictor.statistics()
        print(f"statistics: {stats.requests} requests, {stats.errors} errors")


async def asyncio_use() -> None:
    print("== async on asyncio: Threads(2) keeps the model off the event loop")
    async with sk.Predictor(PriceModel(), backend=sk.Threads(2)) as predictor:
        one = await predictor.apredict(HOUSES[0])
        many = await asyncio.gather(*(predictor.apredict(h) for h in HOUSES))
        print("one house:", one)
        print("three concurrent calls:", many)
        print("apredict_many:", await predictor.apredict_many(HOUSES))


def trio_use() -> None:
    if importlib.util.find_spec("trio") is None:
        print('== async on trio: skipped (trio is not installed; pip install -e ".[trio]")')
        return
    import trio

    print("== async on trio: the same predictor API")

    async def main() -> None:
        results: dict[int, float] = {}
        async with sk.Predictor(PriceModel(), backend=sk.Threads(2)) as predictor:

            async def one(index: int) -> None:
                results[index] = await predictor.apredict(HOUSES[index])

            async with trio.open_nursery() as nursery:
                for index in range(len(HOUSES)):
                    nursery.start_soon(one, index)
        print("three concurrent calls:", [results[i] for i in range(len(HOUSES))])

    trio.run(main)


def threaded_use() -> None:
    print("== threads: 8 caller threads share one predictor")
    inputs = [
        {"rooms": 1 + i % 6, "area_m2": 40.0 + 5 * i, "age_years": i % 30} for i in range(400)
    ]
    callers: set[str] = set()

    def call(house: dict[str, float]) -> float:
        callers.add(threading.current_thread().name)
        return predictor.predict(house, timeout_s=5.0)

    with (
        sk.Predictor(PriceModel(), backend=sk.Threads(2)) as predictor,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        started = time.perf_counter()
        prices = list(pool.map(call, inputs))
        elapsed = time.perf_counter() - started
        stats = predictor.statistics()
    expected = PriceModel()
    expected.load()
    assert prices == expected.predict([House(**h) for h in inputs])
    print(f"{len(prices)} predictions from {len(callers)} threads in {elapsed * 1e3:.1f} ms")
    print(
        f"statistics: {stats.succeeded} succeeded, latency p50 "
        f"{stats.latency.p50_s * 1e6:.0f} us, p99 {stats.latency.p99_s * 1e6:.0f} us"
    )


def main() -> None:
    sync_use()
    asyncio.run(asyncio_use())
    trio_use()
    threaded_use()
    print("done")


if __name__ == "__main__":
    main()
