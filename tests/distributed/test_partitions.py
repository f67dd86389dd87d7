"""Partition planning and reading, without a cluster: every partitioning of an input
yields exactly the chunks a local read yields (rows, values, row errors, messages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.batch import CSVSource, JSONLSource, ParquetSource, open_source
from servekit.batch._partitions import ChunkStat, Tally, plan
from servekit.batch._runner import _Counts
from servekit.batch._types import Chunk, RowError


def _plain(chunk: Chunk) -> tuple[Any, ...]:
    columns = {k: np.asarray(v).tolist() for k, v in chunk.columns.items()}
    return chunk.index, chunk.start, chunk.size, columns, chunk.rows, chunk.errors


def _split(source: Any, chunk_size: int, rows: int | None, done: frozenset[int] = frozenset()):
    job = SimpleNamespace(source=source, chunk_size=chunk_size, done=done)
    reader, parts = plan(job, 2, rows)  # type: ignore[arg-type]
    parts = list(parts)
    assert reader is not None
    chunks = [c for p in parts for c in reader.read(p, chunk_size) if c.index not in p.skip]
    return parts, [_plain(c) for c in chunks]


def _local(source: Any, chunk_size: int) -> list[tuple[Any, ...]]:
    return [_plain(c) for c in source.chunks(chunk_size)]


def _csv_bytes(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = ["\ufeffid,x,note\r\n" if seed % 2 else "id,x,note\n"]
    for i in range(n):
        kind = rng.integers(0, 8)
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


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 120),
    seed=st.integers(0, 1000),
    chunk_size=st.integers(1, 9),
    rows=st.integers(1, 40),
)
def test_csv_byte_ranges_read_what_a_local_read_does(
    tmp_path_factory: pytest.TempPathFactory, n: int, seed: int, chunk_size: int, rows: int
) -> None:
    path = tmp_path_factory.mktemp("csv") / "in.csv"
    path.write_bytes(_csv_bytes(n, seed))
    parts, chunks = _split(CSVSource(path), chunk_size, rows)
    assert chunks == _local(CSVSource(path), chunk_size)
    if n and chunks:
        assert len(parts) >= min(2, len(chunks) // max(1, -(-rows // chunk_size)))


@settings(max_examples=25, deadline=None)
@given(
    lines=st.lists(
        st.sampled_from(
            [
                '{"id": 1, "x": 2}',
                '{"x": 3, "id": 4}',
                "",
                "  ",
                "{bad",
                "[1]",
                '{"id": NaN, "x": 1}',
                '{"x": 5}',
            ]
        ),
        max_size=80,
    ),
    bom=st.booleans(),
    chunk_size=st.integers(1, 7),
    rows=st.integers(1, 30),
)
def test_jsonl_byte_ranges_read_what_a_local_read_does(
    tmp_path_factory: pytest.TempPathFactory,
    lines: list[str],
    bom: bool,
    chunk_size: int,
    rows: int,
) -> None:
    path = tmp_path_factory.mktemp("jsonl") / "in.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode() + b"\n")
    _, chunks = _split(JSONLSource(path), chunk_size, rows)
    assert chunks == _local(JSONLSource(path), chunk_size)


def test_parquet_ranges_cross_row_groups_and_skip_done_chunks(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"id": np.arange(1000), "x": np.arange(1000.0)}), path, row_group_size=130
    )
    parts, chunks = _split(ParquetSource(path), 64, 200)
    assert chunks == _local(ParquetSource(path), 64)
    assert [(p.first_chunk, p.n_chunks) for p in parts] == [(0, 4), (4, 4), (8, 4), (12, 4)]
    done = frozenset(range(6))
    parts, chunks = _split(ParquetSource(path), 64, 200, done)
    assert [p.first_chunk for p in parts] == [4, 8, 12]  # partition 0 is all done
    assert [c[0] for c in chunks] == list(range(6, 16))


def test_a_csv_with_lone_carriage_returns_is_read_on_the_driver(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,x\r1,1\r2,2\r")
    job = SimpleNamespace(source=CSVSource(path), chunk_size=1, done=frozenset())
    reader, parts = plan(job, 2, None)  # type: ignore[arg-type]
    assert reader is None
    shipped = list(parts)
    assert [c.columns["id"] for p in shipped for c in p.chunks or []] == [["1"], ["2"]]


def test_in_memory_inputs_are_shipped_in_partitions_of_whole_chunks() -> None:
    source = open_source(np.arange(100.0))
    job = SimpleNamespace(source=source, chunk_size=10, done=frozenset({3}))
    reader, parts = plan(job, 2, 30)  # type: ignore[arg-type]
    parts = list(parts)
    assert reader is None
    assert [[c.index for c in p.chunks or []] for p in parts] == [[0, 1, 2], [4, 5], [6, 7, 8], [9]]


def test_a_chunk_reported_twice_counts_once() -> None:
    progress: list[Any] = []
    job = SimpleNamespace(counts=_Counts(), tracker=SimpleNamespace(update=progress.append))
    tally = Tally(job)  # type: ignore[arg-type]
    error = RowError(3, "model", "model_error", "boom")
    tally.progress(0, 10, 9, 1)
    tally.record(ChunkStat(0, 10, 9, [error]))
    tally.record(ChunkStat(0, 10, 9, [error]))  # the partition was run again
    tally.progress(0, 10, 9, 1)  # a late progress event
    tally.record(ChunkStat(1, 5, 5, []))
    tally.settle()
    c = job.counts
    assert (c.read, c.succeeded, c.failed, c.chunks) == (15, 14, 1, 2)
    assert c.by_stage == {"model": 1} and c.sample == [error]


def test_importing_servekit_batch_imports_no_cluster_library() -> None:
    code = (
        "import sys, servekit, servekit.batch; "
        "print(sorted(m for m in ('distributed', 'dask', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_worker_writes_parts_through_its_own_temporary_file(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from servekit.batch import ParquetSink
    from servekit.batch._attempts import write_part

    sink = ParquetSink(tmp_path / "out.parquet")
    sink.open({"run": 1}, resume=False, overwrite=False)
    # Another writer of the same chunk is half-way through the sink's own temporary
    # name: it must not be renamed into place.
    theirs = sink.parts_dir / "part-00000000.parquet.tmp"
    theirs.write_bytes(b"half a part")
    write_part(sink, sink.parts_dir, 0, {"id": np.arange(3)}, 3)
    write_part(sink, sink.parts_dir, 1, {"id": np.arange(0)}, 0)
    assert theirs.read_bytes() == b"half a part"
    assert pq.read_table(sink.parts_dir / "part-00000000.parquet").num_rows == 3
    assert (sink.parts_dir / "part-00000001.empty").exists()
    sink.finish()
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == [0, 1, 2]
