"""Batch sources: chunking, resume skipping, encodings (BT-07), bad rows (BT-01), memory (BT-05)."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from servekit.batch._parquetsource import ParquetSource
from servekit.batch._sources import ArraySource, DataFrameSource, IterableSource, open_source
from servekit.batch._sqlsource import SQLSource
from servekit.batch._textsources import CSVSource, JSONLSource
from servekit.batch._types import Chunk, RowError, Source
from servekit.errors import SourceError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def read(src: Source, chunk_size: int, start_chunk: int = 0) -> list[Chunk]:
    try:
        return list(src.chunks(chunk_size, start_chunk))
    finally:
        src.close()


def plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else list(value)


def flat(chunks: list[Chunk]) -> list[tuple[Any, ...]]:
    """Each chunk as plain data, to compare two reads."""
    return [
        (
            c.index,
            c.start,
            c.size,
            list(c.rows),
            list(c.errors),
            {k: plain(v) for k, v in c.columns.items()},
        )
        for c in chunks
    ]


def assert_resume_matches(make: Any, chunk_size: int) -> list[Chunk]:
    """Every start_chunk gives exactly the tail of a full read."""
    full = read(make(), chunk_size)
    for start in range(len(full) + 2):
        assert flat(read(make(), chunk_size, start)) == flat(full[start:]), start
    return full


def errors_of(chunks: list[Chunk]) -> list[RowError]:
    return [e for c in chunks for e in c.errors]


def good_rows(chunks: list[Chunk]) -> list[int]:
    return [r for c in chunks for r in c.rows]


def column(chunks: list[Chunk], name: str) -> list[Any]:
    return [v for c in chunks for v in plain(c.columns[name])]


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- shared rules ------------------------------------------------------------------------


def test_source_chunk_boundaries_and_numbering() -> None:
    chunks = read(IterableSource(list(range(10))), 3)
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.start for c in chunks] == [0, 3, 6, 9]
    assert [c.size for c in chunks] == [3, 3, 3, 1]
    assert [c.rows for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert column(chunks, "input") == list(range(10))


@pytest.mark.parametrize(("chunk_size", "start_chunk"), [(0, 0), (-1, 0), (1, -1), (2.0, 0)])
def test_source_rejects_bad_chunk_arguments(chunk_size: Any, start_chunk: Any) -> None:
    for src in (IterableSource([1]), ArraySource(np.zeros(3)), SQLSource(None, "select 1")):
        with pytest.raises(ValueError, match="chunk"):
            src.chunks(chunk_size, start_chunk)


def test_source_module_imports_no_optional_dependency() -> None:
    code = textwrap.dedent(
        """
        import sys, types, pathlib
        import servekit
        pkg = types.ModuleType("servekit.batch")
        pkg.__path__ = [str(pathlib.Path(servekit.__file__).parent / "batch")]
        sys.modules["servekit.batch"] = pkg
        import servekit.batch._sources
        import servekit.batch._sqlsource
        print(sorted(m for m in ("pyarrow", "pandas", "duckdb") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_source_classes_implement_the_protocol(tmp_path: Path) -> None:
    for src in (
        IterableSource([]),
        ArraySource(np.zeros(1)),
        CSVSource(tmp_path / "a.csv"),
        JSONLSource(tmp_path / "a.jsonl"),
        ParquetSource(tmp_path / "a.parquet"),
        SQLSource(sqlite3.connect(":memory:"), "select 1"),
    ):
        assert isinstance(src, Source)
        src.close()
        src.close()


# -- IterableSource -------------------------------------------------------------------------


def test_source_iterable_of_mappings() -> None:
    items: list[Any] = [{"a": i, "b": str(i)} for i in range(7)]
    items[2] = {"a": 2}
    items[4] = {"a": 4, "b": "4", "c": 0}
    items[5] = "not a mapping"
    chunks = assert_resume_matches(lambda: IterableSource(items), 3)
    assert [c.size for c in chunks] == [3, 3, 1]
    assert list(chunks[0].columns) == ["a", "b"]
    assert good_rows(chunks) == [0, 1, 3, 6]
    assert column(chunks, "b") == ["0", "1", "3", "6"]
    errs = errors_of(chunks)
    assert [(e.row, e.stage, e.code) for e in errs] == [
        (2, "read", "malformed_row"),
        (4, "read", "malformed_row"),
        (5, "read", "malformed_row"),
    ]
    assert "missing keys ['b']" in errs[0].message
    assert "extra keys ['c']" in errs[1].message


def test_source_iterable_columns_select_and_allow_extra_keys() -> None:
    items = [{"a": 1, "b": 2, "c": 3}, {"b": 5, "a": 4}, {"a": 6}]
    chunks = read(IterableSource(items, columns=["b", "a"]), 10)
    assert chunks[0].columns == {"b": [2, 5], "a": [1, 4]}
    assert [e.row for e in chunks[0].errors] == [2]


def test_source_iterable_all_bad_chunk_and_empty_input() -> None:
    chunks = read(IterableSource([{"a": 1}, 2, 3, 4, {"a": 5}]), 2)
    assert chunks[1].columns == {"a": []} and chunks[1].rows == [] and chunks[1].size == 2
    assert read(IterableSource([]), 5) == []


def test_source_iterable_one_shot_iterator() -> None:
    src = IterableSource(iter(range(5)))
    assert column(read(src, 2), "input") == [0, 1, 2, 3, 4]
    with pytest.raises(SourceError, match="read once"):
        src.chunks(2)
    gen = IterableSource(x for x in range(5))
    assert [c.start for c in read(gen, 2, 1)] == [2, 4]


def test_source_iterable_refuses_strings_and_mappings() -> None:
    for bad in ("abc", b"abc", {"a": 1}):
        with pytest.raises(SourceError):
            IterableSource(bad)
    with pytest.raises(SourceError, match="not mappings"):
        IterableSource([1, 2], columns=["x"]).chunks(1)


# -- ArraySource / DataFrameSource ------------------------------------------------------


def test_source_array_1d_2d_and_structured() -> None:
    one = np.arange(10)
    chunks = assert_resume_matches(lambda: ArraySource(one), 4)
    assert [c.size for c in chunks] == [4, 4, 2]
    assert np.shares_memory(chunks[0].columns["input"], one)
    two = np.arange(20, dtype=np.float32).reshape(10, 2)
    chunks = read(ArraySource(two), 3)
    assert chunks[1].columns["input"].shape == (3, 2)
    assert chunks[3].columns["input"].tolist() == [[18.0, 19.0]]
    rec = np.array([(1, 2.0), (3, 4.0), (5, 6.0)], dtype=[("x", "i8"), ("y", "f4")])
    chunks = read(ArraySource(rec, columns=["y"]), 2)
    assert list(chunks[0].columns) == ["y"] and chunks[1].columns["y"].tolist() == [6.0]
    assert read(ArraySource(np.zeros((0, 3))), 2) == []
    src = ArraySource(two)
    assert src.describe() == {"kind": "numpy", "shape": [10, 2], "dtype": "float32"}
    with pytest.raises(SourceError):
        ArraySource(np.float32(1))
    with pytest.raises(SourceError, match="no field"):
        ArraySource(rec, columns=["z"])


def test_source_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"x": np.arange(7, dtype=np.int64), "s": [f"r{i}" for i in range(7)]})
    df["o"] = pd.Series([{"k": i} for i in range(7)], dtype=object)
    chunks = assert_resume_matches(lambda: DataFrameSource(df), 3)
    assert [c.size for c in chunks] == [3, 3, 1]
    assert isinstance(chunks[0].columns["x"], np.ndarray)
    assert chunks[1].columns["x"].tolist() == [3, 4, 5]
    assert chunks[2].columns["s"] == ["r6"]
    assert chunks[0].columns["o"] == [{"k": 0}, {"k": 1}, {"k": 2}]
    src = DataFrameSource(df, columns=["s"])
    assert src.describe() == {"kind": "pandas", "columns": ["s"], "rows": 7}
    assert list(read(src, 10)[0].columns) == ["s"]
    with pytest.raises(SourceError, match="no column 'nope'"):
        DataFrameSource(df, columns=["nope"])
    assert read(DataFrameSource(df.iloc[:0]), 3) == []


