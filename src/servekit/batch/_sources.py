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

This module holds the in-memory sources and :func:`open_source`; the file sources are in
``_textsources`` (CSV, JSON Lines) and ``_parquetsource``, the SQL source in
``_sqlsource``, and what they share in ``_sourcebase``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ._parquetsource import ParquetSource
from ._sourcebase import (
    _check_args,
    _check_columns,
    _chunk_records,
    _Generators,
    _getter,
    _Record,
    _spans,
)
from ._textsources import CSVSource, JSONLSource
from ._types import Chunk, Source

__all__ = ["ArraySource", "DataFrameSource", "IterableSource", "open_source"]


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
