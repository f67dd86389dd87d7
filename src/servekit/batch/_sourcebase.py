"""What every source shares: argument checks, parsed rows grouped into chunks, the
live chunk iterators, and the base class of the file sources.

The rules every source follows are in ``_sources``.
"""

from __future__ import annotations

import operator
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import SourceError
from ._types import Chunk, RowError

__all__: list[str] = []

_MALFORMED = "malformed_row"

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


def _getter(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """A function returning the values of ``names`` of a mapping or sequence, as a tuple."""
    if len(names) == 1:
        name = names[0]
        return lambda item: (item[name],)
    if not names:
        return lambda item: ()
    return operator.itemgetter(*names)


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