# -- CSVSource --------------------------------------------------------------------------


def test_source_csv_basic_describe_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(10)), encoding="utf-8")
    chunks = assert_resume_matches(lambda: CSVSource(path), 3)
    assert [c.size for c in chunks] == [3, 3, 3, 1]
    assert column(chunks, "id") == [str(i) for i in range(10)]
    desc = CSVSource(path).describe()
    assert desc["kind"] == "csv" and desc["path"] == str(path.absolute())
    assert desc["size"] == path.stat().st_size and desc["mtime_ns"] == path.stat().st_mtime_ns


def test_source_csv_bom_crlf_and_embedded_newlines(tmp_path: Path) -> None:
    data = (
        b"\xef\xbb\xbfid,text\r\n"
        b'1,"two\r\nlines"\r\n'
        b"2,plain\r\n"
        b'3,"quote "" and, comma"\r\n'
        b'4,"three\nshort\nlines"\r\n'
        b"5,last"
    )
    path = write_bytes(tmp_path, "in.csv", data)
    chunks = assert_resume_matches(lambda: CSVSource(path), 2)
    assert list(chunks[0].columns) == ["id", "text"]
    assert column(chunks, "id") == ["1", "2", "3", "4", "5"]
    assert column(chunks, "text") == [
        "two\r\nlines",
        "plain",
        'quote " and, comma',
        "three\nshort\nlines",
        "last",
    ]
    assert errors_of(chunks) == []


