"""Parquet files through pyarrow (imported only when a file is read), and the
re-cutting of Arrow record batches into chunks that ``_files`` shares.

The rules every source follows are in ``_sources``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from ._sourcebase import _check_args, _FileSource
from ._types import Chunk

__all__ = ["ParquetSource"]


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
