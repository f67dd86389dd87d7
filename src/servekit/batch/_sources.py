"""Batch inputs: iterables, numpy arrays, DataFrames, CSV, JSON Lines, Parquet and SQL.

Every source implements :class:`~servekit.batch.Source` and follows the same rules:

* Rows are numbered from 0 in reading order, bad rows included, so chunk ``i`` always
  covers input rows ``i * chunk_size`` to ``(i + 1) * chunk_size - 1`` and a resumed run
  (``start_chunk > 0``) yields exactly the chunks a full read yields from there on.
  Blank lines of a JSON Lines file and empty records of a CSV file (a line with
  nothing on it) are not rows: they are skipped and not numbered.
* A row that cannot be parsed (wrong field count, invalid JSON, NaN/Infinity, a NUL
  character, bytes that are not UTF-8, a missing column) becomes a
  :class:`~servekit.batch.RowError` with stage ``"read"`` and code ``"malformed_row"``;
  the rows around it are kept. An input that cannot be read as a whole (a missing file,
  a requested column the input does not have, an unknown format) raises
  :class:`~servekit.SourceError`. File sources raise it from ``chunks()`` itself, before
  the first chunk is produced, so a run fails before doing any work.
* A chunk whose rows are all bad is still yielded (its columns hold empty sequences);
  an input of 0 rows yields no chunks.
* Rows before ``start_chunk`` are skipped as cheaply as the format allows: array, frame
  and Parquet sources jump (Parquet skips whole row groups from its metadata), JSON
  Lines counts lines without parsing them, CSV must still tokenise records (a quoted
  field may hold newlines) but does not check or convert them, SQL fetches and discards.
* Columns are lists, or numpy arrays for numeric data. Arrays may be read-only views of
  the source's memory (a numpy slice of the caller's array, a zero-copy view of an
  Arrow buffer): consumers must not modify them in place.
* The column names of a JSON Lines file or an iterable of mappings are the keys of the
  first good row (looked up before the first chunk, so every chunk has them, even one
  whose rows are all bad), unless ``columns`` names them.
* pyarrow, pandas and duckdb are never imported at module level: pandas objects are used
  through their own API, pyarrow is imported by :class:`ParquetSource` when it reads.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import operator
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ._types import Chunk, RowError, Source

__all__ = [
    "ArraySource",
    "CSVSource",
    "DataFrameSource",
    "IterableSource",
    "JSONLSource",
    "ParquetSource",
    "SQLSource",
    "open_source",
]

_MALFORMED = "malformed_row"
_UTF8_BOM = codecs.BOM_UTF8
#: A NUL character, or a lone surrogate left by ``errors="surrogateescape"`` decoding
#: (a byte that is not valid UTF-8).
_BAD_CHARS = re.compile("[\x00\udc80-\udcff]")

#: One parsed input row: the values of the good row (in column order), or ``None`` and
#: the reason the row is bad.
_Record = tuple[tuple[Any, ...] | None, str]


def _check_args(chunk_size: int, start_chunk: int) -> None:
    """Refuse a chunk size below 1 or a negative start chunk."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if isinstance(start_chunk, bool) or not isinstance(start_chunk, int) or start_chunk < 0:
        raise ValueError(f"start_chunk must be an integer >= 0, got {start_chunk!r}")


def _check_columns(columns: Sequence[str] | None) -> list[str] | None:
    """Copy a ``columns`` selection, refusing a bare string and duplicates."""
    if columns is None:
        return None
    if isinstance(columns, str | bytes):
        raise SourceError(f"columns must be a list of names, not {columns!r}")
    names = [str(c) for c in columns]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise SourceError(f"columns lists {dupes} more than once")
    return names


def _row_error(row: int, message: str) -> RowError:
    """The read-stage error of an input row that could not be parsed."""
    return RowError(row, "read", _MALFORMED, message, {})


def _chunk_records(
    records: Iterator[_Record], names: list[str], chunk_size: int, start_chunk: int
) -> Iterator[Chunk]:
    """Group parsed rows (the rows from ``start_chunk`` on) into chunks of ``chunk_size``.

    Good rows' values are gathered per chunk and turned into one list per column at once.
    """
    index = start_chunk
    start = start_chunk * chunk_size
    good: list[tuple[Any, ...]] = []
    rows: list[int] = []
    errors: list[RowError] = []
    size = 0
    row = start
    for values, message in records:
        if values is None:
            errors.append(_row_error(row, message))
        else:
            good.append(values)
            rows.append(row)
        row += 1
        size += 1
        if size == chunk_size:
            yield _make_chunk(index, start, size, names, good, rows, errors)
            index += 1
            start += chunk_size
            good, rows, errors, size = [], [], [], 0
    if size:
        yield _make_chunk(index, start, size, names, good, rows, errors)


def _make_chunk(
    index: int,
    start: int,
    size: int,
    names: list[str],
    good: list[tuple[Any, ...]],
    rows: list[int],
    errors: list[RowError],
) -> Chunk:
    """A chunk from its good rows' value tuples (transposed into column lists)."""
    if good:
        columns = {
            name: list(col) for name, col in zip(names, zip(*good, strict=True), strict=True)
        }
    else:
        columns = {name: [] for name in names}
    return Chunk(index, start, size, columns, rows, errors)