def test_source_csv_empty_and_header_only(tmp_path: Path) -> None:
    empty = write_bytes(tmp_path, "empty.csv", b"")
    assert read(CSVSource(empty), 3) == []
    assert read(CSVSource(empty, columns=["a"]), 3) == []
    header = write_bytes(tmp_path, "header.csv", b"\xef\xbb\xbfa,b\r\n")
    assert read(CSVSource(header), 3) == []
    assert read(CSVSource(header, columns=["b"]), 3) == []


def test_source_csv_columns_select_order_and_missing(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "in.csv", b"a,b,c\n1,2,3\n4,5,6\n")
    chunks = read(CSVSource(path, columns=["c", "a"]), 5)
    assert chunks[0].columns == {"c": ["3", "6"], "a": ["1", "4"]}
    src = CSVSource(path, columns=["a", "zz"])
    with pytest.raises(SourceError, match="no column 'zz'"):
        src.chunks(5)  # raised by the call itself, before iterating


def test_source_csv_missing_file(tmp_path: Path) -> None:
    src = CSVSource(tmp_path / "nope.csv")
    with pytest.raises(SourceError, match=r"nope\.csv"):
        src.chunks(5)
    with pytest.raises(SourceError):
        src.describe()


def test_source_csv_tsv_and_blank_lines(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "in.tsv", b"a\tb\n1\t2\n\n3\t4\n")
    chunks = read(CSVSource(path, delimiter="\t"), 5)
    assert chunks[0].columns == {"a": ["1", "3"], "b": ["2", "4"]}
    assert chunks[0].rows == [0, 1] and chunks[0].size == 2  # the blank line is no row


