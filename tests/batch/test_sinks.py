"""Batch sinks: file parts, atomic publish, resume, SQL transactions, in-memory sinks."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from servekit.batch._filesinks import CSVSink, JSONLSink, ParquetSink
from servekit.batch._sinks import CallableSink, ListSink, columns_to_rows, open_sink
from servekit.batch._sqlsink import SQLSink
from servekit.batch._types import Sink
from servekit.errors import OutputExists, ResumeMismatch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
duckdb = pytest.importorskip("duckdb")

MANIFEST: dict[str, Any] = {"chunk_size": 2, "source": {"kind": "list", "n": 10}}

FILE_SINKS = [JSONLSink, CSVSink, ParquetSink]
EXT: dict[type, str] = {JSONLSink: "jsonl", CSVSink: "csv", ParquetSink: "parquet"}


class Point(BaseModel):
    x: int
    label: str


def _chunk(i: int, n: int = 2) -> tuple[dict[str, Any], int]:
    """Chunk ``i``: ``n`` rows with ids ``i*n ..``, a float and a 3-vector column."""
    ids = list(range(i * n, i * n + n))
    return {
        "id": ids,
        "score": np.array([x / 2 for x in ids], dtype=np.float64),
        "vec": np.arange(n * 3, dtype=np.float32).reshape(n, 3) + i,
    }, n


def _read(path: Path) -> list[dict[str, Any]]:
    """The published output as row dicts (format by suffix)."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    return pq.read_table(path).to_pylist()  # type: ignore[no-any-return]


def _sink_path(tmp_path: Path, cls: type) -> Path:
    return tmp_path / f"out.{EXT[cls]}"


# --------------------------------------------------------------------------- round trips


def test_sink_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JSONLSink(path)
    assert sink.open(MANIFEST, resume=False, overwrite=False) == set()
    sink.write_chunk(
        0,
        {
            "a": [1, None, 3],
            "f": np.array([1.5, np.nan, np.inf]),
            "v": np.ones((3, 2), dtype=np.float32),
            "s": ["x", 'q"uo,te', "new\nline"],
            "d": [{"k": np.int64(1)}, [1, 2], Point(x=1, label="p")],
            "n": [np.float32(0.5), np.int8(-2), np.bool_(True)],
            "arr": [np.array([1, 2]), np.array([np.nan]), None],
        },
        3,
    )
    sink.finish()
    rows = _read(path)
    assert rows == [
        {
            "a": 1,
            "f": 1.5,
            "v": [1.0, 1.0],
            "s": "x",
            "d": {"k": 1},
            "n": 0.5,
            "arr": [1, 2],
        },
        {
            "a": None,
            "f": None,
            "v": [1.0, 1.0],
            "s": 'q"uo,te',
            "d": [1, 2],
            "n": -2,
            "arr": [None],
        },
        {
            "a": 3,
            "f": None,
            "v": [1.0, 1.0],
            "s": "new\nline",
            "d": {"x": 1, "label": "p"},
            "n": True,
            "arr": None,
        },
    ]
    assert list(rows[0]) == ["a", "f", "v", "s", "d", "n", "arr"]
    assert not sink.parts_dir.exists()


def test_sink_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    sink = CSVSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(
        0,
        {
            "s": ["plain", 'a "quoted", comma', "multi\nline"],
            "x": [None, 0.1, np.float32(2.5)],
            "i": np.array([1, 2, 3]),
            "b": [True, False, None],
            "j": [{"k": [1, 2]}, [1.5], np.array([1.0, 2.0])],
            "nan": [float("nan"), 1e100, -0.0],
        },
        3,
    )
    sink.write_chunk(1, {"s": ["z"], "x": [1], "i": [4], "b": [True], "j": [None], "nan": [1]}, 1)
    sink.finish()
    rows = _read(path)
    assert rows == [
        {"s": "plain", "x": "", "i": "1", "b": "true", "j": '{"k":[1,2]}', "nan": ""},
        {
            "s": 'a "quoted", comma',
            "x": "0.1",
            "i": "2",
            "b": "false",
            "j": "[1.5]",
            "nan": "1e+100",
        },
        {"s": "multi\nline", "x": "2.5", "i": "3", "b": "", "j": "[1.0,2.0]", "nan": "-0.0"},
        {"s": "z", "x": "1", "i": "4", "b": "true", "j": "", "nan": "1"},
    ]
    # only one header row in the published file
    assert path.read_text(encoding="utf-8").count("s,x,i,b,j,nan") == 1


