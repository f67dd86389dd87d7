"""Dynamic micro-batching: many concurrent single-item callers, one batched model.

Run: python examples/batching.py
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

# One BLAS thread: the callers' event loop needs the other core. A multi-threaded BLAS
# that spins on a core the loop is using makes every batch many times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # imported after the BLAS settings above

import servekit as sk


class MLP(sk.Model[np.ndarray, np.ndarray]):
    """256 -> 1024 (ReLU) -> 16, float32. It receives one stacked array per batch."""

    input_type = sk.Array("float32", (256,))

    def load(self) -> None:
        rng = np.random.default_rng(0)
        self.w1 = rng.standard_normal((256, 1024), dtype=np.float32) / 16
        self.w2 = rng.standard_normal((1024, 16), dtype=np.float32) / 32

    def predict(self, batch: np.ndarray) -> np.ndarray:  # type: ignore[override]
        return np.maximum(batch @ self.w1, 0) @ self.w2


def main() -> None:
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((2_000, 256), dtype=np.float32)
    batcher = sk.Batcher(max_batch_size=32, collate=sk.Stack(), max_queue=4_096)

    with sk.Predictor(MLP(), batcher=batcher) as predictor:
        print("== 64 asyncio clients, one item per request")

        async def clients() -> list[np.ndarray]:
            queue = list(range(len(inputs)))
            results: list[np.ndarray] = [np.empty(0)] * len(inputs)

            async def client() -> None:
                while queue:
                    i = queue.pop()
                    results[i] = await predictor.apredict(inputs[i])

            await asyncio.gather(*(client() for _ in range(64)))
            return results

        started = time.perf_counter()
        results = asyncio.run(clients())
        elapsed = time.perf_counter() - started
        expected = MLP()
        expected.load()
        assert np.allclose(np.stack(results), expected.predict(inputs), atol=1e-4)
        stats = batcher.statistics()
        mean = stats.mean_batch_size
        print(f"{len(inputs)} requests in {elapsed * 1e3:.0f} ms, mean batch {mean:.1f}")

        print("== 16 threads with the sync API")
        with ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(predictor.predict, inputs[:500]))
        print(f"{len(outs)} results; batches so far: {batcher.statistics().batches}")

        print("== a deadline and a priority")
        print("urgent:", predictor.predict(inputs[0], timeout_s=1.0, priority=-1).shape)
        try:
            predictor.predict(np.zeros(3, dtype=np.float32))
        except sk.InvalidInput as exc:
            print("rejected before queueing:", exc.errors[0]["msg"])
    print("done")


if __name__ == "__main__":
    main()
