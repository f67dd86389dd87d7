"""DaskRunner on a real LocalCluster: 2 worker processes, 1 thread each."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import _models
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import N_ROWS, write_parquet
from servekit import BatchFailed
from servekit.batch import BatchProgress, DaskRunner, run_batch


def _table(path: Path) -> dict[str, list[Any]]:
    return dict(pq.read_table(path).to_pydict())


def _same_report(a: Any, b: Any) -> None:
    for field in (
        "status",
        "rows_read",
        "rows_succeeded",
        "rows_failed",
        "chunks_written",
        "chunks_skipped",
        "failed_by_stage",
        "errors",
    ):
        assert getattr(a, field) == getattr(b, field), field


def test_parquet_to_parquet_matches_a_local_run_and_loads_once_per_worker(
    dask_client: Any, parquet_in: Path, tmp_path: Path
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
    report = run_batch(
        _models.Picky(str(loads)),
        parquet_in,
        tmp_path / "out.parquet",
        error_sink=tmp_path / "errors.jsonl",
        runner=DaskRunner(dask_client, partition_rows=300),  # 10 partitions
        **common,
    )
    _same_report(report, local)
    assert report.rows_failed == 2 + len(range(0, N_ROWS, 97)) - 0  # NaN rows and x%97==0
    assert report.failed_by_stage == {"validate": 2, "model": len(range(0, N_ROWS, 97))}
    assert _table(tmp_path / "out.parquet") == _table(tmp_path / "local.parquet")
    assert (tmp_path / "errors.jsonl").read_bytes() == (
        tmp_path / "local-errors.jsonl"
    ).read_bytes()
    assert not (tmp_path / "out.parquet.parts").exists()
    # Each worker process loaded the model once for its five-odd partitions.
    counts = _models.loads(loads)
    worker_pids = set(dask_client.run(os.getpid).values())
    assert set(counts) <= worker_pids and len(counts) >= 1
    assert all(n == 1 for n in counts.values()), counts


def test_progress_is_aggregated_on_the_calling_thread(
    dask_client: Any, parquet_in: Path, tmp_path: Path
) -> None:
    seen: list[tuple[BatchProgress, threading.Thread]] = []
    report = run_batch(
        _models.double,
        parquet_in,
        tmp_path / "out.jsonl",
        key="id",
        columns="x",
        chunk_size=250,
        runner=DaskRunner(dask_client),
        progress=lambda p: seen.append((p, threading.current_thread())),
    )
    assert report.status == "completed_with_errors"  # the two NaN rows
    assert {t for _, t in seen} == {threading.main_thread()}
    done = [p.rows_done for p, _ in seen]
    assert done == sorted(done) and done[-1] == N_ROWS
    assert seen[-1][0].chunks_written == 12 and seen[-1][0].total_rows == N_ROWS
    assert seen[-1][0].rows_failed == 2 and seen[-1][0].rows_succeeded == N_ROWS - 2


def _csv(path: Path) -> Path:
    lines = ["\ufeffid,x,note\r\n"]
    for i in range(700):
        if i == 13:
            lines.append("13,1\r\n")  # too few fields: malformed
        elif i % 50 == 7:
            lines.append(f'{i},{i},"two\r\nlines, {i}"\r\n')  # a quoted newline
        elif i == 400:
            lines.append("\r\n")  # an empty line: not a row
            lines.append(f"{i},{i},plain\r\n")
        else:
            lines.append(f"{i},{i},plain\r\n")
    path.write_bytes("".join(lines).encode("utf-8"))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_text_inputs_are_split_by_bytes_and_match_a_local_run(
    dask_client: Any, tmp_path: Path, kind: str
) -> None:
    if kind == "csv":
        src = _csv(tmp_path / "in.csv")
    else:
        src = tmp_path / "in.jsonl"
        rows = [f'{{"id": {i}, "x": {i}}}' if i % 77 else "{not json" for i in range(700)]
        rows.insert(300, "")
        src.write_text("\n".join(rows) + "\n")
    common: dict[str, Any] = {"key": "id", "columns": "x", "chunk_size": 32, "progress": False}
    local = run_batch(
        _models.Picky(),
        src,
        tmp_path / "local.jsonl",
        error_sink=tmp_path / "local-errors.jsonl",
        **common,
    )
    report = run_batch(
        _models.Picky(),
        src,
        tmp_path / "out.jsonl",
        error_sink=tmp_path / "errors.jsonl",
        runner=DaskRunner(dask_client, partition_rows=100),
        **common,
    )
    _same_report(report, local)
    assert report.failed_by_stage.get("read", 0) >= 1
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    errors = (tmp_path / "errors.jsonl").read_bytes()
    assert errors == (tmp_path / "local-errors.jsonl").read_bytes()


def test_in_memory_inputs_are_shipped_in_row_order_to_a_list(dask_client: Any) -> None:
    out: list[dict[str, Any]] = []
    report = run_batch(
        _models.double,
        list(range(1000)),
        out,
        chunk_size=30,
        progress=False,
        runner=DaskRunner(dask_client, partition_rows=90, max_in_flight=2),
    )
    assert report.status == "completed" and report.chunks_written == 34
    assert [r["row"] for r in out] == list(range(1000))
    assert [r["prediction"] for r in out] == [2 * i for i in range(1000)]
    array = np.arange(500.0)
    rows: list[dict[str, Any]] = []
    run_batch(
        _models.double, array, rows, chunk_size=64, progress=False, runner=DaskRunner(dask_client)
    )
    assert [float(r["prediction"]) for r in rows] == [2 * float(v) for v in array]


def test_a_sql_sink_is_written_by_the_driver(
    dask_client: Any, parquet_in: Path, tmp_path: Path
) -> None:
    from servekit.batch import SQLSink

    connection = sqlite3.connect(tmp_path / "out.db")
    report = run_batch(
        _models.double,
        parquet_in,
        SQLSink(connection, "scores"),
        key="id",
        columns="x",
        chunk_size=200,
        progress=False,
        runner=DaskRunner(dask_client),
    )
    assert report.rows_succeeded == N_ROWS - 2
    ids = [r[0] for r in connection.execute("SELECT id FROM scores ORDER BY id")]
    assert ids == [i * 10 for i in range(N_ROWS) if i not in (5, 1234)]
    connection.close()


def test_max_error_rate_fails_then_resume_redoes_only_unfinished_chunks(
    dask_client: Any, tmp_path: Path
) -> None:
    src = write_parquet(tmp_path / "in.parquet")
    flag = tmp_path / "broken"
    flag.touch()
    # The failing rows fail after a pause: the scheduler may start their partition
    # first, and the other worker then writes chunks of other partitions meanwhile
    # (without it, CI once saw the failure stop the run before any chunk was written).
    model = _models.FailWhile(str(flag), from_x=2500, delay_s=0.5)
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
        run_batch(model, src, out, **common)
    first = failed.value.report
    assert first is not None and first.status == "failed"
    # Stopped when the partition holding rows 2500.. failed at its first chunk, which is
    # not written; the chunks written before are kept.
    assert 0 < first.chunks_written < 30 and first.rows_failed >= 100
    assert first.failed_by_stage["model"] >= 100
    flag.unlink()
    report = run_batch(model, src, out, resume=True, **common)
    # The two NaN rows fail validation again only if their chunks are among those the
    # first run did not write: which partitions finished before the failure stopped the
    # run is the scheduler's choice (partitions are cancelled in whatever state).
    assert report.rows_failed == report.failed_by_stage.get("validate", 0) <= 2
    assert report.status == ("completed" if report.rows_failed == 0 else "completed_with_errors")
    assert report.chunks_skipped >= first.chunks_written
    assert report.chunks_skipped + report.chunks_written == 30
    assert report.rows_read == 100 * report.chunks_written
    table = _table(out)
    assert table["id"] == [i * 10 for i in range(N_ROWS) if i not in (5, 1234)]
    assert table["prediction"] == [2.0 * i for i in range(N_ROWS) if i not in (5, 1234)]


def test_a_killed_worker_is_replaced_and_every_row_is_written_once(
    dask_client: Any, tmp_path: Path
) -> None:
    src = write_parquet(tmp_path / "in.parquet", n=4000, row_group_size=400)
    out = tmp_path / "out.parquet"
    pids = dask_client.run(os.getpid)
    victim = next(iter(pids.values()))
    killed: list[int] = []

    def kill_once(p: BatchProgress) -> None:
        if not killed and p.chunks_written >= 6:
            os.kill(victim, signal.SIGKILL)  # mid-run: the other partitions are still queued
            killed.append(victim)

    report = run_batch(
        _models.Picky(delay_s=0.05),
        src,
        out,
        key="id",
        columns="x",
        chunk_size=100,
        progress=kill_once,
        runner=DaskRunner(dask_client, partition_rows=400),
    )
    assert killed == [victim]
    assert report.status == "completed_with_errors"
    assert report.rows_read == 4000 and report.chunks_written == 40
    ids = _table(out)["id"]
    expected = [i * 10 for i in range(4000) if i not in (5, 1234) and i % 97]
    assert ids == expected  # every row exactly once, in order
    dask_client.wait_for_workers(2, timeout=60)  # the nanny restarted the worker


def test_an_unpicklable_model_is_refused_with_a_clear_error(
    dask_client: Any, parquet_in: Path, tmp_path: Path
) -> None:
    lock = threading.Lock()

    def holds_a_lock(xs: list[Any]) -> list[Any]:
        with lock:
            return xs

    with pytest.raises(TypeError, match="cannot be pickled"):
        run_batch(
            holds_a_lock,
            parquet_in,
            tmp_path / "o.parquet",
            key="id",
            columns="x",
            progress=False,
            runner=DaskRunner(dask_client),
        )


def test_runner_arguments_are_checked(dask_client: Any) -> None:
    with pytest.raises(ValueError, match="partition_rows"):
        DaskRunner(dask_client, partition_rows=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        DaskRunner(dask_client, max_in_flight=True)


def _three_files(d: Path) -> Path:
    """Three Parquet files of 40, 1,700 (in row groups of 300) and 460 rows; ids and
    ``x`` run on across them (a NaN in the large file fails validation)."""
    import pyarrow as pa

    d.mkdir()
    start = 0
    for name, n in (("a.parquet", 40), ("b.parquet", 1700), ("c.parquet", 460)):
        ids = np.arange(start, start + n, dtype=np.int64)
        x = ids.astype(np.float64)
        if name == "b.parquet":
            x[100] = np.nan
        pq.write_table(pa.table({"id": ids * 10, "x": x}), d / name, row_group_size=300)
        start += n
    return d


def test_a_directory_of_files_is_split_per_file_and_by_row_groups(
    dask_client: Any, tmp_path: Path
) -> None:
    from servekit.batch import ParquetSource
    from servekit.batch._partitions import plan

    d = _three_files(tmp_path / "in")
    common: dict[str, Any] = {"key": "id", "columns": "x", "chunk_size": 100, "progress": False}
    # The plan: a partition at each file's first chunk, the large file cut in ranges.
    job = type("Job", (), {"source": ParquetSource(d), "chunk_size": 100, "done": frozenset()})
    _, parts = plan(job, 2, 400)  # type: ignore[arg-type]
    firsts = [p.first_chunk for p in parts]
    assert firsts[:2] == [0, 4] and 1740 // 100 in firsts and len(firsts) >= 5
    local = run_batch(_models.Picky(), d, tmp_path / "local.parquet", **common)
    report = run_batch(
        _models.Picky(),
        str(d / "*.parquet"),
        tmp_path / "out.parquet",
        error_sink=tmp_path / "errors.jsonl",
        runner=DaskRunner(dask_client, partition_rows=400),
        **common,
    )
    _same_report(report, local)
    out = _table(tmp_path / "out.parquet")
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    written = sorted([*out["id"], *(e["id"] for e in errors)])
    assert written == [i * 10 for i in range(2200)]  # every row exactly once
    assert [e["row"] for e in errors] == sorted(e["row"] for e in errors)
    assert out == _table(tmp_path / "local.parquet")
