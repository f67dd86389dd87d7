"""Score a Parquet file into Parquet, stop half-way, and resume.

A numpy model scores 20,000 rows of 32-float feature vectors. The first run is stopped
after a few chunks (as a crash or a deadline would); ``resume=True`` then skips the
chunks already written, and the output holds every row exactly once.
Run: ``python examples/batch_parquet.py`` (needs ``pip install "servekit[parquet]"``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from servekit.batch import BatchProgress, BatchReport, run_batch

ROWS, WIDTH = 20_000, 32
WEIGHTS = np.linspace(-1, 1, WIDTH, dtype=np.float32)


def score(batch: list[np.ndarray]) -> np.ndarray:
    """A linear model over a batch of feature vectors (one row each)."""
    return np.stack(batch) @ WEIGHTS


class StopAfter:
    """A progress callback that interrupts the run after some chunks, like a crash."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    def __call__(self, state: BatchProgress) -> None:
        if state.chunks_written == self.chunks:
            raise KeyboardInterrupt


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        features = np.random.default_rng(0).standard_normal((ROWS, WIDTH)).astype(np.float32)
        pq.write_table(
            pa.table(
                {
                    "id": np.arange(ROWS),
                    "x": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), WIDTH),
                }
            ),
            folder / "features.parquet",
        )

        def run(resume: bool, progress: bool | Callable[[BatchProgress], None]) -> BatchReport:
            return run_batch(
                score,
                folder / "features.parquet",
                folder / "scores.parquet",
                key="id",
                columns="x",
                chunk_size=2000,
                output="score",
                resume=resume,
                progress=progress,
            )

        try:
            run(resume=False, progress=StopAfter(4))
        except KeyboardInterrupt:
            print(
                "interrupted after 4 chunks; scores.parquet exists:",
                (folder / "scores.parquet").exists(),
            )
        print(run(resume=True, progress=False))
        table = pq.read_table(folder / "scores.parquet")
        ids = table["id"].to_numpy()
        print("rows:", table.num_rows, "each id once:", bool((ids == np.arange(ROWS)).all()))
        expected = features @ WEIGHTS
        print("scores match:", bool(np.allclose(table["score"].to_numpy(), expected, atol=1e-5)))


if __name__ == "__main__":
    main()