def test_sink_csv_parts_with_different_columns_refused(tmp_path: Path) -> None:
    sink = CSVSink(tmp_path / "out.csv")
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, {"a": [1]}, 1)
    sink.write_chunk(1, {"b": [1]}, 1)
    with pytest.raises(ValueError, match=r"different columns.*\['a'\].*\['b'\]"):
        sink.finish()
    assert not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "out.csv.tmp").exists()


def test_sink_parquet_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    sink = ParquetSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    emb = np.random.default_rng(0).random((4, 16), dtype=np.float32)
    sink.write_chunk(
        0,
        {
            "id": np.arange(4),
            "emb": emb,
            "stacked": [np.full(2, k, dtype=np.float64) for k in range(4)],
            "name": ["a", None, 'c,"d"', "e"],
            "d": [{"k": 1}, {"k": 2}, None, {"k": np.int64(4)}],
            "lst": [[1, 2], [], None, [3]],
            "model": [Point(x=k, label="p") for k in range(4)],
        },
        4,
    )
    sink.finish()
    table = pq.read_table(path)
    assert table.schema.field("emb").type == pa.list_(pa.float32(), 16)
    assert table.schema.field("stacked").type == pa.list_(pa.float64(), 2)
    assert table.schema.field("d").type == pa.struct([("k", pa.int64())])
    got = np.array(table.column("emb").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(got, emb)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert [r["name"] for r in rows] == ["a", None, 'c,"d"', "e"]
    assert rows[2]["d"] is None and rows[3]["d"] == {"k": 4}
    assert [r["lst"] for r in rows] == [[1, 2], [], None, [3]]
    assert rows[1]["model"] == {"x": 1, "label": "p"}
    assert rows[1]["stacked"] == [1.0, 1.0]


def test_sink_parquet_unifies_null_and_promoted_parts(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    sink = ParquetSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, {"a": [None, None], "b": [1, 2]}, 2)  # a: null type
    sink.write_chunk(1, {"a": ["x", None], "b": [1.5, None]}, 2)  # b: int -> double
    sink.finish()
    table = pq.read_table(path)
    assert table.schema.field("a").type == pa.string()
    assert table.schema.field("b").type == pa.float64()
    assert table.to_pydict() == {"a": [None, None, "x", None], "b": [1.0, 2.0, 1.5, None]}


def test_sink_parquet_different_columns_refused(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path / "out.parquet")
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, {"a": [1]}, 1)
    sink.write_chunk(1, {"b": [1]}, 1)
    with pytest.raises(ValueError, match="different columns"):
        sink.finish()


