"""Multi-file inputs: directories, glob patterns and lists of CSV, JSON Lines and Parquet
files read as one input, locally and as a distributed run's partitions (planned and read
here, without a cluster)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import servekit as sk
from servekit.batch import CSVSource, JSONLSource, ParquetSource, open_source, run_batch
from servekit.batch._partitions import plan
from servekit.batch._types import Chunk


def _plain(chunk: Chunk) -> tuple[Any, ...]:
    columns = {k: np.asarray(v).tolist() for k, v in chunk.columns.items()}
    return chunk.index, chunk.start, chunk.size, columns, chunk.rows, chunk.errors


def _local(source: Any, chunk_size: int, start: int = 0) -> list[tuple[Any, ...]]:
    try:
        return [_plain(c) for c in source.chunks(chunk_size, start)]
    finally:
        source.close()


def _split(source: Any, chunk_size: int, rows: int | None) -> tuple[list[Any], list[Any]]:
    job = SimpleNamespace(source=source, chunk_size=chunk_size, done=frozenset())
    reader, parts = plan(job, 2, rows)  # type: ignore[arg-type]
    parts = list(parts)
    assert reader is not None
    chunks = [c for p in parts for c in reader.read(p, chunk_size)]
    return parts, [_plain(c) for c in chunks]


def _parquet(path: Path, ids: range, row_group_size: int = 1000, **extra: Any) -> Path:
    columns = {"id": np.asarray(ids, dtype=np.int64), "x": np.asarray(ids, dtype=np.float64)}
    columns.update(extra)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _csv(path: Path, ids: range, header: str = "id,x") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{i * 2}\n" for i in ids))
    return path


def _three_parquet(tmp_path: Path) -> Path:
    d = tmp_path / "pq"
    d.mkdir()
    _parquet(d / "b.parquet", range(7, 257), row_group_size=40)  # 250 rows, 7 row groups
    _parquet(d / "a.parquet", range(7))
    _parquet(d / "c.parquet", range(257, 300))
    (d / "_SUCCESS").write_text("")
    (d / ".hidden.parquet").write_bytes(b"not parquet")
    return d


# -- which files, in which order ----------------------------------------------------------


def test_a_parquet_directory_glob_and_list_read_the_same_rows_in_sorted_order(
    tmp_path: Path,
) -> None:
    d = _three_parquet(tmp_path)
    by_dir = _local(ParquetSource(d), 64)
    by_glob = _local(ParquetSource(str(d / "*.parquet")), 64)
    by_list = _local(ParquetSource([d / "c.parquet", d / "a.parquet", d / "b.parquet"]), 64)
    assert by_dir == by_glob == by_list
    ids = [i for c in by_dir for i in c[3]["id"]]
    rows = [r for c in by_dir for r in c[4]]
    assert ids == list(range(300)) and rows == list(range(300))  # global row numbers
    assert [c[2] for c in by_dir] == [64, 64, 64, 64, 44]  # chunks span the files


def test_a_resumed_parquet_read_starts_mid_file_with_the_same_chunks(tmp_path: Path) -> None:
    d = _three_parquet(tmp_path)
    full = _local(ParquetSource(d), 30)
    assert _local(ParquetSource(d), 30, start=4) == full[4:]
    assert _local(ParquetSource(d), 30, start=9) == full[9:]
    assert _local(ParquetSource(d), 30, start=10) == []


def test_run_batch_takes_a_pattern_or_a_directory_and_keys_work(tmp_path: Path) -> None:
    d = _three_parquet(tmp_path)
    out: list[dict[str, Any]] = []
    report = run_batch(
        lambda xs: [x + 1 for x in xs],
        str(d / "*.parquet"),
        out,
        key="id",
        columns="x",
        chunk_size=50,
        progress=False,
    )
    assert report.rows_read == 300 and report.status == "completed"
    assert [(r["id"], r["prediction"]) for r in out] == [(i, i + 1.0) for i in range(300)]
    rows: list[dict[str, Any]] = []
    run_batch(lambda xs: xs, d, rows, columns="x", chunk_size=64, progress=False)
    assert [r["row"] for r in rows] == list(range(300))


def test_csv_and_jsonl_directories_number_rows_across_files(tmp_path: Path) -> None:
    d = tmp_path / "csv"
    d.mkdir()
    _csv(d / "1.csv", range(5))
    _csv(d / "2.csv", range(5, 5))  # a header alone: no rows
    (d / "3.csv").write_text("")  # an empty file: no rows
    _csv(d / "4.csv", range(5, 12))
    (d / "4.csv").write_text((d / "4.csv").read_text() + "12\n13,26\n")  # a bad row
    chunks = _local(CSVSource(d), 4)
    assert [r for c in chunks for r in c[4]] == [*range(12), 13]
    assert [e.row for c in chunks for e in c[5]] == [12]
    assert [x for c in chunks for x in c[3]["x"]] == [str(i * 2) for i in [*range(12), 13]]
    assert _local(CSVSource(d), 4, start=2) == chunks[2:]

    j = tmp_path / "jsonl"
    j.mkdir()
    (j / "a.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(3)))
    (j / "b.jsonl").write_text("\n\n" + "".join(json.dumps({"id": i}) + "\n" for i in range(3, 8)))
    (j / "c.ndjson").write_text('{"other": 1}\n')  # lacks the first file's key
    chunks = _local(JSONLSource(j), 3)
    assert [i for c in chunks for i in c[3]["id"]] == list(range(8))
    assert [e.row for c in chunks for e in c[5]] == [8]
    assert _local(JSONLSource(j), 3, start=1) == chunks[1:]
    assert isinstance(open_source(j), JSONLSource)


# -- what is refused -------------------------------------------------------------------


def test_no_matching_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(sk.SourceError, match="matches none"):
        ParquetSource(str(tmp_path / "*.parquet")).describe()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(sk.SourceError, match="matches none"):
        run_batch(lambda xs: xs, str(tmp_path / "*.csv"), [], progress=False)
    with pytest.raises(sk.SourceError, match="more than once"):
        CSVSource([tmp_path / "a.csv", tmp_path / "a.csv"]).describe()
    with pytest.raises(sk.SourceError, match="no input files: the directory"):
        open_source(tmp_path)  # a directory of .txt files


def test_mixed_schemas_name_the_file_that_differs(tmp_path: Path) -> None:
    _parquet(tmp_path / "a.parquet", range(3))
    pq.write_table(pa.table({"id": [3], "x": ["text"]}), tmp_path / "b.parquet")
    with pytest.raises(sk.SourceError, match=r"b\.parquet.*does not have the schema of"):
        ParquetSource(tmp_path).chunks(10)
    pq.write_table(pa.table({"id": [3]}), tmp_path / "b.parquet")
    with pytest.raises(sk.SourceError, match=r"b\.parquet.*does not have the schema"):
        run_batch(lambda xs: xs, tmp_path, [], columns="x", progress=False)
    with pytest.raises(sk.SourceError, match=r"b\.parquet.* has no column 'x'"):
        ParquetSource(tmp_path, columns=["x"]).describe()
    assert ParquetSource(tmp_path, columns=["id"]).describe()["rows"] == 4

    _csv(tmp_path / "a.csv", range(3))
    _csv(tmp_path / "b.csv", range(3), header="id,y")
    with pytest.raises(sk.SourceError, match=r"b\.csv.*does not have the header of"):
        CSVSource([tmp_path / "a.csv", tmp_path / "b.csv"]).chunks(10)
    # With columns, each file needs only those columns (in any order).
    _csv(tmp_path / "c.csv", range(3, 5), header="x,id")
    chunks = _local(CSVSource([tmp_path / "a.csv", tmp_path / "c.csv"], columns=["id"]), 10)
    assert chunks[0][3] == {"id": ["0", "1", "2", "6", "8"]}


def test_root_confines_every_matched_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    _parquet(root / "data" / "a.parquet", range(3))
    _parquet(outside / "b.parquet", range(3, 6))
    os.symlink(outside / "b.parquet", root / "data" / "b.parquet")
    with pytest.raises(sk.UnsafePath, match=r"b\.parquet"):
        run_batch(lambda xs: xs, "data/*.parquet", [], root=root, progress=False)
    with pytest.raises(sk.UnsafePath):
        run_batch(lambda xs: xs, "data", [], root=root, progress=False)
    with pytest.raises(sk.UnsafePath):
        run_batch(lambda xs: xs, "../outside/*.parquet", [], root=root, progress=False)
    listed = ParquetSource([root / "data" / "a.parquet", outside / "b.parquet"])
    with pytest.raises(sk.UnsafePath):
        run_batch(lambda xs: xs, listed, [], root=root, progress=False)
    (root / "data" / "b.parquet").unlink()
    out: list[dict[str, Any]] = []
    run_batch(
        lambda xs: xs, "data/*.parquet", out, key="id", columns="x", root=root, progress=False
    )
    assert [r["id"] for r in out] == [0, 1, 2]


def test_resume_after_a_file_was_added_or_changed_is_refused(tmp_path: Path) -> None:
    d = _three_parquet(tmp_path)
    out = tmp_path / "out.jsonl"

    def fail_late(xs: list[float]) -> list[float]:
        if max(xs) >= 200:
            raise KeyboardInterrupt  # stops the run, as a kill would
        return xs

    with pytest.raises(KeyboardInterrupt):
        run_batch(fail_late, d, out, key="id", columns="x", chunk_size=50, progress=False)
    assert (tmp_path / "out.jsonl.parts").is_dir()
    _parquet(d / "d.parquet", range(300, 310))
    with pytest.raises(sk.ResumeMismatch, match="source"):
        run_batch(
            lambda xs: xs, d, out, key="id", columns="x", chunk_size=50, resume=True, progress=False
        )
    (d / "d.parquet").unlink()
    _parquet(d / "c.parquet", range(257, 301))  # a file changed (one more row)
    with pytest.raises(sk.ResumeMismatch, match="source"):
        run_batch(
            lambda xs: xs, d, out, key="id", columns="x", chunk_size=50, resume=True, progress=False
        )
    _parquet(d / "c.parquet", range(257, 300))
    os.utime(d / "c.parquet", ns=(0, 0))
    with pytest.raises(sk.ResumeMismatch):  # the same rows, another modification time
        run_batch(
            lambda xs: xs, d, out, key="id", columns="x", chunk_size=50, resume=True, progress=False
        )


def test_resume_over_the_same_files_finishes_with_every_row_once(tmp_path: Path) -> None:
    d = _three_parquet(tmp_path)
    out = tmp_path / "out.jsonl"

    def fail_late(xs: list[float]) -> list[float]:
        if max(xs) >= 200:
            raise KeyboardInterrupt
        return xs

    with pytest.raises(KeyboardInterrupt):
        run_batch(fail_late, d, out, key="id", columns="x", chunk_size=50, progress=False)
    report = run_batch(
        lambda xs: xs, d, out, key="id", columns="x", chunk_size=50, resume=True, progress=False
    )
    assert report.chunks_skipped == 4 and report.rows_read == 100
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == list(range(300))


# -- partitions of a distributed run (planned and read without a cluster) -----------------


@pytest.mark.parametrize("rows", [None, 64, 100, 1000])
def test_parquet_partitions_start_at_each_file_and_split_large_ones(
    tmp_path: Path, rows: int | None
) -> None:
    d = _three_parquet(tmp_path)
    source = ParquetSource(d)
    parts, chunks = _split(source, 16, rows)
    assert chunks == _local(ParquetSource(d), 16)
    firsts = [p.first_chunk for p in parts]
    assert 0 in firsts and 7 // 16 in firsts and 257 // 16 in firsts
    if rows == 64:  # the 250-row file is split into ranges of 4 chunks
        assert len(parts) > 3
    assert sum(p.n_chunks for p in parts) == len(chunks)


def _csv_text(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = ["\ufeffid,x,note\r\n" if seed % 2 else "id,x,note\n"]
    for i in range(n):
        kind = rng.integers(0, 7)
        end = "\r\n" if seed % 2 else "\n"
        if kind == 0:
            out.append(f'{i},{i},"quoted{end}newline"{end}')
        elif kind == 1:
            out.append(f"{i},{i}{end}")  # too few fields
        elif kind == 2:
            out.append(end)  # an empty line: not a row
        elif kind == 3:
            out.append(f"{i},\x00,nul{end}")
        else:
            out.append(f"{i},{i},plain é{end}")
    return "".join(out).encode("utf-8")


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    chunk_size=st.integers(1, 9),
    rows=st.sampled_from([None, 1, 7, 30]),
    seed=st.integers(0, 50),
)
def test_csv_and_jsonl_file_partitions_read_what_a_local_read_reads(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    chunk_size: int,
    rows: int | None,
    seed: int,
) -> None:
    d = tmp_path_factory.mktemp("files")
    for i, n in enumerate(sizes):
        (d / f"{i}.csv").write_bytes(_csv_text(n, seed + i))
        lines = [json.dumps({"id": k}) if k % 5 else "" for k in range(n)]
        (d / f"{i}.jsonl").write_text("\n".join(lines) + ("\n" if n % 2 else ""))
    csvs = sorted(d.glob("*.csv"))
    expected = _local(CSVSource(csvs), chunk_size)
    _, got = _split(CSVSource(csvs), chunk_size, rows)
    assert got == expected
    expected = _local(JSONLSource(str(d / "*.jsonl")), chunk_size)
    _, got = _split(JSONLSource(str(d / "*.jsonl")), chunk_size, rows)
    assert got == expected


def test_csv_files_with_a_lone_carriage_return_are_read_by_the_driver(tmp_path: Path) -> None:
    _csv(tmp_path / "a.csv", range(3))
    (tmp_path / "b.csv").write_bytes(b"id,x\n3,6\r4,8\n")
    job = SimpleNamespace(source=CSVSource(tmp_path), chunk_size=2, done=frozenset())
    reader, parts = plan(job, 2, None)  # type: ignore[arg-type]
    assert reader is None
    shipped = [c for p in parts for c in (p.chunks or [])]
    assert [_plain(c) for c in shipped] == _local(CSVSource(tmp_path), 2)