def test_source_csv_bad_rows(tmp_path: Path) -> None:
    data = (
        b"id,v\n"
        b"0,ok\n"
        b"1,too,many\n"  # row 1: wrong field count
        b"2,ok\n"
        b"3,nul\x00here\n"  # row 3: NUL character
        b"4,ok\n"
        b"5,caf\xe9\n"  # row 5: latin-1, not UTF-8
        b"6\n"  # row 6: too few fields
        b'7,"multi\nline ok"\n'
        b"8,ok\n"
    )
    path = write_bytes(tmp_path, "in.csv", data)
    chunks = assert_resume_matches(lambda: CSVSource(path), 4)
    assert [c.size for c in chunks] == [4, 4, 1]
    assert good_rows(chunks) == [0, 2, 4, 7, 8]
    assert column(chunks, "v") == ["ok", "ok", "ok", "multi\nline ok", "ok"]
    errs = errors_of(chunks)
    assert [(e.row, e.stage, e.code) for e in errs] == [
        (1, "read", "malformed_row"),
        (3, "read", "malformed_row"),
        (5, "read", "malformed_row"),
        (6, "read", "malformed_row"),
    ]
    assert "3 fields" in errs[0].message and "line 3" in errs[0].message
    assert "NUL" in errs[1].message
    assert "utf-8" in errs[2].message
    assert "1 fields" in errs[3].message


def test_source_csv_field_over_the_limit_is_one_bad_row(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "in.csv", b"a\nshort\n" + b"x" * 100 + b"\nshort2\n")
    old = csv.field_size_limit(50)
    try:
        chunks = read(CSVSource(path), 10)
    finally:
        csv.field_size_limit(old)
    assert good_rows(chunks) == [0, 2] and column(chunks, "a") == ["short", "short2"]
    assert [e.row for e in errors_of(chunks)] == [1]


def test_source_csv_bad_header(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "in.csv", b"a,\xff\n1,2\n")
    with pytest.raises(SourceError, match="header"):
        CSVSource(path).chunks(3)
    dup = write_bytes(tmp_path, "dup.csv", b"a,a,b\n1,2,3\n")
    with pytest.raises(SourceError, match="more than one"):
        CSVSource(dup).chunks(3)
    assert read(CSVSource(dup, columns=["b"]), 3)[0].columns == {"b": ["3"]}


def test_source_close_releases_an_unfinished_read(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a\n" + "1\n" * 10)
    src = CSVSource(path)
    it = src.chunks(2)
    assert next(it).rows == [0, 1]
    src.close()  # closes the open file: no ResourceWarning (warnings are errors)
    with pytest.raises(StopIteration):
        next(it)
    src.close()


# -- JSONLSource ------------------------------------------------------------------------


def test_source_jsonl_basic_blank_lines_and_resume(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "x": [i, i]}) for i in range(10)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n" + "\n\n".join(lines) + "\n  \n", encoding="utf-8")
    chunks = assert_resume_matches(lambda: JSONLSource(path), 3)
    assert [c.size for c in chunks] == [3, 3, 3, 1]
    assert [c.start for c in chunks] == [0, 3, 6, 9]
    assert column(chunks, "id") == list(range(10))
    assert column(chunks, "x")[9] == [9, 9]
    desc = JSONLSource(path).describe()
    assert desc["kind"] == "jsonl" and desc["size"] == path.stat().st_size


def test_source_jsonl_bad_rows(tmp_path: Path) -> None:
    data = (
        b'{"id": 0, "v": "a"}\n'
        b'{"id": 1, "v": \n'  # row 1: invalid JSON
        b'{"id": 2, "v": "b", "extra": 1}\n'  # extra keys are ignored
        b"[1, 2]\n"  # row 3: not an object
        b'{"id": 4, "v": NaN}\n'  # row 4: NaN is not JSON
        b'{"id": 5, "v": -Infinity}\n'  # row 5
        b'{"id": 6}\n'  # row 6: missing column
        b'{"id": 7, "v": "caf\xe9"}\r\n'  # row 7: not UTF-8
        b'{"id": 8, "v": "nul\x00"}\n'  # row 8: a raw NUL is not valid JSON
        b'{"id": 9, "v": "\\u00e9\\u0000"}\r\n'  # escaped: fine
    )
    path = write_bytes(tmp_path, "in.jsonl", data)
    chunks = assert_resume_matches(lambda: JSONLSource(path), 4)
    assert good_rows(chunks) == [0, 2, 9]
    assert column(chunks, "v") == ["a", "b", "\u00e9\x00"]
    assert list(chunks[0].columns) == ["id", "v"]
    errs = errors_of(chunks)
    assert [e.row for e in errs] == [1, 3, 4, 5, 6, 7, 8]
    assert {(e.stage, e.code) for e in errs} == {("read", "malformed_row")}
    assert "invalid JSON" in errs[0].message
    assert "object" in errs[1].message
    assert "NaN" in errs[2].message and "Infinity" in errs[3].message
    assert "'v'" in errs[4].message
    assert "UTF-8" in errs[5].message


