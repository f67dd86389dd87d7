"""Fixtures of the distributed tests: input files, and the clusters (a real 2-worker
Dask LocalCluster, a local Ray with 2 CPUs), each started once per test session.

These tests run in their own nox sessions (`nox -s dask`, `nox -s ray`), not in
`nox -s tests`: they need the extras and take tens of seconds to start a cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _models

# Workers cannot import the test directory: send the test models by value.
cloudpickle.register_pickle_by_value(_models)

N_ROWS = 3000


def write_parquet(path: Path, n: int = N_ROWS, row_group_size: int = 700) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.arange(n, dtype=np.float64)
    x[[5, 1234]] = np.nan  # rows that fail validation
    pq.write_table(
        pa.table({"id": np.arange(n, dtype=np.int64) * 10, "x": x}),
        path,
        row_group_size=row_group_size,
    )
    return path


@pytest.fixture
def parquet_in(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "in.parquet")


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # a free port: other clusters may hold 8787
            silence_logs=50,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
