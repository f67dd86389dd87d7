"""SQL key ranges: an SQLSource with connect= and partition_key= is read by the workers,
each partition through its own connection and its own key range."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _models
import pyarrow.parquet as pq
import pytest

from servekit import BatchFailed, SourceError
from servekit.batch import DaskRunner, SQLSource, run_batch
from servekit.batch._partitions import plan
from servekit.batch._sqlranges import SQLRangeReader

N = 5000


def _key(i: int) -> int:
    """Integer keys with gaps (uneven ones, and a big jump in the middle)."""
    return 5 * i + (i % 3) * 2 + (1_000_000 if i >= 2500 else 0)


def _database(path: Path, text_keys: bool = False) -> Path:
    con = sqlite3.connect(path)
    kind = "TEXT" if text_keys else "INTEGER"
    con.execute(f"CREATE TABLE items (id {kind} PRIMARY KEY, x REAL, grp INTEGER)")
    rows = [(f"k'{_key(i):08d}" if text_keys else _key(i), float(i), i % 3) for i in range(N)]
    con.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


def _source(db: Path, query: str, params: tuple[Any, ...] = ()) -> SQLSource:
    return SQLSource(
        query=query,
        params=params,
        connect=functools.partial(sqlite3.connect, str(db)),
        partition_key="id",
    )


def _table(path: Path) -> dict[str, list[Any]]:
    return dict(pq.read_table(path).to_pydict())


QUERY = "SELECT id, x FROM items WHERE grp != ? ORDER BY id"


def test_the_plan_cuts_at_chunk_boundaries_and_binds_the_bounds(tmp_path: Path) -> None:
    db = _database(tmp_path / "in.db")
    source = _source(db, "SELECT id, x FROM items")
    job: Any = SimpleNamespace(source=source, chunk_size=100, done=frozenset({0, 1, 7}))
    reader, parts = plan(job, 2, 800)  # (only these fields of a RunnerJob are read)
    assert isinstance(reader, SQLRangeReader)
    planned = list(parts)
    keys = [_key(i) for i in range(N)]
    assert [p.first_chunk for p in planned] == list(range(0, 50, 8))
    assert planned[0].low is None and planned[-1].high is None
    for p in planned[1:]:
        assert p.low == keys[p.first_chunk * 100]
    for p in planned[:-1]:
        assert p.high == keys[(p.first_chunk + p.n_chunks) * 100]
    assert sum(p.n_rows for p in planned) == N
    assert planned[0].skip == frozenset({0, 1, 7})
    source.close()


def test_nulls_and_repeated_keys_are_refused(tmp_path: Path) -> None:
    db = _database(tmp_path / "in.db")
    job: Any = SimpleNamespace(chunk_size=100, done=frozenset())
    job.source = SQLSource(
        query="SELECT grp AS id, x FROM items",
        connect=functools.partial(sqlite3.connect, str(db)),
        partition_key="id",
    )
    with pytest.raises(SourceError, match="repeats the value"):
        list(plan(job, 2, None)[1])
    job.source.close()
    job.source = SQLSource(
        query="SELECT NULLIF(id, 7) AS id, x FROM items",
        connect=functools.partial(sqlite3.connect, str(db)),
        partition_key="id",
    )
    with pytest.raises(SourceError, match="NULL"):
        list(plan(job, 2, None)[1])
    job.source.close()


def test_arguments_are_checked() -> None:
    connect = functools.partial(sqlite3.connect, ":memory:")
    with pytest.raises(SourceError, match="go together"):
        SQLSource(query="SELECT 1", connect=connect)
    with pytest.raises(SourceError, match="mapping"):
        SQLSource(query="SELECT :a", params={"a": 1}, connect=connect, partition_key="a")
    with pytest.raises(SourceError, match="no connection"):
        SQLSource(query="SELECT 1").chunks(10)


def test_a_local_run_reads_in_key_order_through_its_own_connection(tmp_path: Path) -> None:
    db = _database(tmp_path / "in.db")
    out: list[dict[str, Any]] = []
    # No ORDER BY in the query: the key orders the rows.
    source = _source(db, "SELECT id, x FROM items ORDER BY x DESC")
    report = run_batch(
        _models.double, source, out, key="id", columns="x", chunk_size=256, progress=False
    )
    assert report.rows_succeeded == N
    assert [r["id"] for r in out] == [_key(i) for i in range(N)]
    assert source._own_connection is None  # closed at the end of the run


def test_key_ranges_on_dask_match_a_local_run(dask_client: Any, tmp_path: Path) -> None:
    db = _database(tmp_path / "in.db")
    common: dict[str, Any] = {"key": "id", "columns": "x", "chunk_size": 100, "progress": False}
    local = run_batch(
        _models.Picky(),
        SQLSource(sqlite3.connect(db), QUERY, (1,)),
        tmp_path / "local.parquet",
        error_sink=tmp_path / "local-errors.jsonl",
        **common,
    )
    report = run_batch(
        _models.Picky(),
        _source(db, QUERY, (1,)),
        tmp_path / "out.parquet",
        error_sink=tmp_path / "errors.jsonl",
        runner=DaskRunner(dask_client, partition_rows=700),
        **common,
    )
    for field in ("status", "rows_read", "rows_succeeded", "rows_failed", "chunks_written"):
        assert getattr(report, field) == getattr(local, field), field
    assert report.errors == local.errors and report.failed_by_stage == local.failed_by_stage
    assert report.rows_failed > 0  # Picky fails x % 97 == 0
    assert _table(tmp_path / "out.parquet") == _table(tmp_path / "local.parquet")
    errors = (tmp_path / "errors.jsonl").read_text()
    assert errors == (tmp_path / "local-errors.jsonl").read_text()


def test_text_keys_with_quotes_are_bound(dask_client: Any, tmp_path: Path) -> None:
    db = _database(tmp_path / "in.db", text_keys=True)
    out: list[dict[str, Any]] = []
    report = run_batch(
        _models.double,
        _source(db, "SELECT id, x FROM items WHERE id >= ?", ("k'",)),
        out,
        key="id",
        columns="x",
        chunk_size=128,
        progress=False,
        runner=DaskRunner(dask_client, partition_rows=1000),
    )
    assert report.rows_succeeded == N
    assert [r["id"] for r in out] == sorted(f"k'{_key(i):08d}" for i in range(N))
    assert [r["prediction"] for r in out] == [2.0 * i for i in range(N)]


def test_a_resume_after_a_failure_redoes_only_unfinished_chunks(
    dask_client: Any, tmp_path: Path
) -> None:
    db = _database(tmp_path / "in.db")
    flag = tmp_path / "broken"
    flag.touch()
    model = _models.FailWhile(str(flag), from_x=4000)
    out = tmp_path / "out.parquet"
    common: dict[str, Any] = {
        "key": "id",
        "columns": "x",
        "chunk_size": 100,
        "progress": False,
        "max_error_rate": 0.5,
        "runner": DaskRunner(dask_client, partition_rows=500),
    }
    with pytest.raises(BatchFailed) as failed:
        run_batch(model, _source(db, "SELECT id, x FROM items"), out, **common)
    first = failed.value.report
    assert first is not None and first.status == "failed"
    assert 0 < first.chunks_written < 50
    flag.unlink()
    report = run_batch(model, _source(db, "SELECT id, x FROM items"), out, resume=True, **common)
    assert report.status == "completed"
    assert report.chunks_skipped >= first.chunks_written
    assert report.chunks_skipped + report.chunks_written == 50
    assert report.rows_read == 100 * report.chunks_written
    table = _table(out)
    assert table["id"] == [_key(i) for i in range(N)]
    assert table["prediction"] == [2.0 * i for i in range(N)]


def test_rows_added_after_the_plan_fail_the_partition(tmp_path: Path) -> None:
    from servekit.batch._partitions import Partition

    db = _database(tmp_path / "in.db")
    reader = SQLRangeReader(
        functools.partial(sqlite3.connect, str(db)), "SELECT * FROM items", [], "id"
    )
    assert len(list(reader.read(Partition(0, 0, 3, high=_key(300), n_rows=300), 100))) == 3
    with pytest.raises(SourceError, match="more rows than"):
        list(reader.read(Partition(0, 0, 2, high=_key(300), n_rows=200), 100))
    with pytest.raises(SourceError, match="fewer"):
        list(reader.read(Partition(0, 0, 4, high=_key(300), n_rows=400), 100))


def test_duckdb_key_ranges_on_dask_match_a_local_run(dask_client: Any, tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    path = str(tmp_path / "in.duckdb")
    con = duckdb.connect(path)
    con.execute("CREATE TABLE items (id BIGINT, x DOUBLE)")
    con.executemany("INSERT INTO items VALUES (?, ?)", [(_key(i), float(i)) for i in range(N)])
    con.close()
    # duckdb.connect cannot be pickled: refused before any work, with the way out.
    unpicklable = functools.partial(duckdb.connect, path, read_only=True)
    with pytest.raises(TypeError, match="module level"):
        run_batch(
            _models.double,
            SQLSource(query="SELECT id, x FROM items", connect=unpicklable, partition_key="id"),
            [],
            columns="x",
            progress=False,
            runner=DaskRunner(dask_client),
        )
    # Read-only: several processes may open a DuckDB file at once only so.
    connect = functools.partial(_models.duckdb_read_only, path)
    query = "SELECT id, x FROM items WHERE x >= ?"
    out: list[dict[str, Any]] = []
    report = run_batch(
        _models.Picky(),
        SQLSource(query=query, params=(10.0,), connect=connect, partition_key="id"),
        out,
        key="id",
        columns="x",
        chunk_size=100,
        progress=False,
        runner=DaskRunner(dask_client, partition_rows=600),
    )
    local: list[dict[str, Any]] = []
    connection = connect()
    expected = run_batch(
        _models.Picky(),
        SQLSource(connection, query + " ORDER BY id", (10.0,)),
        local,
        key="id",
        columns="x",
        chunk_size=100,
        progress=False,
    )
    connection.close()
    assert report.rows_read == expected.rows_read == N - 10
    assert report.errors == expected.errors and report.rows_failed > 0
    assert out == local