def test_source_jsonl_columns_from_first_good_object(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "in.jsonl", b'oops\n[]\n{"b": 1, "a": 2}\n{"a": 3, "b": 4}\n')
    chunks = assert_resume_matches(lambda: JSONLSource(path), 2)
    assert chunks[0].columns == {"b": [], "a": []}  # all bad, columns still known
    assert chunks[1].columns == {"b": [1, 4], "a": [2, 3]}
    sel = read(JSONLSource(path, columns=["a"]), 5)
    assert sel[0].columns == {"a": [2, 3]}


def test_source_jsonl_bom_empty_and_missing(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}')
    assert read(JSONLSource(path), 5)[0].columns == {"a": [1, 2]}
    assert read(JSONLSource(write_bytes(tmp_path, "e.jsonl", b"")), 5) == []
    assert read(JSONLSource(write_bytes(tmp_path, "b.jsonl", b"\n\r\n \n")), 5) == []
    with pytest.raises(SourceError):
        JSONLSource(tmp_path / "missing.jsonl").chunks(5)


# -- ParquetSource ----------------------------------------------------------------------


def vectors(n: int, k: int, start: int = 0) -> Any:
    values = np.arange(start * k, (start + n) * k, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), k)


def test_source_parquet_types_and_resume_across_row_groups(tmp_path: Path) -> None:
    n = 53
    table = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "flag": pa.array([i % 2 == 0 for i in range(n)]),
            "name": pa.array([f"r{i}" for i in range(n)]),
            "maybe": pa.array([None if i % 5 == 0 else float(i) for i in range(n)]),
            "vec": vectors(n, 4),
            "tags": pa.array([[str(i)] * (i % 3) for i in range(n)]),
        }
    )
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=7)  # 7 does not divide 10
    assert pq.ParquetFile(path).metadata.num_row_groups == 8
    chunks = assert_resume_matches(lambda: ParquetSource(path), 10)
    assert [c.size for c in chunks] == [10, 10, 10, 10, 10, 3]
    assert good_rows(chunks) == list(range(n)) and errors_of(chunks) == []
    c = chunks[2]
    assert isinstance(c.columns["id"], np.ndarray) and c.columns["id"].tolist() == list(
        range(20, 30)
    )
    assert c.columns["flag"].dtype == np.bool_
    assert column(chunks, "flag") == [i % 2 == 0 for i in range(n)]
    assert c.columns["name"] == [f"r{i}" for i in range(20, 30)]
    assert isinstance(c.columns["maybe"], list) and c.columns["maybe"][5] is None
    vec = c.columns["vec"]
    assert isinstance(vec, np.ndarray) and vec.dtype == np.float32 and vec.shape == (10, 4)
    assert vec.tolist() == np.arange(80, 120, dtype=np.float32).reshape(10, 4).tolist()
    assert c.columns["tags"][1] == ["21"] * 0 and c.columns["tags"][2] == ["22"]
    desc = ParquetSource(path).describe()
    assert desc["kind"] == "parquet" and desc["rows"] == n and desc["size"] == path.stat().st_size


def test_source_parquet_numeric_types_are_numpy(tmp_path: Path) -> None:
    values = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    types = {
        "i8": pa.int8(),
        "u16": pa.uint16(),
        "i32": pa.int32(),
        "u64": pa.uint64(),
        "f16": pa.float16(),
        "f32": pa.float32(),
        "f64": pa.float64(),
    }
    arrays = {
        name: pa.array(np.array(values, dtype=t.to_pandas_dtype()), t) for name, t in types.items()
    }
    arrays["b"] = pa.array([v % 3 == 0 for v in values])
    path = tmp_path / "num.parquet"
    pq.write_table(pa.table(arrays), path, row_group_size=4)
    chunks = assert_resume_matches(lambda: ParquetSource(path), 3)
    for name, t in types.items():
        assert all(c.columns[name].dtype == t.to_pandas_dtype() for c in chunks), name
        assert column(chunks, name) == values, name
    assert column(chunks, "b") == [v % 3 == 0 for v in values]


