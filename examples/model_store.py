"""The model store: save trained versions, promote one with an alias, hot-swap a server.

Two versions of a small linear model are saved in a temporary store; a predictor serves
``house@champion`` to four busy threads; the alias moves to version 2 and the running
predictor swaps to it without failing a request. Then ``servekit models list`` shows
the store.

Run: python examples/model_store.py
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import servekit as sk
from servekit.registry import ModelStore

TRUE_WEIGHTS = np.array([3.1, 12.0, -0.8])  # price per m2, per room, per year of age
TRUE_BIAS = 40.0


def house_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic houses: area (m2), rooms, age (years) -> price (thousands)."""
    rng = np.random.default_rng(seed)
    features = np.column_stack(
        [rng.uniform(30, 200, rows), rng.integers(1, 7, rows), rng.uniform(0, 80, rows)]
    )
    prices = features @ TRUE_WEIGHTS + TRUE_BIAS + rng.normal(0, 25, rows)
    return features, prices


class HousePrice(sk.Model[list[float], tuple[float, int]]):
    """A least-squares linear model: price = features . weights + bias.

    Each output is ``(price, version)``, so callers can see which version answered.
    """

    def __init__(self, weights: np.ndarray, bias: float) -> None:
        self.weights = weights
        self.bias = bias
        self.version = 0  # set after loading, to show which version answered

    @classmethod
    def fit(cls, features: np.ndarray, prices: np.ndarray) -> HousePrice:
        design = np.column_stack([features, np.ones(len(features))])
        solution, *_ = np.linalg.lstsq(design, prices, rcond=None)
        return cls(solution[:-1], float(solution[-1]))

    def prices(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weights + self.bias

    def predict(self, batch: list[list[float]]) -> list[tuple[float, int]]:
        return [(price, self.version) for price in self.prices(np.asarray(batch)).tolist()]


def rmse(model: HousePrice, features: np.ndarray, prices: np.ndarray) -> float:
    return float(np.sqrt(np.mean((model.prices(features) - prices) ** 2)))


def load_champion(store: ModelStore) -> HousePrice:
    # Resolve the alias once, then load exactly that version.
    info = store.info("house@champion")
    model = store.load(info.ref)
    assert isinstance(model, HousePrice)
    model.version = info.version
    return model


def main() -> None:
    test_x, test_y = house_data(1_000, seed=99)
    with tempfile.TemporaryDirectory() as root:
        store = ModelStore(root)
        for version_rows, seed in [(12, 1), (4_000, 2)]:
            model = HousePrice.fit(*house_data(version_rows, seed))
            info = store.save(
                "house",
                model,
                metadata={"rows": version_rows, "rmse": round(rmse(model, test_x, test_y), 2)},
            )
            print(f"saved {info.ref}: {info.metadata}")
        store.set_alias("house", "champion", 1)

        # Callers tag each request with the phase it was sent in: 0 before the swap,
        # 1 while it runs, 2 after it returned.
        phase = 0
        stop = threading.Event()
        answered: collections.Counter[tuple[int, int]] = collections.Counter()
        failed: list[BaseException] = []
        lock = threading.Lock()

        with sk.Predictor(load_champion(store), backend=sk.Threads(2)) as predictor:

            def caller(seed: int) -> None:
                rng = np.random.default_rng(seed)
                while not stop.is_set():
                    sent_in = phase
                    house = [float(rng.uniform(30, 200)), 3.0, float(rng.uniform(0, 80))]
                    try:
                        _, version = predictor.predict(house)
                    except Exception as exc:  # counted, not expected
                        with lock:
                            failed.append(exc)
                        continue
                    with lock:
                        answered[sent_in, version] += 1

            threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)

            store.set_alias("house", "champion", 2)  # promote version 2 ...
            phase = 1
            predictor.swap(load_champion(store), grace_s=5.0)  # ... and serve it, under load
            phase = 2
            time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join()
            sample = [120.0, 4.0, 10.0]
            price, version = predictor.predict(sample)

        total = sum(answered.values())
        before = {v: n for (p, v), n in answered.items() if p == 0}
        during = {v: n for (p, v), n in answered.items() if p == 1}
        after = {v: n for (p, v), n in answered.items() if p == 2}
        print(f"requests: {total} answered, {len(failed)} failed")
        print(f"sent before the swap: {before} (version: requests)")
        print(f"sent during the swap: {during}")
        print(f"sent after the swap:  {after}")
        print(f"house {sample} -> price {price:.1f}, from house:{version}")

        listing = subprocess.run(
            [sys.executable, "-m", "servekit", "models", "list", "--store", root],
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"$ servekit models list --store {root}")
        print(listing.stdout, end="")


if __name__ == "__main__":
    main()
