"""run_batch end to end: sources to sinks through a predictor, errors, resume, jobs, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import servekit as sk
from servekit.batch import (
    BatchJob,
    BatchProgress,
    JSONLSink,
    SQLSink,
    SQLSource,
    run_batch,
)
from servekit.cli import main
from servekit.jobs import JobQueue, JobStatus, MemoryJobStore
from servekit.testing import Echo, FailOn


def double(xs: list[Any]) -> list[Any]:
    return [x * 2 for x in xs]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_batch_list_in_list_out_carries_the_row_number() -> None:
    out: list[dict[str, Any]] = []
    report = run_batch(double, [1, 2, 3], out, progress=False)
    assert report.status == "completed"
    assert (report.rows_read, report.rows_succeeded, report.rows_failed) == (3, 3, 0)
    assert out == [
        {"row": 0, "prediction": 2},
        {"row": 1, "prediction": 4},
        {"row": 2, "prediction": 6},
    ]


def test_batch_key_and_passthrough_columns_join_back(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,text,lang\na1,hello,en\na2,bonjour,fr\n")
    out = tmp_path / "out.jsonl"

    @sk.model(per_item=True)
    def length(text: str) -> int:
        return len(text)

    report = run_batch(
        length, source, out, key="id", columns="text", passthrough=["lang"], progress=False
    )
    assert report.status == "completed"
    assert read_jsonl(out) == [
        {"id": "a1", "lang": "en", "prediction": 5},
        {"id": "a2", "lang": "fr", "prediction": 7},
    ]


def test_batch_dict_rows_and_dict_outputs_become_columns(tmp_path: Path) -> None:
    rows = [{"id": i, "a": i, "b": 10 * i} for i in range(5)]

    def model(xs: list[dict[str, int]]) -> list[dict[str, int]]:
        return [{"sum": x["a"] + x["b"], "diff": x["b"] - x["a"]} for x in xs]

    out: list[dict[str, Any]] = []
    run_batch(model, rows, out, key="id", chunk_size=2, progress=False)
    assert out == [{"id": i, "sum": 11 * i, "diff": 9 * i} for i in range(5)]


def test_batch_bt02_alignment_of_100k_rows_through_parquet(tmp_path: Path) -> None:
    n = 100_000
    ids = np.arange(n, dtype=np.int64)
    x = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    table = pa.table(
        {"id": ids, "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)}
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=7_000)

    def identity(batch: list[np.ndarray]) -> list[np.ndarray]:
        return batch

    report = run_batch(
        identity,
        tmp_path / "in.parquet",
        tmp_path / "out.parquet",
        key="id",
        columns="x",
        chunk_size=4096,
        progress=False,
    )
    assert (report.rows_read, report.rows_succeeded) == (n, n)
    result = pq.read_table(tmp_path / "out.parquet")
    assert result.num_rows == n
    np.testing.assert_array_equal(result["id"].to_numpy(), ids)
    got = np.asarray(result["prediction"].combine_chunks().flatten()).reshape(n, 4)
    np.testing.assert_array_equal(got, x)


def test_batch_bt01_bad_rows_go_to_the_error_sink_once_each(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    lines = [b"id,x", b"r0,1.5", b"r1,2.5,extra", b"r2,nan", b"r3,inf", b"r4,4.0"]
    lines += [b"r5,\xff\xfe", b"r6,abc", b"r7,7.0", b"r8,13.0", b"r9,9.0"]
    source.write_bytes(b"\r\n".join(lines) + b"\r\n")

    @sk.model(per_item=True)
    def model(x: float) -> float:
        if x == 13.0:
            raise ValueError("unlucky")
        return x * 2

    errors = tmp_path / "errors.jsonl"
    report = run_batch(
        model,
        source,
        tmp_path / "out.jsonl",
        key="id",
        columns="x",
        error_sink=errors,
        chunk_size=3,
        progress=False,
    )
    assert report.status == "completed_with_errors"
    assert report.rows_read == 10
    assert report.rows_succeeded == 4
    assert report.rows_failed == 6
    outputs = read_jsonl(tmp_path / "out.jsonl")
    assert [o["id"] for o in outputs] == ["r0", "r4", "r7", "r9"]
    assert [o["prediction"] for o in outputs] == [3.0, 8.0, 14.0, 18.0]
    failed = read_jsonl(errors)
    assert [f["row"] for f in failed] == [1, 2, 3, 5, 6, 8]
    stages = {f["row"]: f["stage"] for f in failed}
    assert stages == {1: "read", 2: "validate", 3: "validate", 5: "read", 6: "validate", 8: "model"}
    assert report.failed_by_stage == {"read": 2, "validate": 3, "model": 1}
    by_row = {f["row"]: f for f in failed}
    assert by_row[8]["id"] == "r8"
    assert "unlucky" in by_row[8]["message"]


def test_batch_nan_rows_of_a_numeric_column_fail_validation() -> None:
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    x[1, 0] = np.nan
    x[4, 1] = np.inf
    out: list[dict[str, Any]] = []
    seen: list[Any] = []

    def model(batch: list[np.ndarray]) -> list[float]:
        seen.extend(batch)
        return [float(row.sum()) for row in batch]

    report = run_batch(model, x, out, chunk_size=4, progress=False)
    assert [r["row"] for r in out] == [0, 2, 3, 5]
    assert [(e.row, e.stage) for e in report.errors] == [(1, "validate"), (4, "validate")]
    assert len(seen) == 4  # the bad rows never reached the model


def test_batch_bt01_invalid_json_lines(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"x": 1}\n{"x": \n[1, 2]\n{"x": 4}\n')
    out: list[dict[str, Any]] = []
    report = run_batch(double, source, out, columns="x", progress=False)
    assert [o["prediction"] for o in out] == [2, 8]
    assert report.rows_failed == 2
    assert [e.row for e in report.errors] == [1, 2]
    assert {e.stage for e in report.errors} == {"read"}


def test_batch_max_error_rate_stops_the_run_and_resume_finishes_it(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    values = list(range(100))
    with pytest.raises(sk.BatchFailed) as info:
        run_batch(
            sk.Predictor(FailOn(set(range(20, 100)))),
            values,
            out,
            chunk_size=10,
            max_error_rate=0.2,
            progress=False,
        )
    report = info.value.report
    assert report.status == "failed"
    assert report.rows_read < 100  # stopped early
    assert not out.exists()  # nothing published
    assert (tmp_path / "out.jsonl.parts").is_dir()


def test_batch_bt06_transient_errors_are_retried_then_fail(tmp_path: Path) -> None:
    calls: dict[int, int] = {}

    @sk.model(per_item=True)
    def flaky(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if x == 1 and calls[x] <= 2:
            raise sk.RetryableError("busy")
        if x == 2:
            raise sk.RetryableError("always busy")
        return x

    out: list[dict[str, Any]] = []
    report = run_batch(flaky, [0, 1, 2, 3], out, progress=False, retries=3)
    assert [o["prediction"] for o in out] == [0, 1, 3]
    assert calls[1] == 3
    assert calls[2] == 4  # the first try and three retries
    assert calls[0] == calls[3] == 1  # rows that succeeded are not run again
    assert [(e.row, e.stage, e.code) for e in report.errors] == [(2, "model", "retryable")]


def test_batch_bt08_paths_outside_the_root_are_refused_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.jsonl").write_text('{"x": 1}\n')
    calls: list[Any] = []

    def model(xs: list[Any]) -> list[Any]:
        calls.extend(xs)
        return xs

    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    for output in ("../out.jsonl", str(tmp_path / "elsewhere.jsonl"), "link/out.jsonl"):
        with pytest.raises(sk.UnsafePath):
            run_batch(model, "in.jsonl", output, root=root, progress=False)
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "root"]
    assert list((tmp_path / "outside").iterdir()) == []
    # Inside the root, relative paths are relative to it (not to the current directory).
    run_batch(model, "in.jsonl", "out.jsonl", root=root, progress=False)
    assert read_jsonl(root / "out.jsonl") == [{"row": 0, "x": 1}]


def test_batch_bt08_an_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    calls: list[Any] = []

    def model(xs: list[Any]) -> list[Any]:
        calls.extend(xs)
        return xs

    with pytest.raises(sk.OutputExists):
        run_batch(model, [1, 2], out, progress=False)
    assert calls == []
    assert out.read_text() == "precious\n"
    run_batch(model, [1, 2], out, overwrite=True, progress=False)
    assert [r["prediction"] for r in read_jsonl(out)] == [1, 2]


def test_batch_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(sk.BatchFailed):
        run_batch(
            sk.Predictor(FailOn(set(range(5, 10)))),
            list(range(10)),
            out,
            chunk_size=5,
            max_error_rate=0.1,
            progress=False,
        )
    with pytest.raises(sk.ResumeMismatch):
        run_batch(double, list(range(10)), out, chunk_size=3, resume=True, progress=False)


def test_batch_resume_skips_finished_chunks(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(sk.BatchFailed):
        run_batch(
            sk.Predictor(FailOn(set(range(40, 50)))),
            list(range(100)),
            out,
            chunk_size=10,
            max_error_rate=0.05,
            progress=False,
        )
    seen: list[int] = []

    def model(xs: list[int]) -> list[int]:
        seen.extend(xs)
        return [x * 2 for x in xs]

    report = run_batch(model, list(range(100)), out, chunk_size=10, resume=True, progress=False)
    assert report.chunks_skipped == 4
    assert min(seen) == 40  # the first four chunks were not run again
    rows = read_jsonl(out)
    assert [r["row"] for r in rows] == list(range(100))
    # Chunks 0-3 come from the first run (FailOn echoes), the rest from the second.
    assert [r["prediction"] for r in rows] == [i if i < 40 else 2 * i for i in range(100)]


def test_batch_progress_callback_after_every_chunk() -> None:
    states: list[BatchProgress] = []
    run_batch(double, np.arange(25), [], chunk_size=10, progress=states.append)
    assert [s.rows_read for s in states] == [10, 20, 25]
    assert [s.chunks_written for s in states] == [1, 2, 3]
    assert states[-1].total_rows == 25
    assert states[-1].fraction == 1.0


def test_batch_concurrency_keeps_the_order() -> None:
    out: list[dict[str, Any]] = []

    def slow(xs: list[int]) -> list[int]:
        time.sleep(0.01 * (xs[0] % 3))
        return xs

    run_batch(slow, list(range(200)), out, chunk_size=7, concurrency=4, progress=False)
    assert [r["prediction"] for r in out] == list(range(200))


def test_batch_processes_back_end(tmp_path: Path) -> None:
    with sk.Predictor(Echo(), backend=sk.Processes(2)) as predictor:
        out: list[dict[str, Any]] = []
        report = run_batch(predictor, list(range(50)), out, chunk_size=8, progress=False)
    assert report.rows_succeeded == 50
    assert [r["prediction"] for r in out] == list(range(50))


def test_batch_sqlite_source_into_duckdb_warehouse(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    db = sqlite3.connect(tmp_path / "app.db")
    db.execute("CREATE TABLE events (id INTEGER, value REAL)")
    db.executemany("INSERT INTO events VALUES (?, ?)", [(i, i / 2) for i in range(30)])
    db.commit()
    warehouse = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    try:
        report = run_batch(
            double,
            SQLSource(db, "SELECT id, value FROM events ORDER BY id"),
            SQLSink(warehouse, "scores"),
            key="id",
            columns="value",
            chunk_size=8,
            progress=False,
        )
        assert report.rows_succeeded == 30
        rows = warehouse.execute("SELECT id, prediction FROM scores ORDER BY id").fetchall()
        assert rows == [(i, float(i)) for i in range(30)]
    finally:
        warehouse.close()
        db.close()


def test_batch_job_runs_a_batch_as_a_job_with_progress(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}, "x": {i}}}\n' for i in range(50)))
    with JobQueue(BatchJob(double, root=tmp_path), store=MemoryJobStore()) as jobs:
        job = jobs.submit(
            {
                "input": "in.jsonl",
                "output": "out.csv",
                "key": ["id"],
                "columns": "x",
                "chunk_size": 10,
            }
        )
        done = jobs.wait(job.id, timeout_s=30)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.result["rows_succeeded"] == 50
        assert done.progress == 1.0
        with pytest.raises(sk.InvalidInput):
            jobs.submit({"input": "in.jsonl"})  # no output
        escape = jobs.wait(
            jobs.submit({"input": "in.jsonl", "output": "../x.csv"}).id, timeout_s=30
        )
        assert escape.status is JobStatus.FAILED
        assert escape.error is not None
        assert escape.error["code"] == "unsafe_path"
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["prediction"]) for r in rows] == [2 * i for i in range(50)]


def test_batch_cli_scores_a_csv_into_parquet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "scoring.py").write_text("def score(xs):\n    return [float(x) * 10 for x in xs]\n")
    (tmp_path / "in.csv").write_text("id,x\n1,0.5\n2,oops\n3,1.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["batch", "run", "--model", "scoring:score", "--input", "in.csv"]
    args += ["--output", "out.parquet", "--key", "id", "--columns", "x"]
    args += ["--errors", "errors.jsonl", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "completed_with_errors" in printed
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert table == [{"id": "1", "prediction": 5.0}, {"id": "3", "prediction": 15.0}]
    assert [e["row"] for e in read_jsonl(tmp_path / "errors.jsonl")] == [1]
    assert main(args) == 1  # the output exists now: refused, one line on stderr
    assert "overwrite" in capsys.readouterr().err


# --- BT-03: a real kill -9 at about half, then resume -----------------------------------

_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from servekit.batch import run_batch

    log = open(sys.argv[3], "a")

    def model(xs):
        for x in xs:
            log.write(f"{x}\\n")
        log.flush()
        os.fsync(log.fileno())
        time.sleep(0.02)
        return [x * 3 for x in xs]

    run_batch(model, sys.argv[1], sys.argv[2], key="id", columns="x", chunk_size=50,
              resume=sys.argv[4] == "resume", progress=False)
    """
)