def test_source_parquet_fixed_size_list_is_a_2d_array(tmp_path: Path) -> None:
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"emb": vectors(25, 8)}), path, row_group_size=6)
    chunks = read(ParquetSource(path), 10)
    expected = np.arange(25 * 8, dtype=np.float32).reshape(25, 8)
    got = np.concatenate([c.columns["emb"] for c in chunks])
    assert got.dtype == np.float32 and got.shape == (25, 8)
    np.testing.assert_array_equal(got, expected)
    with_null = pa.table({"emb": pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2))})
    pq.write_table(with_null, tmp_path / "n.parquet")
    assert read(ParquetSource(tmp_path / "n.parquet"), 5)[0].columns["emb"] == [[1.0, 2.0], None]


def test_source_parquet_zero_rows_and_columns(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), empty)
    assert read(ParquetSource(empty), 5) == []
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"], "extra": [0, 0, 0]}), path)
    chunks = read(ParquetSource(path, columns=["b", "a"]), 2)
    assert list(chunks[0].columns) == ["b", "a"] and chunks[1].columns["b"] == ["z"]
    with pytest.raises(SourceError, match="no column 'missing'"):
        ParquetSource(path, columns=["a", "missing"]).chunks(2)
    with pytest.raises(SourceError):
        ParquetSource(tmp_path / "nope.parquet").chunks(2)
    not_parquet = write_bytes(tmp_path, "bad.parquet", b"this is not parquet")
    with pytest.raises(SourceError, match="Parquet"):
        ParquetSource(not_parquet).chunks(2)


def test_source_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SourceError, match=r'pip install "servekit\[parquet\]"'):
        ParquetSource(tmp_path / "x.parquet").chunks(5)