def _spans(n_rows: int, chunk_size: int, start_chunk: int) -> Iterator[tuple[int, int, int]]:
    """``(index, start, stop)`` of each chunk of an input of ``n_rows`` known rows."""
    index = start_chunk
    start = start_chunk * chunk_size
    while start < n_rows:
        stop = min(start + chunk_size, n_rows)
        yield index, start, stop
        index += 1
        start = stop


class _Generators:
    """The chunk iterators a source handed out and has not seen finish, to close them."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()

    def track(self, gen: Iterator[Chunk]) -> Iterator[Chunk]:
        """Remember ``gen`` and return it."""
        self._live.add(gen)
        return gen

    def close(self) -> None:
        """Close every live iterator (which runs its ``finally``: files, cursors)."""
        for gen in list(self._live):
            try:
                gen.close()
            except ValueError:  # still running in another thread: it closes on its own
                pass
        self._live.clear()


# -- in-memory sources ---------------------------------------------------------------


class IterableSource:
    """Rows from any iterable: mappings (one column per key), or plain values.

    The first item decides the shape. If it is a mapping, the columns are ``columns``
    or the first item's keys, in order, and every item must be a mapping with the same
    keys (with ``columns`` given: at least those keys; extra keys are ignored); another
    item is a ``malformed_row`` naming the missing or extra keys. Otherwise every item is
    one value of a single column named ``"input"``.

    A one-shot iterator (a generator) can be read once: a second ``chunks()`` raises
    :class:`~servekit.SourceError` rather than silently continuing where it stopped.
    """

    def __init__(self, iterable: Iterable[Any], *, columns: Sequence[str] | None = None) -> None:
        """Wrap ``iterable``; ``columns`` selects (and orders) the keys of mapping items."""
        if isinstance(iterable, str | bytes | bytearray | Mapping):
            raise SourceError(
                f"a {type(iterable).__name__} is not an iterable of rows; pass a list of rows"
            )
        self._iterable = iterable
        self._columns = _check_columns(columns)
        self._one_shot = iter(iterable) is iterable
        self._used = False
        self._gens = _Generators()

    def describe(self) -> dict[str, Any]:
        """``{"kind": "iterable"}``: an iterable has no identity to check on resume."""
        return {"kind": "iterable"}

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` items from chunk ``start_chunk`` on."""
        _check_args(chunk_size, start_chunk)
        if self._one_shot and self._used:
            raise SourceError("this iterator was already read; an iterator can be read once")
        self._used = True
        it = iter(self._iterable)
        first = next(it, _END)
        if first is _END:
            return iter(())
        if isinstance(first, Mapping):
            names = self._columns if self._columns is not None else list(first)
            mapping = True
        else:
            if self._columns not in (None, ["input"]):
                raise SourceError(
                    f"columns={self._columns} given, but the items are not mappings "
                    f"(the first is a {type(first).__name__}): their one column is 'input'"
                )
            names = ["input"]
            mapping = False
        items = _chain1(first, it)
        for _ in range(start_chunk * chunk_size):  # skipped items are not looked at
            if next(items, _END) is _END:
                return iter(())
        if mapping:
            records = self._mapping_records(items, names, self._columns is not None)
        else:
            records = (((item,), "") for item in items)
        return self._gens.track(_chunk_records(records, names, chunk_size, start_chunk))

    @staticmethod
    def _mapping_records(items: Iterator[Any], names: list[str], subset: bool) -> Iterator[_Record]:
        """Each mapping item as the values of ``names``, or why it does not fit."""
        wanted = set(names)
        getter = _getter(names)
        for item in items:
            if not isinstance(item, Mapping):
                yield None, f"expected a mapping with keys {names}, got {type(item).__name__}"
                continue
            keys = item.keys()
            fits = wanted.issubset(keys) if subset else keys == wanted
            if not fits:
                missing = [n for n in names if n not in keys]
                extra = [] if subset else sorted(str(k) for k in keys if k not in wanted)
                parts = []
                if missing:
                    parts.append(f"missing keys {missing}")
                if extra:
                    parts.append(f"extra keys {extra}")
                yield None, f"row has {' and '.join(parts)} (columns are {names})"
                continue
            yield getter(item), ""

    def close(self) -> None:
        """Stop the live chunk iterators; the iterable itself belongs to the caller."""
        self._gens.close()


_END = object()


def _chain1(first: Any, it: Iterator[Any]) -> Iterator[Any]:
    """``first``, then the rest of ``it``."""
    yield first
    yield from it


