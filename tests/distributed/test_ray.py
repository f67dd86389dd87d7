"""RayRunner on a local Ray (2 CPUs): Ray Data map_batches over a pool of 2 actors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import _models
import pyarrow.parquet as pq
import pytest

from conftest import N_ROWS, write_parquet
from servekit import BatchFailed
from servekit.batch import RayRunner, run_batch

# Ray warns about its own deprecated settings while it starts and runs a dataset.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


def _table(path: Path) -> dict[str, list[Any]]:
    return dict(pq.read_table(path).to_pydict())


def test_parquet_matches_a_local_run_and_each_actor_loads_once(
    ray_session: Any, parquet_in: Path, tmp_path: Path
) -> None:
    loads = tmp_path / "loads"
    loads.mkdir()
    common: dict[str, Any] = {"key": "id", "columns": "x", "chunk_size": 100, "progress": False}
    local = run_batch(
        _models.Picky(),
        parquet_in,
        tmp_path / "local.parquet",
        error_sink=tmp_path / "local-errors.jsonl",
        **common,
    )
    seen: list[Any] = []
    report = run_batch(
        _models.Picky(str(loads)),
        parquet_in,
        tmp_path / "out.parquet",
        error_sink=tmp_path / "errors.jsonl",
        runner=RayRunner(partition_rows=300),
        **{**common, "progress": seen.append},
    )
    for field in (
        "status",
        "rows_read",
        "rows_succeeded",
        "rows_failed",
        "chunks_written",
        "failed_by_stage",
        "errors",
    ):
        assert getattr(report, field) == getattr(local, field), field
    assert _table(tmp_path / "out.parquet") == _table(tmp_path / "local.parquet")
    errors = (tmp_path / "errors.jsonl").read_bytes()
    assert errors == (tmp_path / "local-errors.jsonl").read_bytes()
    # Two actors for ten partitions: each loaded the model once.
    counts = _models.loads(loads)
    assert 1 <= len(counts) <= 2 and all(n == 1 for n in counts.values()), counts
    assert os.getpid() not in counts
    assert seen[-1].rows_done == N_ROWS and seen[-1].chunks_written == 30


def test_in_memory_rows_come_back_in_order(ray_session: Any) -> None:
    out: list[dict[str, Any]] = []
    report = run_batch(
        _models.double,
        list(range(500)),
        out,
        chunk_size=25,
        progress=False,
        runner=RayRunner(actors=2, partition_rows=100),
    )
    assert report.status == "completed" and report.chunks_written == 20
    assert [r["row"] for r in out] == list(range(500))
    assert [r["prediction"] for r in out] == [2 * i for i in range(500)]


def test_max_error_rate_fails_then_resume_finishes_the_rest(
    ray_session: Any, tmp_path: Path
) -> None:
    src = write_parquet(tmp_path / "in.parquet")
    flag = tmp_path / "broken"
    flag.touch()
    model = _models.FailWhile(str(flag), from_x=2500)
    out = tmp_path / "out.parquet"
    common: dict[str, Any] = {
        "key": "id",
        "columns": "x",
        "chunk_size": 100,
        "progress": False,
        "max_error_rate": 0.5,
        "runner": RayRunner(partition_rows=500),
    }
    with pytest.raises(BatchFailed) as failed:
        run_batch(model, src, out, **common)
    first = failed.value.report
    assert first is not None and first.status == "failed" and first.rows_failed >= 100
    flag.unlink()
    report = run_batch(model, src, out, resume=True, **common)
    assert report.chunks_skipped >= first.chunks_written
    assert report.chunks_skipped + report.chunks_written == 30
    table = _table(out)
    assert table["id"] == [i * 10 for i in range(N_ROWS) if i not in (5, 1234)]


def test_runner_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="actors"):
        RayRunner(actors=0)
    with pytest.raises(ValueError, match="num_cpus"):
        RayRunner(num_cpus=-1)


def test_sql_key_ranges_match_a_local_run(ray_session: Any, tmp_path: Path) -> None:
    import functools
    import sqlite3

    from servekit.batch import SQLSource

    db = tmp_path / "in.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, x REAL)")
        con.executemany(
            "INSERT INTO items VALUES (?, ?)", [(7 * i + i % 2, i) for i in range(2000)]
        )
    con.close()
    query = "SELECT id, x FROM items WHERE x < ?"
    out: list[dict[str, Any]] = []
    report = run_batch(
        _models.Picky(),
        SQLSource(
            query=query,
            params=(1500,),
            connect=functools.partial(sqlite3.connect, str(db)),
            partition_key="id",
        ),
        out,
        key="id",
        columns="x",
        chunk_size=100,
        progress=False,
        runner=RayRunner(partition_rows=400),
    )
    local: list[dict[str, Any]] = []
    connection = sqlite3.connect(db)
    expected = run_batch(
        _models.Picky(),
        SQLSource(connection, query + " ORDER BY id", (1500,)),
        local,
        key="id",
        columns="x",
        chunk_size=100,
        progress=False,
    )
    connection.close()
    assert report.rows_read == expected.rows_read == 1500
    assert report.errors == expected.errors and report.rows_failed > 0
    assert out == local


def test_a_list_of_csv_files_matches_a_local_run(ray_session: Any, tmp_path: Path) -> None:
    from servekit.batch import CSVSource

    files = []
    start = 0
    for name, n in (("b.csv", 30), ("a.csv", 250), ("c.csv", 95)):
        lines = [f"{start + i},{start + i}" for i in range(n)]
        (tmp_path / name).write_text("id,x\n" + "\n".join(lines) + "\n")
        files.append(tmp_path / name)
        start += n
    common: dict[str, Any] = {"key": "id", "columns": "x", "chunk_size": 40, "progress": False}
    local = run_batch(_models.Picky(), CSVSource(files), tmp_path / "local.jsonl", **common)
    report = run_batch(
        _models.Picky(),
        CSVSource(files),
        tmp_path / "out.jsonl",
        runner=RayRunner(partition_rows=80),
        **common,
    )
    assert (report.rows_read, report.rows_failed) == (local.rows_read, local.rows_failed)
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert report.rows_read == 375


class _Closing(_models.Picky):
    """Picky that notes every close() as a file named by the process id."""

    def __init__(self, loads_dir: str, closes_dir: str) -> None:
        super().__init__(loads_dir)
        self.closes_dir = closes_dir

    def close(self) -> None:
        Path(self.closes_dir, str(os.getpid())).touch()


def test_each_actor_closes_its_model_when_the_pool_ends(ray_session: Any, tmp_path: Path) -> None:
    import time

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import it
    loads, closes = tmp_path / "loads", tmp_path / "closes"
    loads.mkdir()
    closes.mkdir()
    out: list[dict[str, Any]] = []
    report = run_batch(
        _Closing(str(loads), str(closes)),
        list(range(400)),
        out,
        chunk_size=20,
        progress=False,
        runner=RayRunner(actors=2, partition_rows=40),
    )
    loaded = set(_models.loads(loads))
    assert len(loaded) == 2 and report.rows_read == 400
    # Ray Data ends its actors once the dataset is consumed, each actor after its
    # last task: wait for both (bounded), then every loaded model was closed once.
    deadline = time.monotonic() + 60
    while len(list(closes.iterdir())) < len(loaded) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {int(p.name) for p in closes.iterdir()} == loaded