def test_source_parquet_memory_stays_bounded(tmp_path: Path) -> None:
    # BT-05: 200,000 rows x fixed_size_list<float32>[256] = ~200 MB of values, in row
    # groups of 10,000 rows (~10 MB). The RSS is sampled after every chunk, in a fresh
    # process: reading must hold about a row group and a chunk, not the file.
    pytest.importorskip("psutil")
    path = tmp_path / "big.parquet"
    k, step, n = 256, 10_000, 200_000
    schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float32(), k))])
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
        for start in range(0, n, step):
            values = rng.random(step * k, dtype=np.float32)
            ids = pa.array(np.arange(start, start + step, dtype=np.int64))
            emb = pa.FixedSizeListArray.from_arrays(pa.array(values), k)
            writer.write_table(pa.table({"id": ids, "emb": emb}, schema=schema))
    assert path.stat().st_size > 200_000_000
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import psutil
        import pyarrow.parquet
        from servekit.batch._parquetsource import ParquetSource
        proc = psutil.Process()
        base = peak = proc.memory_info().rss
        src = ParquetSource(sys.argv[1])
        rows = total = 0
        for chunk in src.chunks(1000):
            emb = chunk.columns["emb"]
            assert emb.shape == (chunk.size, {k}) and emb.dtype == np.float32
            rows += chunk.size
            total += int(chunk.columns["id"].sum())
            peak = max(peak, proc.memory_info().rss)
        src.close()
        assert "pandas" not in sys.modules  # pyarrow's to_numpy would import it
        print(rows, total, (peak - base) // 2**20)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows, total, extra_mib = map(int, out.stdout.split())
    assert rows == n and total == n * (n - 1) // 2
    # Measured ~66 MiB here (pyarrow thread pools and allocator arenas); pre-buffering the
    # whole file (pyarrow's default) measured ~270 MiB.
    assert extra_mib < 120, f"reading a 200 MB file grew the peak RSS by {extra_mib} MiB"


# -- SQLSource --------------------------------------------------------------------------


def test_source_sql_sqlite(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.execute("create table t (id integer, name text)")
    conn.executemany("insert into t values (?, ?)", [(i, f"n{i}") for i in range(10)])
    query = "select id, name from t where id >= ? order by id"

    chunks = assert_resume_matches(lambda: SQLSource(conn, query, (0,)), 3)
    assert [c.size for c in chunks] == [3, 3, 3, 1]
    assert chunks[1].columns == {"id": [3, 4, 5], "name": ["n3", "n4", "n5"]}
    assert read(SQLSource(conn, query, (20,)), 3) == []
    exact = read(SQLSource(conn, "select id from t where id < 6 order by id"), 3)
    assert [c.size for c in exact] == [3, 3]
    src = SQLSource(conn, query, (0,))
    it = src.chunks(4)
    next(it)
    src.close()
    src.close()
    assert conn.execute("select count(*) from t").fetchone() == (10,)  # still open
    assert src.describe() == {"kind": "sql", "query": query, "params": ["0"]}
    assert SQLSource(conn, query, (15,)).describe() != src.describe()  # resume refuses
    with pytest.raises(SourceError, match="query failed"):
        SQLSource(conn, "select * from nope").chunks(3)
    with pytest.raises(SourceError, match="more than one"):
        SQLSource(conn, "select id, id from t").chunks(3)
    conn.close()


def test_source_sql_duckdb() -> None:
    duckdb = pytest.importorskip("duckdb")
    conn = duckdb.connect(":memory:")
    conn.execute("create table warehouse as select range as id, range * 2.5 as v from range(25)")
    query = "select id, v from warehouse where id < ? order by id"
    chunks = assert_resume_matches(lambda: SQLSource(conn, query, [23]), 5)
    assert [c.size for c in chunks] == [5, 5, 5, 5, 3]
    assert chunks[4].columns == {"id": [20, 21, 22], "v": [50.0, 52.5, 55.0]}
    no_params = read(SQLSource(conn, "select count(*) as n from warehouse"), 5)
    assert no_params[0].columns == {"n": [25]}
    assert conn.execute("select 1").fetchone() == (1,)  # the connection is still open
    conn.close()


# -- open_source ------------------------------------------------------------------------


def test_source_open_source_dispatch(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "a.tsv").write_text("x\ty\n1\t2\n")
    (tmp_path / "a.JSONL").write_text('{"x": 1}\n')
    pq.write_table(pa.table({"x": [1], "y": [2]}), tmp_path / "a.pq")
    assert isinstance(open_source(str(tmp_path / "a.csv")), CSVSource)
    tsv = open_source(tmp_path / "a.tsv")
    assert isinstance(tsv, CSVSource) and read(tsv, 5)[0].columns == {"x": ["1"], "y": ["2"]}
    assert isinstance(open_source(tmp_path / "a.JSONL"), JSONLSource)
    assert isinstance(open_source(tmp_path / "b.ndjson"), JSONLSource)
    assert isinstance(open_source(tmp_path / "b.parquet"), ParquetSource)
    pqs = open_source(tmp_path / "a.pq", columns=["y"])
    assert isinstance(pqs, ParquetSource) and list(read(pqs, 5)[0].columns) == ["y"]
    assert isinstance(open_source(np.zeros(3)), ArraySource)
    assert isinstance(open_source(pd.DataFrame({"a": [1]})), DataFrameSource)
    assert isinstance(open_source([1, 2]), IterableSource)
    assert isinstance(open_source(x for x in range(2)), IterableSource)
    src = IterableSource([1])
    assert open_source(src) is src


@pytest.mark.parametrize("bad", ["data.xlsx", "just some text", b"bytes", {"a": 1}, 42, None])
def test_source_open_source_errors(bad: Any) -> None:
    with pytest.raises(SourceError) as info:
        open_source(bad)
    if isinstance(bad, str):
        assert ".csv" in str(info.value) and ".parquet" in str(info.value)