@pytest.mark.parametrize("cls", FILE_SINKS)
def test_sink_out_of_order_chunks_assembled_in_index_order(tmp_path: Path, cls: type) -> None:
    path = _sink_path(tmp_path, cls)
    sink = cls(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    for i in [3, 0, 4, 2, 1]:
        sink.write_chunk(i, *_chunk(i))
    sink.write_chunk(2, *_chunk(2))  # a redone chunk replaces its part
    sink.finish()
    rows = _read(path)
    assert [int(r["id"]) for r in rows] == list(range(10))
    if cls is ParquetSink:
        assert rows[9]["vec"] == [4.0 + 3, 4.0 + 4, 4.0 + 5]


@pytest.mark.parametrize("cls", FILE_SINKS)
def test_sink_all_empty_run(tmp_path: Path, cls: type) -> None:
    path = _sink_path(tmp_path, cls)
    sink = cls(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, {}, 0)
    sink.write_chunk(1, {"a": []}, 0)
    assert (sink.parts_dir / "part-00000000.empty").exists()
    sink.finish()
    if cls is ParquetSink:
        assert pq.read_table(path).num_rows == 0
    else:
        assert path.read_bytes() == b""


@pytest.mark.parametrize("cls", [CSVSink, ParquetSink])
def test_sink_all_empty_run_with_output_columns(tmp_path: Path, cls: type) -> None:
    path = _sink_path(tmp_path, cls)
    sink = cls(path)
    sink.open({**MANIFEST, "output_columns": ["id", "pred"]}, resume=False, overwrite=False)
    sink.write_chunk(0, {}, 0)
    sink.finish()
    if cls is CSVSink:
        assert path.read_bytes() == b"id,pred\n"
    else:
        table = pq.read_table(path)
        assert table.num_rows == 0 and table.column_names == ["id", "pred"]


def test_sink_empty_chunk_between_rows(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    sink = CSVSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, {"a": [1]}, 1)
    sink.write_chunk(1, {"a": []}, 0)
    sink.write_chunk(2, {"a": [3]}, 1)
    sink.finish()
    assert path.read_text() == "a\n1\n3\n"


def test_sink_write_chunk_checks_lengths(tmp_path: Path) -> None:
    sink = JSONLSink(tmp_path / "out.jsonl")
    sink.open(MANIFEST, resume=False, overwrite=False)
    with pytest.raises(ValueError, match="'a' has 1 values for 2 rows"):
        sink.write_chunk(0, {"a": [1]}, 2)


def test_sink_write_before_open_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        JSONLSink(tmp_path / "out.jsonl").write_chunk(0, {"a": [1]}, 1)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("cls", FILE_SINKS)
def test_sink_resume_returns_finished_chunks(tmp_path: Path, cls: type) -> None:
    path = _sink_path(tmp_path, cls)
    sink = cls(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    for i in (0, 1, 3):
        sink.write_chunk(i, *_chunk(i))
    sink.write_chunk(4, {"id": []}, 0)  # an empty marker counts as done
    sink.close()
    stray = sink.parts_dir / f"part-00000002.{EXT[cls]}.tmp"
    stray.write_bytes(b"half a chunk")
    assert not path.exists()

    again = cls(path)
    assert again.open(MANIFEST, resume=True, overwrite=False) == {0, 1, 3, 4}
    assert not stray.exists()
    again.write_chunk(2, *_chunk(2))
    again.finish()
    assert [int(r["id"]) for r in _read(path)] == list(range(8))


def test_sink_resume_manifest_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JSONLSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, *_chunk(0))
    sink.close()
    other = {**MANIFEST, "chunk_size": 3, "extra": 1}
    with pytest.raises(ResumeMismatch, match="chunk_size, extra"):
        JSONLSink(path).open(other, resume=True, overwrite=False)
    # a tuple reads back as a list: no false mismatch
    assert JSONLSink(path).open(dict(MANIFEST), resume=True, overwrite=False) == {0}


def test_sink_resume_with_nothing_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.jsonl"
    sink = JSONLSink(path)
    assert sink.open(MANIFEST, resume=True, overwrite=False) == set()
    assert (sink.parts_dir / "manifest.json").is_file()


def test_sink_resume_after_finish_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JSONLSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, *_chunk(0))
    sink.finish()
    with pytest.raises(OutputExists, match=r"already finished.*overwrite=True"):
        JSONLSink(path).open(MANIFEST, resume=True, overwrite=False)
    assert JSONLSink(path).open(MANIFEST, resume=True, overwrite=True) == set()


# --------------------------------------------------------------------------- overwrite


@pytest.mark.parametrize("cls", FILE_SINKS)
def test_sink_existing_output_refused_then_overwritten(tmp_path: Path, cls: type) -> None:
    path = _sink_path(tmp_path, cls)
    first = cls(path)
    first.open(MANIFEST, resume=False, overwrite=False)
    first.write_chunk(0, *_chunk(0))
    first.finish()
    old = _read(path)

    with pytest.raises(OutputExists):
        cls(path).open(MANIFEST, resume=False, overwrite=False)
    sink = cls(path)
    sink.open(MANIFEST, resume=False, overwrite=True)
    sink.write_chunk(0, *_chunk(1))
    sink.write_chunk(1, *_chunk(2))
    assert _read(path) == old  # BT-04: the old output stays until the new one is published
    sink.finish()
    assert [int(r["id"]) for r in _read(path)] == [2, 3, 4, 5]


def test_sink_existing_parts_dir_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JSONLSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, *_chunk(0))
    sink.close()
    with pytest.raises(OutputExists, match="parts directory"):
        JSONLSink(path).open(MANIFEST, resume=False, overwrite=False)
    fresh = JSONLSink(path)
    assert fresh.open(MANIFEST, resume=False, overwrite=True) == set()
    assert not (fresh.parts_dir / "part-00000000.jsonl").exists()


