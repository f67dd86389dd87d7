"""Batch outputs: JSON Lines, CSV and Parquet files, SQL tables, callables and lists.

Every sink implements :class:`~servekit.batch._types.Sink`. The decisions:

File sinks (``JSONLSink``, ``CSVSink``, ``ParquetSink``)
    Part files, resume and the atomic publish: see ``_filesinks``, which holds them.

``SQLSink``
    A staging table, checkpoints and the publish transaction: see ``_sqlsink``.

:class:`CallableSink` / :class:`ListSink`
    Row dicts via :func:`columns_to_rows` (numpy values stay numpy; a row of a 2-D column
    is that row's 1-D array). They cannot resume: ``open`` always returns ``set()``.
    ``CallableSink`` does not call its function for a chunk with no rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servekit.batch._filesinks import CSVSink, JSONLSink, ParquetSink, _PartFileSink
from servekit.batch._sinkbase import _check_lengths
from servekit.batch._types import Sink

__all__ = ["CallableSink", "ListSink", "columns_to_rows", "open_sink"]


def columns_to_rows(columns: dict[str, Any], n_rows: int) -> list[dict[str, Any]]:
    """Turn columns (name -> list or numpy array with rows first) into ``n_rows`` dicts.

    Values are not converted: numpy values stay numpy, and a row of a 2-D column is that
    row's 1-D array. Raises ``ValueError`` if a column does not have ``n_rows`` values.
    """
    _check_lengths(columns, n_rows)
    names = list(columns)
    cols = [columns[name] for name in names]
    return [{name: col[i] for name, col in zip(names, cols, strict=True)} for i in range(n_rows)]


# --------------------------------------------------------------------------- in memory


class CallableSink:
    """Calls ``fn(rows)`` with each non-empty chunk's rows as a list of dicts."""

    def __init__(self, fn: Callable[[list[dict[str, Any]]], Any]) -> None:
        """Deliver rows to ``fn``."""
        self.fn = fn

    def open(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> set[int]:
        """Nothing to prepare; cannot resume, so always ``set()``."""
        return set()

    def write_chunk(self, index: int, columns: dict[str, Any], n_rows: int) -> None:
        """Call the function with the chunk's rows (not for an empty chunk)."""
        if n_rows:
            self.fn(columns_to_rows(columns, n_rows))

    def finish(self) -> None:
        """Nothing to publish."""

    def close(self) -> None:
        """Nothing to release."""


class ListSink:
    """Appends row dicts to ``self.rows`` (numpy values stay numpy)."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        """Append to ``rows``, or to a new list."""
        self.rows: list[dict[str, Any]] = rows if rows is not None else []

    def open(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> set[int]:
        """Nothing to prepare; cannot resume, so always ``set()``."""
        return set()

    def write_chunk(self, index: int, columns: dict[str, Any], n_rows: int) -> None:
        """Append the chunk's rows."""
        self.rows.extend(columns_to_rows(columns, n_rows))

    def finish(self) -> None:
        """Nothing to publish."""

    def close(self) -> None:
        """Nothing to release."""


_SUFFIXES: dict[str, type[_PartFileSink]] = {
    ".jsonl": JSONLSink,
    ".ndjson": JSONLSink,
    ".csv": CSVSink,
    ".parquet": ParquetSink,
    ".pq": ParquetSink,
}


def open_sink(obj: Any) -> Sink:
    """A :class:`Sink` for ``obj``: a sink as is; a path by suffix (``.jsonl``,
    ``.ndjson``, ``.csv``, ``.parquet``, ``.pq``); a list -> :class:`ListSink`; a
    callable -> :class:`CallableSink`. ``ValueError`` for an unknown suffix,
    ``TypeError`` for anything else."""
    if isinstance(obj, Sink):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if isinstance(path, bytes):
            raise TypeError("output paths must be str or os.PathLike[str], not bytes")
        suffix = Path(path).suffix.lower()
        cls = _SUFFIXES.get(suffix)
        if cls is None:
            raise ValueError(
                f"cannot tell the output format of {path!r} (suffix {suffix!r}); "
                f"supported suffixes: {', '.join(_SUFFIXES)}"
            )
        return cls(path)
    if isinstance(obj, list):
        return ListSink(obj)
    if callable(obj):
        return CallableSink(obj)
    raise TypeError(
        f"cannot write batch output to a {type(obj).__name__}: pass a path, a list, "
        "a callable or a Sink"
    )