def test_batch_bt03_sigkill_at_half_then_resume_gives_every_row_once(tmp_path: Path) -> None:
    n = 5000
    pq.write_table(
        pa.table({"id": np.arange(n), "x": np.arange(n, dtype=np.int64)}),
        tmp_path / "in.parquet",
        row_group_size=777,
    )
    out = tmp_path / "out.parquet"
    log = tmp_path / "executed.log"
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    parts = tmp_path / "out.parquet.parts"
    command = [sys.executable, str(script), str(tmp_path / "in.parquet"), str(out), str(log)]
    proc = subprocess.Popen([*command, "fresh"], stderr=subprocess.PIPE)
    chunks = n // 50
    deadline = time.monotonic() + 60
    while len(list(parts.glob("part-*"))) < chunks // 2:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    written = len(list(parts.glob("part-*")))
    assert 0 < written < chunks
    assert not out.exists()
    executed_before = len(log.read_text().splitlines())

    resumed = subprocess.run([*command, "resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    table = pq.read_table(out)
    assert table.num_rows == n
    assert table["id"].to_pylist() == list(range(n))  # every row exactly once, in order
    assert table["prediction"].to_pylist() == [3 * i for i in range(n)]
    assert not parts.exists()
    executed = [int(x) for x in log.read_text().splitlines()]
    rerun = len(executed) - n
    # Rows run twice: only those of chunks that were in flight at the kill (the chunk
    # in the model and at most one read ahead), never those of written chunks.
    assert 0 <= rerun <= 2 * 50, rerun
    assert executed_before >= written * 50


def test_batch_bt04_a_reader_never_sees_a_partial_output(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                text = out.read_text()
            except FileNotFoundError:
                continue
            seen.append(len(text.splitlines()))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        run_batch(double, list(range(2000)), JSONLSink(out), chunk_size=20, progress=False)
    finally:
        stop.set()
        thread.join()
    assert set(seen) <= {2000}


def test_batch_public_names_are_sorted_documented_and_light() -> None:
    import doctest
    import inspect

    import servekit.batch

    assert servekit.batch.__all__ == sorted(servekit.batch.__all__)
    for name in servekit.batch.__all__:
        obj = getattr(servekit.batch, name)
        assert inspect.getdoc(obj), name
        if isinstance(obj, type):
            for member, value in vars(obj).items():
                if not member.startswith("_") and (
                    inspect.isfunction(value) or isinstance(value, property)
                ):
                    assert inspect.getdoc(value), f"{name}.{member}"
    assert doctest.testmod(servekit.batch).failed == 0
    code = (
        "import sys, servekit.batch; "
        "print(sorted(m for m in ('pyarrow', 'pandas', 'duckdb', 'tqdm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_batch_progress_bar_in_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from servekit.batch import _runner

    monkeypatch.setattr(_runner, "_interactive", lambda: True)
    run_batch(double, np.arange(30), [], chunk_size=10)
    err = capsys.readouterr().err
    assert "servekit batch" in err
    assert "30/30" in err
    monkeypatch.setattr(_runner, "_interactive", lambda: False)
    run_batch(double, np.arange(30), [], chunk_size=10)
    assert capsys.readouterr().err == ""
