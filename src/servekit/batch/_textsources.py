"""CSV and JSON Lines files, streamed and parsed record by record.

The rules every source follows are in ``_sources``; several files read as one input
are ``_files``' ``CSVFiles`` and ``JSONLFiles``.
"""

from __future__ import annotations

import codecs
import csv
import json
import operator
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import SourceError
from ._sourcebase import _check_args, _chunk_records, _FileSource, _getter, _Record
from ._types import Chunk

__all__ = ["CSVSource", "JSONLSource"]

_UTF8_BOM = codecs.BOM_UTF8
#: A NUL character, or a lone surrogate left by ``errors="surrogateescape"`` decoding
#: (a byte that is not valid UTF-8).
_BAD_CHARS = re.compile("[\x00\udc80-\udcff]")


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