def _getter(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """A function returning the values of ``names`` of a mapping or sequence, as a tuple."""
    if len(names) == 1:
        name = names[0]
        return lambda item: (item[name],)
    if not names:
        return lambda item: ()
    return operator.itemgetter(*names)


class ArraySource:
    """Rows of a numpy array: the first axis is the rows.

    A structured array gives one column per field (``columns`` selects fields); any
    other array gives one column ``"input"`` whose chunks are slices of the array (a
    2-D ``(n, k)`` array gives ``(chunk, k)`` slices). Slices are views: no copy.
    """

    def __init__(self, array: Any, *, columns: Sequence[str] | None = None) -> None:
        """Wrap ``array`` (anything ``numpy.asarray`` accepts with at least one axis)."""
        arr = np.asarray(array)
        if arr.ndim == 0:
            raise SourceError("a 0-dimensional array has no rows")
        names = _check_columns(columns)
        fields = arr.dtype.names
        if fields is None:
            if names not in (None, ["input"]):
                raise SourceError(
                    f"columns={names} given, but the array is not structured: "
                    "its one column is 'input'"
                )
        else:
            missing = [n for n in names or () if n not in fields]
            if missing:
                raise SourceError(
                    f"the array has no field {missing[0]!r}; its fields are {list(fields)}"
                )
        self._array = arr
        self._names: list[str] | None = (
            None if fields is None else (names if names is not None else list(fields))
        )

    def describe(self) -> dict[str, Any]:
        """``{"kind": "numpy", "shape": [...], "dtype": "..."}``."""
        return {"kind": "numpy", "shape": list(self._array.shape), "dtype": str(self._array.dtype)}

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` rows from chunk ``start_chunk`` on (slices, no copy)."""
        _check_args(chunk_size, start_chunk)
        return self._chunks(chunk_size, start_chunk)

    def _chunks(self, chunk_size: int, start_chunk: int) -> Iterator[Chunk]:
        arr = self._array
        for index, start, stop in _spans(len(arr), chunk_size, start_chunk):
            part = arr[start:stop]
            if self._names is None:
                columns: dict[str, Any] = {"input": part}
            else:
                columns = {name: part[name] for name in self._names}
            yield Chunk(index, start, stop - start, columns, list(range(start, stop)))

    def close(self) -> None:
        """Nothing to release."""


class DataFrameSource:
    """Rows of a pandas DataFrame, one column per DataFrame column (``columns`` selects).

    Each column is converted once with ``df[col].to_numpy()`` and sliced per chunk.
    Numeric and bool columns stay numpy arrays (slices, no copy). Columns of dtype
    ``object`` (strings, mixed values, pandas' nullable types with ``NA``) become lists:
    an object array gives no vector speed-up, and a list is what validation and the
    sinks expect for such values (``tolist()`` of an object array only copies
    references, so this costs one pointer per cell). pandas is never imported.
    """

    def __init__(self, df: Any, *, columns: Sequence[str] | None = None) -> None:
        """Wrap the DataFrame ``df``."""
        if not hasattr(df, "columns") or not hasattr(df, "__getitem__"):
            raise SourceError(f"expected a pandas DataFrame, got {type(df).__name__}")
        labels = list(df.columns)
        by_name: dict[str, Any] = {}
        for label in labels:
            name = str(label)
            if name in by_name:
                raise SourceError(f"the DataFrame has more than one column named {name!r}")
            by_name[name] = label
        names = _check_columns(columns)
        if names is not None:
            missing = [n for n in names if n not in by_name]
            if missing:
                raise SourceError(
                    f"the DataFrame has no column {missing[0]!r}; its columns are {list(by_name)}"
                )
        self._df = df
        self._names = names if names is not None else list(by_name)
        self._labels = by_name
        self._rows = len(df)

    def describe(self) -> dict[str, Any]:
        """``{"kind": "pandas", "columns": [...], "rows": n}``."""
        return {"kind": "pandas", "columns": list(self._names), "rows": self._rows}

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` rows from chunk ``start_chunk`` on."""
        _check_args(chunk_size, start_chunk)
        arrays = {name: self._df[self._labels[name]].to_numpy() for name in self._names}
        return self._chunks(arrays, chunk_size, start_chunk)

    def _chunks(self, arrays: dict[str, Any], chunk_size: int, start_chunk: int) -> Iterator[Chunk]:
        for index, start, stop in _spans(self._rows, chunk_size, start_chunk):
            columns = {
                name: (arr[start:stop].tolist() if arr.dtype == object else arr[start:stop])
                for name, arr in arrays.items()
            }
            yield Chunk(index, start, stop - start, columns, list(range(start, stop)))

    def close(self) -> None:
        """Nothing to release: the DataFrame belongs to the caller."""


# -- file sources ----------------------------------------------------------------------


class _FileSource:
    """What the file sources share: the path, ``describe()`` and live iterators."""

    _kind = "file"

    def __new__(cls, path: Any = None, *args: Any, **kwargs: Any) -> Any:
        """A multi-file source (``_files``) when ``path`` names several files: a list of
        paths, a directory or a glob pattern."""
        from . import _files

        many = _files.MANY.get(cls)
        return object.__new__(many if many and _files.names_many(path) else cls)

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str] | None) -> None:
        self._path = Path(os.fspath(path))
        self._columns = _check_columns(columns)
        self._gens = _Generators()

    def _stat(self) -> os.stat_result:
        try:
            st = self._path.stat()
        except OSError as exc:
            raise SourceError(f"cannot read {str(self._path)!r}: {exc.strerror or exc}") from exc
        if not self._path.is_file():
            raise SourceError(f"{str(self._path)!r} is not a file")
        return st

    def describe(self) -> dict[str, Any]:
        """The kind, absolute path, size in bytes and modification time of the file."""
        st = self._stat()
        return {
            "kind": self._kind,
            "path": str(self._path.absolute()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }

    def _open_error(self, exc: OSError) -> SourceError:
        return SourceError(f"cannot read {str(self._path)!r}: {exc.strerror or exc}")

    def close(self) -> None:
        """Close the files of unfinished chunk iterators; calling it again does nothing."""
        self._gens.close()


class CSVSource(_FileSource):
    """A CSV (or TSV) file, streamed with the :mod:`csv` module; values stay strings.

    The first record is the header. A UTF-8 byte order mark is stripped; CRLF line ends
    and quoted fields holding newlines are handled. A record with another number of
    fields than the header, with bytes that are not valid in ``encoding`` (decoded with
    ``errors="surrogateescape"`` and checked per record), or with a NUL character is a
    ``malformed_row``: the run goes on. (Python 3.11+ parses NUL like any character; a
    :class:`csv.Error`, such as a field over ``csv.field_size_limit()``, also becomes a
    ``malformed_row`` and reading resumes at the next line.) An empty file or a header
    alone has no rows.
    """

    _kind = "csv"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        columns: Sequence[str] | None = None,
        delimiter: str = ",",
        encoding: str = "utf-8",
    ) -> None:
        """Read ``path`` (or several files: a list, a directory, a glob pattern, read as
        one input); ``columns`` selects (and orders) the header's columns."""
        super().__init__(path, columns)
        try:
            codec = codecs.lookup(encoding).name
        except LookupError as exc:
            raise SourceError(f"unknown encoding {encoding!r}") from exc
        self._encoding = "utf-8-sig" if codec in ("utf-8", "utf-8-sig") else encoding
        self._delimiter = delimiter

    def describe(self) -> dict[str, Any]:
        """``{"kind": "csv", "path": ..., "size": ..., "mtime_ns": ...}``."""
        return super().describe()

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` records from chunk ``start_chunk`` on.

        Raises :class:`~servekit.SourceError` at once if the file cannot be opened or a
        requested column is not in its header.
        """
        _check_args(chunk_size, start_chunk)
        self._stat()
        with self._open() as f:
            header = self._header(csv.reader(f, delimiter=self._delimiter))
        if header is None:
            return iter(())
        self._plan(header)
        return self._gens.track(self._chunks(chunk_size, start_chunk))

    def _open(self) -> Any:
        try:
            return open(self._path, encoding=self._encoding, errors="surrogateescape", newline="")
        except OSError as exc:
            raise self._open_error(exc) from exc

    def _header(self, reader: Any) -> list[str] | None:
        """The first non-empty record, or ``None`` for a file without one."""
        try:
            for record in reader:
                if record:
                    break
            else:
                return None
        except csv.Error as exc:
            raise SourceError(f"{str(self._path)!r}: cannot parse the header: {exc}") from exc
        bad = _BAD_CHARS.search("".join(record))
        if bad:
            what = "a NUL character" if bad.group() == "\x00" else f"bytes not in {self._encoding}"
            raise SourceError(f"{str(self._path)!r}: the header holds {what}")
        return list(record)

    def _plan(self, header: list[str]) -> tuple[list[str], list[int]]:
        """The column names to read and their positions in a record."""
        names = self._columns if self._columns is not None else header
        positions = []
        for name in names:
            found = [i for i, h in enumerate(header) if h == name]
            if not found:
                raise SourceError(
                    f"{str(self._path)!r} has no column {name!r}; its header is {header}"
                )
            if len(found) > 1:
                raise SourceError(f"{str(self._path)!r} has more than one column {name!r}")
            positions.append(found[0])
        return list(names), positions

    def _chunks(self, chunk_size: int, start_chunk: int) -> Iterator[Chunk]:
        with self._open() as f:
            reader = csv.reader(f, delimiter=self._delimiter)
            header = self._header(reader)
            if header is None:
                return
            names, positions = self._plan(header)
            records = self._records(reader, len(header), positions, start_chunk * chunk_size)
            yield from _chunk_records(records, names, chunk_size, start_chunk)

    def _records(
        self, reader: Any, width: int, positions: list[int], skip: int
    ) -> Iterator[_Record]:
        """Each record after the header (from the ``skip``-th on), parsed and checked."""
        getter: Callable[[list[str]], tuple[Any, ...]]
        if positions == list(range(width)):
            getter = tuple
        elif len(positions) == 1:
            pos = positions[0]
            getter = lambda record: (record[pos],)  # noqa: E731
        else:
            getter = operator.itemgetter(*positions)
        bad_chars = _BAD_CHARS.search
        encoding = self._encoding.removesuffix("-sig")
        count = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if count >= skip:
                    yield None, f"cannot parse the record ending on line {reader.line_num}: {exc}"
                count += 1
                continue
            if not record:
                continue  # an empty line is not a row
            if count < skip:
                count += 1
                continue
            count += 1
            bad = bad_chars("".join(record))
            if bad:
                what = "a NUL character" if bad.group() == "\x00" else f"bytes not in {encoding}"
                yield None, f"the record ending on line {reader.line_num} holds {what}"
            elif len(record) != width:
                yield (
                    None,
                    f"the record ending on line {reader.line_num} has {len(record)} fields; "
                    f"the header has {width}",
                )
            else:
                yield getter(record), ""


class JSONLSource(_FileSource):
    """A JSON Lines file: one JSON object per line.

    Blank lines are ignored and not numbered. A line that is not valid UTF-8, not valid
    JSON, not an object, uses ``NaN``/``Infinity`` (not JSON, though Python's parser
    accepts them), or lacks a column is a ``malformed_row``. The columns are ``columns``
    or the keys of the first good object; extra keys are ignored. A UTF-8 byte order
    mark is accepted.
    """

    _kind = "jsonl"

    def __init__(
        self, path: str | os.PathLike[str], *, columns: Sequence[str] | None = None
    ) -> None:
        """Read ``path`` (or several files: a list, a directory, a glob pattern, read as
        one input); ``columns`` selects (and orders) the keys read from each object."""
        super().__init__(path, columns)

    def describe(self) -> dict[str, Any]:
        """``{"kind": "jsonl", "path": ..., "size": ..., "mtime_ns": ...}``."""
        return super().describe()

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` objects from chunk ``start_chunk`` on.

        Without ``columns``, the file is read up to its first good object first (to
        know the columns). Raises :class:`~servekit.SourceError` at once if the file
        cannot be opened.
        """
        _check_args(chunk_size, start_chunk)
        self._stat()
        names = self._columns
        with self._open() as f:
            if names is None:
                names = []
                for line in _lines(f):
                    obj = _parse_object(line)
                    if isinstance(obj, dict):
                        names = [str(k) for k in obj]
                        break
        return self._gens.track(self._chunks(names, chunk_size, start_chunk))

    def _open(self) -> Any:
        try:
            return open(self._path, "rb")
        except OSError as exc:
            raise self._open_error(exc) from exc

    def _chunks(self, names: list[str], chunk_size: int, start_chunk: int) -> Iterator[Chunk]:
        with self._open() as f:
            lines = _lines(f)
            for _ in range(start_chunk * chunk_size):  # counted, not parsed
                if next(lines, None) is None:
                    return
            records = self._records(lines, names)
            yield from _chunk_records(records, names, chunk_size, start_chunk)

    @staticmethod
    def _records(lines: Iterator[bytes], names: list[str]) -> Iterator[_Record]:
        getter = _getter(names)
        for line in lines:
            obj = _parse_object(line)
            if isinstance(obj, str):
                yield None, obj
                continue
            try:
                yield getter(obj), ""
            except KeyError:
                missing = [n for n in names if n not in obj]
                yield None, f"the object has no key {missing[0]!r} (columns are {names})"


def _lines(f: Any) -> Iterator[bytes]:
    """The non-blank lines of a binary file, with a leading UTF-8 byte order mark removed."""
    first = True
    for line in f:
        if first:
            first = False
            if line.startswith(_UTF8_BOM):
                line = line[len(_UTF8_BOM) :]
        if line.strip():
            yield line


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _parse_object(line: bytes) -> dict[str, Any] | str:
    """The JSON object on ``line``, or a message saying why there is none."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the line is not valid UTF-8 (byte {exc.start})"
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    return obj


def _import_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or :class:`~servekit.SourceError` saying how to
    install them."""
    try:
        import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise SourceError('reading Parquet needs pyarrow: pip install "servekit[parquet]"') from exc
    return pa, pq


class ParquetSource(_FileSource):
    """A Parquet file, streamed with ``pyarrow.parquet.ParquetFile.iter_batches``.

    Record batches are re-cut to exactly ``chunk_size`` rows. A resumed read skips whole
    row groups using the file's metadata and discards the rest of the skipped rows.
    Numeric and bool columns without nulls become numpy arrays (read-only zero-copy views
    of the Arrow buffers where possible); a
    ``fixed_size_list<numeric>[k]`` column without nulls becomes one ``(n, k)`` array
    built from the flat values (no Python object per row: this is the hot path of
    embedding inputs); every other column (strings, variable lists, structs, columns with
    nulls) becomes a list. Row groups are read one at a time (no pre-buffering), so
    memory holds about one row group plus one chunk. A requested column the file lacks raises
    :class:`~servekit.SourceError`; extra columns are not read.
    """

    _kind = "parquet"

    def __init__(
        self, path: str | os.PathLike[str], *, columns: Sequence[str] | None = None
    ) -> None:
        """Read ``path`` (or several files: a list, a directory, a glob pattern, read as
        one input); ``columns`` selects (and orders) the columns read."""
        super().__init__(path, columns)

    def _file(self) -> Any:
        _, pq = _import_pyarrow()
        self._stat()
        try:
            # pre_buffer=True (pyarrow's default) reads every requested row group into
            # memory up front: the whole file. Off, memory still holds a whole column
            # chunk (a row group's column, easily 100 MB) unless reads are buffered:
            # with buffer_size, pages are read and decoded a few at a time, so memory
            # follows the chunk size, not the writer's row group size (BT-05).
            return pq.ParquetFile(self._path, pre_buffer=False, buffer_size=1 << 20)
        except OSError as exc:
            raise self._open_error(exc) from exc
        except Exception as exc:  # pyarrow.ArrowInvalid and friends: not a Parquet file
            raise SourceError(f"{str(self._path)!r} is not a readable Parquet file: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """``{"kind": "parquet", "path", "size", "mtime_ns", "rows"}`` (rows from metadata)."""
        desc = super().describe()
        pf = self._file()
        try:
            desc["rows"] = pf.metadata.num_rows
        finally:
            pf.close()
        return desc

    def _names(self, pf: Any) -> list[str]:
        available = list(pf.schema_arrow.names)
        if self._columns is None:
            return available
        missing = [c for c in self._columns if c not in available]
        if missing:
            raise SourceError(
                f"{str(self._path)!r} has no column {missing[0]!r}; its columns are {available}"
            )
        return list(self._columns)

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of exactly ``chunk_size`` rows (the last may be shorter).

        Raises :class:`~servekit.SourceError` at once if pyarrow is missing, the file
        cannot be opened or is not Parquet, or a requested column is missing.
        """
        _check_args(chunk_size, start_chunk)
        pf = self._file()
        try:
            names = self._names(pf)
            n_rows = pf.metadata.num_rows
        finally:
            pf.close()
        if n_rows <= start_chunk * chunk_size:
            return iter(())
        return self._gens.track(self._chunks(names, chunk_size, start_chunk))

    def _chunks(self, names: list[str], chunk_size: int, start_chunk: int) -> Iterator[Chunk]:
        pf = self._file()
        try:
            skip = start_chunk * chunk_size
            meta = pf.metadata
            first_group, before = 0, 0
            while first_group < meta.num_row_groups:
                n = meta.row_group(first_group).num_rows
                if before + n > skip:
                    break
                before += n
                first_group += 1
            drop = skip - before
            batches = pf.iter_batches(
                batch_size=chunk_size,
                row_groups=list(range(first_group, meta.num_row_groups)),
                columns=names,
            )

            def after_skip(drop: int) -> Iterator[Any]:
                for batch in _reraise(batches, self._path):
                    if drop:
                        if batch.num_rows <= drop:
                            drop -= batch.num_rows
                            continue
                        batch = batch.slice(drop)
                        drop = 0
                    yield batch

            yield from rechunk(after_skip(drop), chunk_size, start_chunk, skip, names)
        finally:
            pf.close()


def _reraise(batches: Iterator[Any], path: Path) -> Iterator[Any]:
    """``batches``, with a failure to read the file turned into a SourceError."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow.ArrowException, OSError: a corrupt file
            raise SourceError(f"cannot read {str(path)!r}: {exc}") from exc
        yield batch


def rechunk(
    batches: Iterable[Any], chunk_size: int, index: int, start: int, names: list[str]
) -> Iterator[Chunk]:
    """Chunks of exactly ``chunk_size`` rows (the last may be shorter) from Arrow record
    batches of any sizes; the first is chunk ``index``, starting at row ``start``."""
    pa, _ = _import_pyarrow()
    pending: list[Any] = []
    pending_rows = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= chunk_size:
            table = pa.Table.from_batches(pending)
            yield _arrow_chunk(index, start, table.slice(0, chunk_size), names)
            pending = table.slice(chunk_size).to_batches()
            pending_rows -= chunk_size
            index += 1
            start += chunk_size
    if pending_rows:
        yield _arrow_chunk(index, start, pa.Table.from_batches(pending), names)


def _arrow_chunk(index: int, start: int, table: Any, names: list[str]) -> Chunk:
    """A chunk of good rows from an Arrow table slice."""
    n = table.num_rows
    columns = {name: _arrow_column(table.column(name)) for name in names}
    return Chunk(index, start, n, columns, list(range(start, start + n)))


def _numpy_dtype(pa: Any, t: Any) -> np.dtype[Any] | None:
    """The numpy dtype of an Arrow integer, float or bool type; ``None`` for others."""
    types = pa.types
    if types.is_boolean(t):
        return np.dtype(np.bool_)
    if types.is_integer(t):
        kind = "i" if types.is_signed_integer(t) else "u"
        return np.dtype(f"<{kind}{t.bit_width // 8}")
    if types.is_floating(t):
        return np.dtype(f"<f{t.bit_width // 8}")
    return None


def _to_numpy(arr: Any, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """A null-free primitive Arrow array as numpy: a read-only zero-copy view of its data
    buffer (bools are unpacked from bits).

    Arrow's own ``to_numpy`` would do the same, but it imports pandas on first use
    (about 50 MiB and half a second), which the reading path does not need.
    """
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype)
    buf = arr.buffers()[1]
    if dtype == np.bool_:
        bits = np.frombuffer(buf, np.uint8)
        return np.unpackbits(bits, bitorder="little")[arr.offset : arr.offset + n].view(np.bool_)
    return np.frombuffer(buf, dtype, count=n, offset=arr.offset * dtype.itemsize)


def _arrow_column(col: Any) -> Any:
    """An Arrow chunked column as a numpy array (numeric, fixed-size numeric lists) or a
    list (everything else)."""
    import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

    t = col.type
    if col.null_count == 0:
        dtype = _numpy_dtype(pa, t)
        if dtype is not None:
            parts = [_to_numpy(c, dtype) for c in col.chunks]
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts) if parts else np.empty(0, dtype)
        if pa.types.is_fixed_size_list(t):
            dtype = _numpy_dtype(pa, t.value_type)
            k = t.list_size
            flats = [c.flatten() for c in col.chunks]
            if dtype is not None and all(f.null_count == 0 for f in flats):
                parts = [
                    _to_numpy(f, dtype).reshape(len(c), k)
                    for f, c in zip(flats, col.chunks, strict=True)
                ]
                if len(parts) == 1:
                    return parts[0]
                return np.concatenate(parts) if parts else np.empty((0, k), dtype)
    return col.to_pylist()


# -- SQL -------------------------------------------------------------------------------


class SQLSource:
    """Rows of a query over any DB-API 2.0 connection (sqlite3, DuckDB, psycopg, ...).

    ``chunks()`` runs ``cursor.execute(query, params)`` on a new cursor, takes the
    column names from ``cursor.description`` and fetches ``chunk_size`` rows at a time
    with ``fetchmany``; skipped chunks are fetched and discarded. Columns are lists.
    :meth:`close` closes the cursors, never the connection: the caller owns it. A query
    that fails raises :class:`~servekit.SourceError` (with the driver's error as its
    cause). The query must return the same rows in the same order on every run for a
    resume to be exact: give it an ``ORDER BY``.

    **Key ranges** (for :class:`~servekit.batch.DaskRunner` and
    :class:`~servekit.batch.RayRunner`): with ``connect`` (a picklable zero-argument
    callable returning a new DB-API connection, such as
    ``functools.partial(sqlite3.connect, path)``) and ``partition_key`` (a column of the
    query whose values are unique and never NULL), the rows are numbered in key order
    (the query runs as ``SELECT * FROM (query) ORDER BY key``, here and on workers), and
    a distributed run splits them into key ranges that each worker reads through its
    own connection: ``WHERE key >= ? AND key < ?``, the bounds bound as parameters.
    ``connection`` may then be omitted: the source opens one from ``connect`` when it
    is read on the driver, and closes it in :meth:`close`. ``params`` must then be a
    sequence (positional placeholders).
    """

    def __init__(
        self,
        connection: Any = None,
        query: str = "",
        params: Sequence[Any] | Mapping[str, Any] = (),
        *,
        connect: Callable[[], Any] | None = None,
        partition_key: str | None = None,
    ) -> None:
        """Read the rows of ``query`` (with ``params``) from ``connection``; with
        ``connect`` and ``partition_key``, in key ranges on a cluster's workers."""
        if not isinstance(query, str) or not query:
            raise SourceError(f"query must be a non-empty str, got {query!r}")
        if (connect is None) != (partition_key is None):
            raise SourceError("connect and partition_key go together: give both or neither")
        if connect is not None and not callable(connect):
            raise SourceError(f"connect must be a callable, got {type(connect).__name__}")
        if partition_key is not None:
            if not isinstance(partition_key, str) or not partition_key:
                raise SourceError(f"partition_key must be a column name, got {partition_key!r}")
            if isinstance(params, Mapping):
                raise SourceError(
                    "key ranges bind their bounds as positional parameters: give params "
                    "as a sequence, not a mapping"
                )
        self._connection = connection
        self._own_connection: Any = None
        self._connect = connect
        self._partition_key = partition_key
        self._query = query
        self._params = params
        self._cursors: list[Any] = []
        self._gens = _Generators()

    def describe(self) -> dict[str, Any]:
        """``{"kind": "sql", "query": query, "params": [...]}`` (parameters as their
        ``repr``, so a resume with other parameters is refused)."""
        params = self._params
        shown = (
            {str(k): repr(v) for k, v in params.items()}
            if isinstance(params, dict)
            else [repr(v) for v in params]
        )
        described: dict[str, Any] = {"kind": "sql", "query": self._query, "params": shown}
        if self._partition_key is not None:
            described["partition_key"] = self._partition_key
        return described

    def _open(self) -> Any:
        """The connection to read with on the driver (opened from ``connect`` once)."""
        if self._connection is not None:
            return self._connection
        if self._connect is None:
            raise SourceError("no connection to read from: give one (or connect=)")
        if self._own_connection is None:
            try:
                self._own_connection = self._connect()
            except Exception as exc:
                raise SourceError(f"connect() failed: {exc}") from exc
        return self._own_connection

    def _statement(self, connection: Any) -> tuple[str, Sequence[Any] | Mapping[str, Any]]:
        """The query and parameters the rows are read with (in key order with a key)."""
        if self._partition_key is None:
            return self._query, self._params
        return key_range_query(connection, self._query, self._partition_key, False, False), (
            list(self._params)
        )

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` rows from chunk ``start_chunk`` on."""
        _check_args(chunk_size, start_chunk)
        connection = self._open()
        query, params = self._statement(connection)
        cursor, names = sql_cursor(connection, query, params)
        self._cursors.append(cursor)
        return self._gens.track(self._chunks(cursor, names, chunk_size, start_chunk))

    def _chunks(
        self, cursor: Any, names: list[str], chunk_size: int, start_chunk: int
    ) -> Iterator[Chunk]:
        try:
            for _ in range(start_chunk):
                if len(cursor.fetchmany(chunk_size)) < chunk_size:
                    return
            index, start = start_chunk, start_chunk * chunk_size
            while True:
                rows = cursor.fetchmany(chunk_size)
                n = len(rows)
                if not n:
                    return
                columns = {
                    name: list(col)
                    for name, col in zip(names, zip(*rows, strict=True), strict=True)
                }
                yield Chunk(index, start, n, columns, list(range(start, start + n)))
                if n < chunk_size:
                    return
                index += 1
                start += n
        finally:
            self._close_cursor(cursor)

    def _close_cursor(self, cursor: Any) -> None:
        if cursor in self._cursors:
            self._cursors.remove(cursor)
            try:
                cursor.close()
            except Exception:  # a closed connection: nothing left to release
                pass

    def close(self) -> None:
        """Close the cursors this source opened, and the connection it opened from
        ``connect`` (never a connection it was given)."""
        self._gens.close()
        for cursor in list(self._cursors):
            self._close_cursor(cursor)
        own, self._own_connection = self._own_connection, None
        if own is not None:
            with contextlib.suppress(Exception):
                own.close()


def _placeholder(connection: Any) -> str:
    """The positional placeholder of ``connection``'s driver (its module's
    ``paramstyle``: ``?`` for qmark, as sqlite3 and DuckDB; ``%s`` for format and
    pyformat, as psycopg)."""
    module = sys.modules.get(type(connection).__module__.split(".")[0].lstrip("_"))
    style = getattr(module, "paramstyle", "qmark")
    if style in ("format", "pyformat"):
        return "%s"
    if style == "qmark":
        return "?"
    raise SourceError(
        f"key ranges need a driver with positional placeholders (qmark or format), not {style!r}"
    )


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (a quote in it doubled)."""
    return '"' + name.replace('"', '""') + '"'


def key_range_query(connection: Any, query: str, key: str, low: bool, high: bool) -> str:
    """``query`` as a subquery restricted to ``key >= ?`` (``low``) and ``key < ?``
    (``high``), in key order; the bounds are parameters after the query's own."""
    column = quote_identifier(key)
    mark = _placeholder(connection)
    where = [f"{column} >= {mark}"] * low + [f"{column} < {mark}"] * high
    restrict = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT * FROM ({query}) AS servekit_rows{restrict} ORDER BY {column}"


def sql_cursor(
    connection: Any, query: str, params: Sequence[Any] | Mapping[str, Any]
) -> tuple[Any, list[str]]:
    """A cursor of ``connection`` that ran ``query``, and its column names."""
    try:
        cursor = connection.cursor()
    except Exception as exc:
        raise SourceError(f"cannot open a cursor: {exc}") from exc
    try:
        cursor.execute(query, params)
        if cursor.description is None:
            raise SourceError("the query returns no rows (it is not a SELECT)")
        names = [str(d[0]) for d in cursor.description]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SourceError(f"the query returns more than one column named {dupes[0]!r}")
    except BaseException as exc:
        with contextlib.suppress(Exception):
            cursor.close()
        if isinstance(exc, SourceError) or not isinstance(exc, Exception):
            raise
        raise SourceError(f"the query failed: {exc}") from exc
    return cursor, names


# -- dispatch --------------------------------------------------------------------------

_SUFFIXES: dict[str, Callable[[Path, list[str] | None], Source]] = {
    ".csv": lambda p, c: CSVSource(p, columns=c),
    ".tsv": lambda p, c: CSVSource(p, columns=c, delimiter="\t"),
    ".jsonl": lambda p, c: JSONLSource(p, columns=c),
    ".ndjson": lambda p, c: JSONLSource(p, columns=c),
    ".parquet": lambda p, c: ParquetSource(p, columns=c),
    ".pq": lambda p, c: ParquetSource(p, columns=c),
}


def open_source(obj: Any, *, columns: Sequence[str] | None = None) -> Source:
    """The :class:`~servekit.batch.Source` reading ``obj``.

    * a :class:`~servekit.batch.Source`: returned as is (``columns`` is not applied);
    * a path (``str`` or ``os.PathLike``), by suffix: ``.csv``, ``.tsv``, ``.jsonl`` /
      ``.ndjson``, ``.parquet`` / ``.pq``;
    * a numpy array: :class:`ArraySource`; a pandas DataFrame: :class:`DataFrameSource`;
    * any other iterable (not ``str``, ``bytes`` or a mapping): :class:`IterableSource`.

    ``columns`` selects (and orders) the columns read. Anything else raises
    :class:`~servekit.SourceError`.
    """
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, str | os.PathLike):
        from . import _files

        if _files.names_many(obj):  # a directory or a glob pattern
            return _files.open_files(obj, _check_columns(columns))
        path = Path(os.fspath(obj))
        make = _SUFFIXES.get(path.suffix.lower())
        if make is None:
            raise SourceError(
                f"cannot tell the format of {str(obj)!r} from its suffix; supported: "
                f"{', '.join(_SUFFIXES)} (or pass a Source such as CSVSource)"
            )
        return make(path, _check_columns(columns))
    if isinstance(obj, np.ndarray):
        return ArraySource(obj, columns=columns)
    if type(obj).__module__.startswith("pandas") and hasattr(obj, "columns"):
        return DataFrameSource(obj, columns=columns)
    if isinstance(obj, bytes | bytearray | memoryview | Mapping):
        raise SourceError(
            f"a {type(obj).__name__} is not a batch input; pass a path, an array, a "
            "DataFrame, a list of rows or a Source"
        )
    if isinstance(obj, Iterable):
        return IterableSource(obj, columns=columns)
    raise SourceError(
        f"cannot read a {type(obj).__name__} as a batch input; pass a path, an array, a "
        "DataFrame, an iterable of rows or a Source"
    )