def test_sink_stale_output_tmp_removed(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    stale = tmp_path / "out.jsonl.tmp"
    stale.write_text("half a finish")
    sink = JSONLSink(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    assert not stale.exists()
    sink.write_chunk(0, {"a": [1]}, 1)
    sink.finish()
    assert path.read_text() == '{"a":1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_sink_output_directory_refused(tmp_path: Path) -> None:
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(OutputExists, match="is a directory"):
        JSONLSink(tmp_path / "out.jsonl").open(MANIFEST, resume=False, overwrite=True)
    assert (tmp_path / "out.jsonl").is_dir()


@pytest.mark.parametrize("cls", FILE_SINKS)
def test_sink_concurrent_reader_never_sees_partial_output(tmp_path: Path, cls: type) -> None:
    path = _sink_path(tmp_path, cls)
    sink = cls(path)
    sink.open(MANIFEST, resume=False, overwrite=False)
    n_chunks, rows_per_chunk = 50, 20
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                rows = _read(path)
            except FileNotFoundError:
                seen.append(-1)
                continue
            except BaseException as exc:  # an unparsable file fails the test
                errors.append(exc)
                return
            seen.append(len(rows))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(n_chunks):
            sink.write_chunk(i, *_chunk(i, rows_per_chunk))
        sink.finish()
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert seen and set(seen) <= {-1, n_chunks * rows_per_chunk}
    assert len(_read(path)) == n_chunks * rows_per_chunk


# --------------------------------------------------------------------------- SQL


def _connect(kind: str, tmp_path: Path) -> Any:
    if kind == "sqlite":
        return sqlite3.connect(tmp_path / "db.sqlite")
    return duckdb.connect(str(tmp_path / "db.duckdb"))


def _select(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    return list(conn.execute(sql).fetchall())


def _table_exists(conn: Any, table: str) -> bool:
    try:
        _select(conn, f'SELECT * FROM "{table}"')
    except Exception:
        return False
    return True


@pytest.fixture(params=["sqlite", "duckdb"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    conn = _connect(request.param, tmp_path)
    yield conn
    conn.close()


def test_sink_sql_round_trip_published_at_finish(db: Any, tmp_path: Path) -> None:
    sink = SQLSink(db, "preds")
    assert sink.open(MANIFEST, resume=False, overwrite=False) == set()
    sink.write_chunk(
        1,
        {
            "id": [2, 3],
            "score": np.array([0.5, np.nan]),
            "ok": [True, None],
            "name": ["b", "it's"],
            "vec": np.ones((2, 2), dtype=np.float32),
            "meta": [{"k": 1}, None],
        },
        2,
    )
    sink.write_chunk(
        0,
        {
            "id": np.array([0, 1]),
            "score": [np.float32(1.5), 2.0],
            "ok": [np.bool_(False), True],
            "name": [None, "a"],
            "vec": [np.zeros(2), np.zeros(2)],
            "meta": [[1], Point(x=1, label="q")],
        },
        2,
    )
    sink.write_chunk(2, {}, 0)
    assert not _table_exists(db, "preds")  # BT-04: nothing visible before finish
    sink.finish()
    rows = _select(db, 'SELECT id, score, ok, name, vec, meta FROM "preds" ORDER BY id')
    assert [r[:4] for r in rows] == [
        (0, 1.5, False, None),
        (1, 2.0, True, "a"),
        (2, 0.5, True, "b"),
        (3, None, None, "it's"),
    ]
    assert json.loads(rows[0][4]) == [0.0, 0.0] and json.loads(rows[2][4]) == [1.0, 1.0]
    assert [r[5] for r in rows] == ["[1]", '{"x":1,"label":"q"}', '{"k":1}', None]
    columns = [d[0] for d in db.execute('SELECT * FROM "preds"').description]
    assert "_servekit_chunk" not in columns
    assert _select(db, "SELECT * FROM servekit_batch_chunks") == []
    assert _select(db, "SELECT * FROM servekit_batch_runs") == []
    assert not _table_exists(db, "preds__servekit_staging")


def test_sink_sql_visible_only_after_finish_to_other_connection(tmp_path: Path) -> None:
    writer = sqlite3.connect(tmp_path / "db.sqlite")
    reader = sqlite3.connect(tmp_path / "db.sqlite")
    try:
        sink = SQLSink(writer, "t")
        sink.open(MANIFEST, resume=False, overwrite=False)
        for i in range(5):
            sink.write_chunk(i, *_chunk(i))
            assert not _table_exists(reader, "t")
        sink.finish()
        assert reader.execute('SELECT count(*) FROM "t"').fetchone() == (10,)
    finally:
        writer.close()
        reader.close()


def test_sink_sql_resume_after_crash(db: Any, tmp_path: Path) -> None:
    sink = SQLSink(db, "t")
    sink.open(MANIFEST, resume=False, overwrite=False)
    for i in range(5):
        sink.write_chunk(i, *_chunk(i))
    sink.close()  # a crash: no finish
    with pytest.raises(OutputExists):
        SQLSink(db, "t").open(MANIFEST, resume=False, overwrite=False)
    with pytest.raises(ResumeMismatch, match="chunk_size"):
        SQLSink(db, "t").open({**MANIFEST, "chunk_size": 9}, resume=True, overwrite=False)
    again = SQLSink(db, "t")
    assert again.open(MANIFEST, resume=True, overwrite=False) == {0, 1, 2, 3, 4}
    again.write_chunk(4, *_chunk(4))  # a redone chunk replaces its rows
    again.write_chunk(5, *_chunk(5))
    again.finish()
    assert _select(db, 'SELECT id FROM "t" ORDER BY id') == [(i,) for i in range(12)]
    with pytest.raises(OutputExists, match="already finished"):
        SQLSink(db, "t").open(MANIFEST, resume=True, overwrite=False)


def test_sink_sql_resume_in_new_connection(tmp_path: Path) -> None:
    for kind in ("sqlite", "duckdb"):
        conn = _connect(kind, tmp_path)
        sink = SQLSink(conn, "t")
        sink.open(MANIFEST, resume=False, overwrite=False)
        for i in range(5):
            sink.write_chunk(i, *_chunk(i))
        conn.close()
        conn = _connect(kind, tmp_path)
        try:
            assert SQLSink(conn, "t").open(MANIFEST, resume=True, overwrite=False) == set(range(5))
        finally:
            conn.close()


def test_sink_sql_duckdb_type_violation_rolls_back(tmp_path: Path) -> None:
    conn = duckdb.connect(str(tmp_path / "db.duckdb"))
    try:
        sink = SQLSink(conn, "t")
        sink.open(MANIFEST, resume=False, overwrite=False)
        sink.write_chunk(0, {"n": [1, 2]}, 2)
        with pytest.raises(duckdb.Error):
            sink.write_chunk(1, {"n": [3, "not a number"]}, 2)
        assert _select(conn, 'SELECT n FROM "t__servekit_staging" ORDER BY n') == [(1,), (2,)]
        assert _select(conn, "SELECT chunk FROM servekit_batch_chunks") == [(0,)]
        assert SQLSink(conn, "t").open(MANIFEST, resume=True, overwrite=False) == {0}
    finally:
        conn.close()


class _FailingCursor:
    """A sqlite3 cursor whose checkpoint INSERT fails (after the rows went in)."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql.startswith("INSERT INTO servekit_batch_chunks"):
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return self._cursor.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _FailingConnection:
    """A sqlite3 connection proxy that can make the checkpoint write fail."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail = False

    def cursor(self) -> Any:
        cur = self._conn.cursor()
        return _FailingCursor(cur) if self.fail else cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_sink_sql_failed_chunk_leaves_nothing(tmp_path: Path) -> None:
    raw = sqlite3.connect(tmp_path / "db.sqlite")
    conn = _FailingConnection(raw)
    try:
        sink = SQLSink(conn, "t")
        sink.open(MANIFEST, resume=False, overwrite=False)
        conn.fail = True
        with pytest.raises(sqlite3.OperationalError, match="simulated"):
            sink.write_chunk(0, *_chunk(0))  # the staging table is created in this one
        assert not raw.in_transaction
        assert not _table_exists(raw, "t__servekit_staging")
        conn.fail = False
        sink.write_chunk(1, *_chunk(1))
        conn.fail = True
        with pytest.raises(sqlite3.OperationalError):
            sink.write_chunk(2, *_chunk(2))
        assert raw.execute('SELECT id FROM "t__servekit_staging"').fetchall() == [(2,), (3,)]
        assert raw.execute("SELECT chunk, rows FROM servekit_batch_chunks").fetchall() == [(1, 2)]
        conn.fail = False
        sink.write_chunk(0, *_chunk(0))
        sink.write_chunk(2, *_chunk(2))
        sink.finish()
        assert raw.execute('SELECT id FROM "t" ORDER BY id').fetchall() == [(i,) for i in range(6)]
    finally:
        raw.close()


def test_sink_sql_new_column_refused(db: Any) -> None:
    sink = SQLSink(db, "t")
    sink.open(MANIFEST, resume=False, overwrite=False)
    sink.write_chunk(0, {"a": [1]}, 1)
    with pytest.raises(ValueError, match=r"columns \['b'\]"):
        sink.write_chunk(1, {"a": [1], "b": [2]}, 1)


def test_sink_sql_overwrite_keeps_old_table_until_finish(db: Any) -> None:
    db.execute('CREATE TABLE "t" (old INTEGER)')
    db.execute('INSERT INTO "t" VALUES (42)')
    db.commit()
    with pytest.raises(OutputExists, match="'t'"):
        SQLSink(db, "t").open(MANIFEST, resume=False, overwrite=False)
    sink = SQLSink(db, "t")
    sink.open(MANIFEST, resume=False, overwrite=True)
    sink.write_chunk(0, {"new": ["x"]}, 1)
    assert _select(db, 'SELECT * FROM "t"') == [(42,)]
    sink.finish()
    assert _select(db, 'SELECT * FROM "t"') == [("x",)]


def test_sink_sql_resume_of_an_overwriting_run_replaces_the_target(db: Any) -> None:
    first = SQLSink(db, "t")
    first.open(MANIFEST, resume=False, overwrite=False)
    first.write_chunk(0, {"a": [1]}, 1)
    first.finish()
    second = SQLSink(db, "t")
    second.open(MANIFEST, resume=False, overwrite=True)
    second.write_chunk(0, {"a": [2]}, 1)
    second.close()  # crash
    third = SQLSink(db, "t")
    assert third.open(MANIFEST, resume=True, overwrite=False) == {0}
    third.write_chunk(1, {"a": [3]}, 1)
    assert _select(db, 'SELECT a FROM "t"') == [(1,)]
    third.finish()
    assert _select(db, 'SELECT a FROM "t" ORDER BY a') == [(2,), (3,)]


def test_sink_sql_leftover_staging_table_refused(db: Any) -> None:
    db.execute('CREATE TABLE "t__servekit_staging" (x INTEGER)')
    db.commit()
    for resume in (False, True):
        with pytest.raises(OutputExists, match="staging table"):
            SQLSink(db, "t").open(MANIFEST, resume=resume, overwrite=False)
    assert SQLSink(db, "t").open(MANIFEST, resume=False, overwrite=True) == set()
    assert not _table_exists(db, "t__servekit_staging")


def test_sink_sql_all_empty_run(db: Any) -> None:
    sink = SQLSink(db, "t")
    sink.open({**MANIFEST, "output_columns": ["id", "pred"]}, resume=False, overwrite=False)
    sink.write_chunk(0, {}, 0)
    sink.finish()
    assert _select(db, 'SELECT * FROM "t"') == []
    assert [d[0] for d in db.execute('SELECT * FROM "t"').description] == ["id", "pred"]


@pytest.mark.parametrize("name", ["", "1abc", "a-b", 't"; DROP TABLE x; --', "a b", "é"])
def test_sink_sql_invalid_names_refused(name: str) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(ValueError, match="invalid table name"):
            SQLSink(conn, name)
        sink = SQLSink(conn, "ok")
        sink.open(MANIFEST, resume=False, overwrite=False)
        with pytest.raises(ValueError, match="invalid column name"):
            sink.write_chunk(0, {name: [1]}, 1)
    finally:
        conn.close()


@pytest.mark.parametrize("style", ["qmark", "numeric", "named", "format", "pyformat"])
def test_sink_sql_paramstyles(style: str) -> None:
    sink = SQLSink(sqlite3.connect(":memory:"), "t", paramstyle=style)
    marks = sink._placeholders(2)
    params = sink._params([1, 2])
    expected = {
        "qmark": (["?", "?"], (1, 2)),
        "numeric": ([":1", ":2"], (1, 2)),
        "named": ([":p0", ":p1"], {"p0": 1, "p1": 2}),
        "format": (["%s", "%s"], (1, 2)),
        "pyformat": (["%(p0)s", "%(p1)s"], {"p0": 1, "p1": 2}),
    }[style]
    assert (marks, params) == expected
    sink.connection.close()
    with pytest.raises(ValueError, match="paramstyle"):
        SQLSink(None, "t", paramstyle="weird")


@pytest.mark.parametrize("style", ["qmark", "numeric", "named"])
def test_sink_sql_sqlite_paramstyles_end_to_end(style: str) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        sink = SQLSink(conn, "t", paramstyle=style)
        sink.open(MANIFEST, resume=False, overwrite=False)
        sink.write_chunk(0, {"a": [1, 2], "b": ["x", "y"]}, 2)
        sink.write_chunk(0, {"a": [1, 2], "b": ["x", "z"]}, 2)
        sink.finish()
        assert conn.execute('SELECT * FROM "t"').fetchall() == [(1, "x"), (2, "z")]
    finally:
        conn.close()


# --------------------------------------------------------------------------- in memory


def test_sink_columns_to_rows() -> None:
    vec = np.arange(6).reshape(3, 2)
    rows = columns_to_rows({"a": [1, 2, 3], "v": vec}, 3)
    assert [r["a"] for r in rows] == [1, 2, 3]
    assert isinstance(rows[1]["v"], np.ndarray)
    np.testing.assert_array_equal(rows[1]["v"], [2, 3])
    assert columns_to_rows({}, 0) == []
    assert columns_to_rows({}, 2) == [{}, {}]
    with pytest.raises(ValueError, match="'a' has 1 values for 3 rows"):
        columns_to_rows({"a": [1]}, 3)


def test_sink_list_and_callable() -> None:
    target: list[dict[str, Any]] = [{"old": True}]
    sink = ListSink(target)
    assert sink.open(MANIFEST, resume=True, overwrite=False) == set()
    sink.write_chunk(0, {"a": np.array([1.5, 2.5])}, 2)
    sink.write_chunk(1, {"a": []}, 0)
    sink.finish()
    sink.close()
    assert sink.rows is target and target[1:] == [{"a": 1.5}, {"a": 2.5}]
    assert isinstance(target[1]["a"], np.floating)
    assert ListSink().rows == []

    calls: list[list[dict[str, Any]]] = []
    cs = CallableSink(calls.append)
    assert cs.open(MANIFEST, resume=False, overwrite=True) == set()
    assert cs.open(MANIFEST, resume=True, overwrite=False) == set()
    cs.write_chunk(0, {"a": [1], "b": ["x"]}, 1)
    cs.write_chunk(1, {"a": [], "b": []}, 0)
    cs.finish()
    cs.close()
    assert calls == [[{"a": 1, "b": "x"}]]


def test_sink_open_sink_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_sink(str(tmp_path / "a.jsonl")), JSONLSink)
    assert isinstance(open_sink(tmp_path / "a.NDJSON"), JSONLSink)
    assert isinstance(open_sink(tmp_path / "a.csv"), CSVSink)
    assert isinstance(open_sink(tmp_path / "a.parquet"), ParquetSink)
    assert isinstance(open_sink(tmp_path / "a.pq"), ParquetSink)
    rows: list[dict[str, Any]] = []
    list_sink = open_sink(rows)
    assert isinstance(list_sink, ListSink) and list_sink.rows is rows
    assert isinstance(open_sink(print), CallableSink)
    sink = JSONLSink(tmp_path / "x.jsonl")
    assert open_sink(sink) is sink
    for s in (sink, ListSink(), CallableSink(print), SQLSink(None, "t")):
        assert isinstance(s, Sink)
    with pytest.raises(ValueError, match=r"\.jsonl, \.ndjson, \.csv, \.parquet, \.pq"):
        open_sink(tmp_path / "a.xlsx")
    with pytest.raises(TypeError, match="int"):
        open_sink(42)
    with pytest.raises(TypeError):
        open_sink(io.BytesIO())


def test_sink_module_imports_no_heavy_dependencies() -> None:
    import subprocess
    import sys

    # the package's __init__ belongs to the runner; load this module on its own
    code = (
        "import sys, types, servekit;"
        "pkg = types.ModuleType('servekit.batch');"
        "pkg.__path__ = [servekit.__path__[0] + '/batch'];"
        "sys.modules['servekit.batch'] = pkg;"
        "import servekit.batch._sinks;"
        "import servekit.batch._sqlsink;"
        "print(sorted(m for m in ('pyarrow', 'pandas', 'duckdb') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
