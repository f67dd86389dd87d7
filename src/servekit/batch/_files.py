"""Multi-file inputs: a directory, a glob pattern or a list of files read as one input.

``ParquetSource``, ``CSVSource`` and ``JSONLSource`` given several files (a list of
paths, a directory, or a pattern such as ``"data/*.parquet"``) become the multi-file
sources of this module (``ParquetFiles``, ``CSVFiles``, ``JSONLFiles``: subclasses, so
they are still a ``ParquetSource``...). The rules:

* **Which files.** A list names them; a directory means the files directly in it whose
  suffix is one of the format's (``.parquet``/``.pq``, ``.csv``/``.tsv``,
  ``.jsonl``/``.ndjson``), except names starting with ``.`` or ``_`` (``_SUCCESS``,
  ``_metadata``); a pattern is expanded by :func:`glob.glob` (``**`` recurses; names
  starting with ``.`` are not matched by ``*``). The files are looked up once, when the
  source is first described or read, and kept: the run reads the set it recorded.
  They are read in sorted order (of their absolute paths). No file is a
  :class:`~servekit.SourceError`, and so is a path named twice.
* **Rows** are numbered across the files: the first row of a file follows the last row
  of the file before it, so chunks (``chunk_size`` rows, as everywhere) may span two
  files, row numbers are stable for the same set of files, and key columns, per-row
  errors and resume work as for one file.
* **Schemas.** Parquet files must have the read columns with the same Arrow types; CSV
  files the same header (with ``columns``: each file must have those columns); the first
  file that differs is named in a :class:`~servekit.SourceError`, raised before any row
  is read. JSON Lines files take their columns from the first good object of the first
  file that has one; an object of a later file without them is a ``malformed_row``.
  An empty CSV file (no header) or an empty JSON Lines file holds no rows.
* **Identity.** ``describe()`` lists every file with its size and modification time
  (and Parquet row count), so a resume after a file was added, removed or changed is
  refused with :class:`~servekit.ResumeMismatch`.
* **Streaming.** A local read opens one file at a time; memory is what one file's read
  takes (the chunk size, as for one file).
* **Distributed runs** (``plan_files``): partitions start at the chunk holding each
  file's first row, and large files are cut further into ranges of chunks; a worker
  reads a partition's files from the chunk it starts at (Parquet: jumping to the row
  group from the footer; CSV and JSON Lines: the byte ranges the driver noted).
* **root=** (``confine``): every matched file, its real path included (symbolic links),
  must be inside the root: :class:`~servekit.UnsafePath` otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import itertools
import math
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import SourceError, UnsafePath
from ._parquetsource import ParquetSource, _import_pyarrow, _reraise, rechunk
from ._partitions import (
    Partition,
    _binary_lines,
    _LoneCR,
    _Reader,
    csv_record_starts,
    default_partitions,
)
from ._sourcebase import _check_args, _chunk_records, _FileSource, _Record
from ._textsources import _UTF8_BOM, CSVSource, JSONLSource, _lines, _parse_object
from ._types import Chunk

__all__ = ["CSVFiles", "JSONLFiles", "ParquetFiles", "confine", "names_many", "plan_files"]

_MAGIC = frozenset("*?[")
_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".tsv"),
    "jsonl": (".jsonl", ".ndjson"),
}


def names_many(obj: Any) -> bool:
    """True if ``obj`` names several files: a list or tuple of paths, a directory, or a
    glob pattern (a path holding ``*``, ``?`` or ``[`` that is not an existing file)."""
    if isinstance(obj, list | tuple):
        return all(isinstance(p, str | os.PathLike) for p in obj)
    if not isinstance(obj, str | os.PathLike):
        return False
    text = os.fspath(obj)
    if not isinstance(text, str):
        return False
    if os.path.isdir(text):
        return True
    return bool(_MAGIC.intersection(text)) and not os.path.isfile(text)


def format_of(obj: str | os.PathLike[str]) -> str | None:
    """The format (``"parquet"``, ``"csv"``, ``"jsonl"``) of a directory or pattern, from
    the pattern's suffix or the matched files' suffixes; None if they do not tell."""
    suffix = Path(os.fspath(obj)).suffix.lower()
    for kind, suffixes in _SUFFIXES.items():
        if suffix in suffixes:
            return kind
    files = _expand(obj, tuple(s for group in _SUFFIXES.values() for s in group))
    kinds = {k for f in files for k, group in _SUFFIXES.items() if f.suffix.lower() in group}
    return kinds.pop() if len(kinds) == 1 else None


def _expand(spec: Any, suffixes: tuple[str, ...]) -> list[Path]:
    """The files ``spec`` names, sorted by absolute path (SourceError if none)."""
    if isinstance(spec, list | tuple):
        files = [Path(os.path.abspath(os.fspath(p))) for p in spec]
        what = f"the list of {len(files)} paths"
        twice = sorted({str(f) for f in files if files.count(f) > 1})
        if twice:
            raise SourceError(f"{twice[0]!r} is named more than once in the list of files")
    else:
        text = os.fspath(spec)
        if os.path.isdir(text):
            what = f"the directory {text!r} (files ending in {', '.join(suffixes)})"
            files = [
                Path(os.path.abspath(entry.path))
                for entry in os.scandir(text)
                if entry.name[:1] not in (".", "_")
                and entry.name.lower().endswith(suffixes)
                and entry.is_file()
            ]
        else:
            what = f"the pattern {text!r}"
            matched = glob.glob(text, recursive=True)
            files = [Path(os.path.abspath(p)) for p in matched if os.path.isfile(p)]
    if not files:
        raise SourceError(f"no input files: {what} matches none")
    return sorted(files, key=str)


def _display(spec: Any) -> str:
    if isinstance(spec, list | tuple):
        return f"[{', '.join(os.fspath(p) for p in spec[:3])}{', ...' if len(spec) > 3 else ''}]"
    return str(os.fspath(spec))


class _Many:
    """What the multi-file sources share: the file list (looked up once), confinement
    to a root, and the per-file identity for ``describe()``."""

    _kind: str
    _spec: Any
    _files: list[Path] | None
    _root: Path | None

    def _setup(self, spec: Any) -> None:
        self._spec = list(spec) if isinstance(spec, list | tuple) else spec
        self._files = None
        self._root = None

    def files(self) -> list[Path]:
        """The input files, in reading order (looked up on first use, then kept)."""
        if self._files is None:
            files = _expand(self._spec, _SUFFIXES[self._kind])
            if self._root is not None:
                for f in files:
                    _check_inside(f, self._root)
            for f in files:
                if not f.is_file():
                    raise SourceError(f"cannot read {str(f)!r}: it is not a file")
            self._files = files
        return self._files

    def _identity(self) -> list[dict[str, Any]]:
        out = []
        for f in self.files():
            try:
                st = f.stat()
            except OSError as exc:
                raise SourceError(f"cannot read {str(f)!r}: {exc.strerror or exc}") from exc
            out.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out


def _check_inside(path: Path, root: Path) -> None:
    base = Path(os.path.abspath(root))
    real_base = Path(os.path.realpath(base))
    if not (
        Path(os.path.abspath(path)).is_relative_to(base)
        and Path(os.path.realpath(path)).is_relative_to(real_base)
    ):
        raise UnsafePath(
            f"{str(path)!r} is outside the batch root {str(root)!r}; every input file "
            "must be inside it"
        )


def confine(source: Any, root: str | os.PathLike[str]) -> None:
    """Make a multi-file ``source`` refuse (UnsafePath) any file outside ``root``, now;
    other sources are left as they are."""
    if isinstance(source, _Many):
        source._root = Path(os.fspath(root))
        source._files = None
        source.files()


# -- Parquet ---------------------------------------------------------------------------


class ParquetFiles(_Many, ParquetSource):
    """Several Parquet files read as one input (see the module docs)."""

    _kind = "parquet"

    def __init__(self, path: Any, *, columns: Sequence[str] | None = None) -> None:
        """Read the files ``path`` names; ``columns`` selects (and orders) the columns."""
        ParquetSource.__init__(self, _display(path), columns=columns)
        self._setup(path)
        self._meta: tuple[list[str], list[int]] | None = None

    def _check(self) -> tuple[list[str], list[int]]:
        """The columns read and each file's row count, checking every file's schema."""
        if self._meta is not None:
            return self._meta
        _, pq = _import_pyarrow()
        names: list[str] | None = None
        types: list[Any] = []
        rows: list[int] = []
        first = ""
        for f in self.files():
            try:
                pf = pq.ParquetFile(f)
            except OSError as exc:
                raise SourceError(f"cannot read {str(f)!r}: {exc.strerror or exc}") from exc
            except Exception as exc:
                raise SourceError(f"{str(f)!r} is not a readable Parquet file: {exc}") from exc
            try:
                schema = pf.schema_arrow
                rows.append(pf.metadata.num_rows)
            finally:
                pf.close()
            available = list(schema.names)
            wanted = self._columns if self._columns is not None else available
            missing = [c for c in wanted if c not in available]
            if missing:
                raise SourceError(
                    f"{str(f)!r} has no column {missing[0]!r}; its columns are {available}"
                )
            these = [schema.field(c).type for c in wanted]
            if names is None:
                names, types, first = list(wanted), these, str(f)
            elif wanted != names or these != types:
                raise SourceError(
                    f"{str(f)!r} does not have the schema of {first!r}: "
                    f"{_schema(wanted, these)} against {_schema(names, types)}"
                )
        assert names is not None
        self._meta = (names, rows)
        return self._meta

    def describe(self) -> dict[str, Any]:
        """``{"kind": "parquet", "files": [{path, size, mtime_ns, rows}...], "rows": n}``."""
        identity = self._identity()
        _, rows = self._check()
        for entry, n in zip(identity, rows, strict=True):
            entry["rows"] = n
        return {"kind": "parquet", "files": identity, "rows": sum(rows)}

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of exactly ``chunk_size`` rows across the files (the last may be shorter)."""
        _check_args(chunk_size, start_chunk)
        names, rows = self._check()
        if sum(rows) <= start_chunk * chunk_size:
            return iter(())
        chunks = parquet_chunks(self.files(), rows, names, chunk_size, start_chunk)
        return self._gens.track(chunks)


def _schema(names: list[str], types: list[Any]) -> str:
    return "{" + ", ".join(f"{n}: {t}" for n, t in zip(names, types, strict=True)) + "}"


def parquet_chunks(
    files: list[Path], rows: list[int], names: list[str], chunk_size: int, start_chunk: int
) -> Generator[Chunk, None, None]:
    """The chunks of ``files`` (with ``rows`` rows each) from ``start_chunk`` on: whole
    files and row groups before it are skipped from the footers."""
    pa, _ = _import_pyarrow()
    skip = start_chunk * chunk_size

    def batches() -> Iterator[Any]:
        before = 0
        for path, n in zip(files, rows, strict=True):
            if before + n > skip:
                for batch in _file_batches(path, n, names, chunk_size, max(0, skip - before)):
                    yield pa.RecordBatch.from_arrays(batch.columns, names=names)
            before += n

    yield from rechunk(batches(), chunk_size, start_chunk, skip, names)


def _file_batches(
    path: Path, n_rows: int, names: list[str], batch_size: int, drop: int
) -> Iterator[Any]:
    """The record batches of one file, from its row ``drop`` on."""
    source = ParquetSource(path, columns=names)
    pf = source._file()
    try:
        meta = pf.metadata
        if meta.num_rows != n_rows:
            raise SourceError(
                f"{str(path)!r} has {meta.num_rows} rows, not the {n_rows} it had when the "
                "run started: the input changed"
            )
        group = 0
        while group < meta.num_row_groups and meta.row_group(group).num_rows <= drop:
            drop -= meta.row_group(group).num_rows
            group += 1
        batches = pf.iter_batches(
            batch_size=batch_size, row_groups=list(range(group, meta.num_row_groups)), columns=names
        )
        for batch in _reraise(batches, path):
            if drop:
                if batch.num_rows <= drop:
                    drop -= batch.num_rows
                    continue
                batch, drop = batch.slice(drop), 0
            if batch.num_rows:
                yield batch
    finally:
        pf.close()


# -- CSV -------------------------------------------------------------------------------


class CSVFiles(_Many, CSVSource):
    """Several CSV files read as one input (see the module docs)."""

    _kind = "csv"

    def __init__(
        self,
        path: Any,
        *,
        columns: Sequence[str] | None = None,
        delimiter: str = ",",
        encoding: str = "utf-8",
    ) -> None:
        """Read the files ``path`` names; ``columns`` selects (and orders) the columns."""
        CSVSource.__init__(
            self, _display(path), columns=columns, delimiter=delimiter, encoding=encoding
        )
        self._setup(path)

    def one(self, path: Path) -> CSVSource:
        """A single-file source of one of the files, with this source's settings."""
        return CSVSource(
            path, columns=self._columns, delimiter=self._delimiter, encoding=self._encoding
        )

    def describe(self) -> dict[str, Any]:
        """``{"kind": "csv", "files": [{path, size, mtime_ns}...]}``."""
        return {"kind": "csv", "files": self._identity()}

    def headers(self) -> tuple[list[str], list[tuple[int, list[int]] | None]]:
        """The columns read, and each file's (width, positions), or None for a file
        without a header; SourceError naming the first file whose header differs."""
        names: list[str] | None = None
        header0: list[str] = []
        first = ""
        plans: list[tuple[int, list[int]] | None] = []
        for f in self.files():
            one = self.one(f)
            with one._open() as handle:
                header = one._header(csv.reader(handle, delimiter=self._delimiter))
            if header is None:
                plans.append(None)
                continue
            these, positions = one._plan(header)
            if names is None:
                names, header0, first = these, header, str(f)
            elif self._columns is None and header != header0:
                raise SourceError(
                    f"{str(f)!r} does not have the header of {first!r}: {header} against {header0}"
                )
            plans.append((len(header), positions))
        return (names if names is not None else list(self._columns or [])), plans

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` records across the files, from chunk ``start_chunk``
        on (the records before it are parsed and dropped)."""
        _check_args(chunk_size, start_chunk)
        names, plans = self.headers()
        if all(p is None for p in plans):
            return iter(())
        return self._gens.track(self._chunks_of(names, plans, chunk_size, start_chunk))

    def _chunks_of(
        self,
        names: list[str],
        plans: list[tuple[int, list[int]] | None],
        chunk_size: int,
        start_chunk: int,
    ) -> Iterator[Chunk]:
        records = itertools.islice(self._all_records(plans), start_chunk * chunk_size, None)
        yield from _chunk_records(records, names, chunk_size, start_chunk)

    def _all_records(self, plans: list[tuple[int, list[int]] | None]) -> Iterator[_Record]:
        for f, plan in zip(self.files(), plans, strict=True):
            if plan is None:
                continue
            one = self.one(f)
            with one._open() as handle:
                reader = csv.reader(handle, delimiter=self._delimiter)
                one._header(reader)
                yield from one._records(reader, plan[0], plan[1], 0)


# -- JSON Lines ------------------------------------------------------------------------


class JSONLFiles(_Many, JSONLSource):
    """Several JSON Lines files read as one input (see the module docs)."""

    _kind = "jsonl"

    def __init__(self, path: Any, *, columns: Sequence[str] | None = None) -> None:
        """Read the files ``path`` names; ``columns`` selects (and orders) the keys."""
        JSONLSource.__init__(self, _display(path), columns=columns)
        self._setup(path)

    def describe(self) -> dict[str, Any]:
        """``{"kind": "jsonl", "files": [{path, size, mtime_ns}...]}``."""
        return {"kind": "jsonl", "files": self._identity()}

    def names(self) -> list[str]:
        """``columns``, or the keys of the first good object of the files."""
        if self._columns is not None:
            return list(self._columns)
        for f in self.files():
            with _open_rb(f) as handle:
                for line in _lines(handle):
                    obj = _parse_object(line)
                    if isinstance(obj, dict):
                        return [str(k) for k in obj]
        return []

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` objects across the files, from chunk ``start_chunk``
        on (the lines before it are counted, not parsed)."""
        _check_args(chunk_size, start_chunk)
        names = self.names()
        return self._gens.track(self._chunks_of(names, chunk_size, start_chunk))

    def _chunks_of(self, names: list[str], chunk_size: int, start_chunk: int) -> Iterator[Chunk]:
        lines = itertools.islice(self._all_lines(), start_chunk * chunk_size, None)
        yield from _chunk_records(
            JSONLSource._records(lines, names), names, chunk_size, start_chunk
        )

    def _all_lines(self) -> Iterator[bytes]:
        for f in self.files():
            with _open_rb(f) as handle:
                yield from _lines(handle)


def _open_rb(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise SourceError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc


#: The multi-file class of each single-file source class.
MANY: dict[type[_FileSource], type[_FileSource]] = {
    ParquetSource: ParquetFiles,
    CSVSource: CSVFiles,
    JSONLSource: JSONLFiles,
}


def open_files(
    obj: str | os.PathLike[str], columns: list[str] | None
) -> ParquetFiles | CSVFiles | JSONLFiles:
    """The multi-file source of a directory or pattern, by the files' format."""
    kind = format_of(obj)
    if kind is None:
        raise SourceError(
            f"cannot tell the format of the files {str(obj)!r} names (from the pattern's "
            "suffix or the files'): give a pattern ending in a suffix such as '*.parquet', "
            "or a source such as ParquetSource(path)"
        )
    if kind == "parquet":
        return ParquetFiles(obj, columns=columns)
    if kind == "jsonl":
        return JSONLFiles(obj, columns=columns)
    tsv = Path(os.fspath(obj)).suffix.lower() == ".tsv"
    return CSVFiles(obj, columns=columns, delimiter="\t" if tsv else ",")


# -- distributed runs ------------------------------------------------------------------


def _cuts(firsts: list[int], n_chunks: int, per: int, clean: Any = None) -> list[int]:
    """Partition starts: the chunk holding each file's first row, then every ``per``
    chunks within the file; ``clean(c)`` says whether a partition may start at ``c``."""
    cuts = {0}
    bounds = [*sorted(set(firsts)), n_chunks]
    for a, b in itertools.pairwise(bounds):
        cuts.update(range(a, b, per))
    return sorted(c for c in cuts if c < n_chunks and (c == 0 or clean is None or clean(c)))


def plan_files(
    source: _Many, chunk_size: int, workers: int, partition_rows: int | None
) -> tuple[_Reader, Iterator[Partition]] | None:
    """The reader and partitions of a multi-file source; None for CSV files a worker
    cannot cut into byte ranges (lone carriage returns, an encoding that is not ASCII
    compatible), which the driver then reads."""
    if isinstance(source, ParquetFiles):
        names, rows = source._check()
        firsts, before = [], 0
        for n in rows:
            if n:
                firsts.append(before // chunk_size)
            before += n
        n_chunks = math.ceil(before / chunk_size)
        per = default_partitions(n_chunks, workers, partition_rows, chunk_size)
        cuts = _cuts(firsts, n_chunks, per)
        reader = _ParquetFilesReader(list(source.files()), rows, names)
        return reader, _from_cuts(cuts, n_chunks, None)
    if isinstance(source, CSVFiles):
        from ._partitions import _ascii_compatible

        if not _ascii_compatible(source._encoding):
            return None
        try:
            scan = _scan_csv(source, chunk_size)
        except _LoneCR:
            return None
    else:
        assert isinstance(source, JSONLFiles)
        scan = _scan_jsonl(source, chunk_size)
    n_chunks = len(scan.starts)
    per = default_partitions(n_chunks, workers, partition_rows, chunk_size)
    cuts = _cuts(scan.firsts, n_chunks, per, lambda c: scan.starts[c][0] >= 0)
    return scan.reader, _from_cuts(cuts, n_chunks, scan)


def _from_cuts(cuts: list[int], n_chunks: int, scan: _Scan | None) -> Iterator[Partition]:
    for i, first in enumerate(cuts):
        last = cuts[i + 1] if i + 1 < len(cuts) else n_chunks
        part = Partition(i, first, last - first)
        if scan is not None:
            part.segments = scan.segments(first, last)
        yield part


@dataclasses.dataclass(slots=True)
class _ParquetFilesReader(_Reader):
    files: list[Path]
    rows: list[int]
    names: list[str]

    def read(self, part: Partition, chunk_size: int) -> Iterator[Chunk]:
        chunks = parquet_chunks(self.files, self.rows, self.names, chunk_size, part.first_chunk)
        try:
            yield from itertools.islice(chunks, part.n_chunks)
        finally:
            chunks.close()


@dataclasses.dataclass(slots=True)
class _FileInfo:
    """One text file of a multi-file input, as the driver scanned it."""

    path: Path
    #: Where its first row's record starts, and the lines before it (the header).
    data_offset: int
    data_lines: int
    #: Its size as scanned.
    end: int
    #: CSV: the header's width and the read columns' positions (width 0: no header).
    width: int = 0
    positions: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class _Scan:
    """What the driver notes of the files: each chunk's start (file, offset, lines
    before; file -1 where a partition cannot start) and the chunks holding each file's
    first row."""

    reader: _TextFilesReader
    starts: list[tuple[int, int, int]]
    firsts: list[int]

    def segments(self, first: int, last: int) -> list[tuple[int, int, int, int]]:
        """The byte ranges ``(file, offset, stop, lines before)`` of chunks
        ``first`` .. ``last - 1``."""
        files = self.reader.files
        f, offset, lines = self.starts[first]
        if last < len(self.starts):
            end_file, end_offset, _ = self.starts[last]
        else:
            end_file, end_offset = len(files) - 1, files[-1].end
        out = []
        while True:
            stop = end_offset if f == end_file else files[f].end
            if stop > offset:
                out.append((f, offset, stop, lines))
            if f >= end_file:
                return out
            f += 1
            offset, lines = files[f].data_offset, files[f].data_lines


@dataclasses.dataclass(slots=True)
class _TextFilesReader(_Reader):
    kind: str
    files: list[_FileInfo]
    names: list[str]
    columns: list[str] | None = None
    delimiter: str = ","
    encoding: str = "utf-8"

    def read(self, part: Partition, chunk_size: int) -> Iterator[Chunk]:
        assert part.segments is not None
        records = itertools.chain.from_iterable(self._records(s) for s in part.segments)
        yield from _chunk_records(records, self.names, chunk_size, part.first_chunk)

    def _records(self, segment: tuple[int, int, int, int]) -> Iterator[_Record]:
        f, offset, stop, lines_before = segment
        info = self.files[f]
        raw = _binary_lines(info.path, offset, stop)
        if self.kind == "jsonl":
            lines = _lines(raw) if offset == 0 else (line for line in raw if line.strip())
            yield from JSONLSource._records(lines, self.names)
            return
        encoding = self.encoding.removesuffix("-sig")
        text = (line.decode(encoding, "surrogateescape") for line in raw)
        padded = itertools.chain(itertools.repeat("\n", lines_before), text)
        reader = csv.reader(padded, delimiter=self.delimiter)
        one = CSVSource(
            info.path, columns=self.columns, delimiter=self.delimiter, encoding=self.encoding
        )
        yield from one._records(reader, info.width, info.positions, 0)


def _scan_csv(source: CSVFiles, chunk_size: int) -> _Scan:
    """Tokenise every file once, noting where each chunk's first record starts."""
    names, plans = source.headers()
    infos: list[_FileInfo] = []
    starts: list[tuple[int, int, int]] = []
    firsts: list[int] = []
    count = 0
    encoding = source._encoding.removesuffix("-sig")
    for index, (path, plan) in enumerate(zip(source.files(), plans, strict=True)):
        consumed = [0]
        with _open_rb(path) as f:

            def text_lines(f: BinaryIO = f, consumed: list[int] = consumed) -> Iterator[str]:
                for number, line in enumerate(f):
                    consumed[0] += len(line)
                    if b"\r" in line.rstrip(b"\r\n"):
                        raise _LoneCR
                    if number == 0 and line.startswith(_UTF8_BOM) and encoding == "utf-8":
                        line = line[len(_UTF8_BOM) :]
                    yield line.decode(encoding, "surrogateescape")

            reader = csv.reader(text_lines(), delimiter=source._delimiter)
            if plan is None:
                for _ in reader:
                    pass
                infos.append(_FileInfo(path, consumed[0], 0, consumed[0]))
                continue
            source.one(path)._header(reader)
            info = _FileInfo(path, consumed[0], reader.line_num, 0, plan[0], plan[1])
            had_rows, clean = False, True
            for offset, lines_before, ok in csv_record_starts(reader, consumed):
                if not had_rows:
                    had_rows, clean = True, True
                    firsts.append(count // chunk_size)
                if count % chunk_size == 0:
                    starts.append((index, offset, lines_before) if clean else (-1, 0, 0))
                count += 1
                clean = ok
            info.end = consumed[0]
            infos.append(info)
    reader_ = _TextFilesReader(
        "csv", infos, names, source._columns, source._delimiter, source._encoding
    )
    return _Scan(reader_, starts, firsts)


def _scan_jsonl(source: JSONLFiles, chunk_size: int) -> _Scan:
    """Read every file once, noting where each chunk's first line starts."""
    names = source.names()
    infos: list[_FileInfo] = []
    starts: list[tuple[int, int, int]] = []
    firsts: list[int] = []
    count = 0
    for index, path in enumerate(source.files()):
        position = 0
        with _open_rb(path) as f:
            had_rows = False
            for number, line in enumerate(f):
                bom = number == 0 and line.startswith(_UTF8_BOM)
                if (line[len(_UTF8_BOM) :] if bom else line).strip():
                    if count % chunk_size == 0:
                        # A file's first row is read from the file's start (blank lines,
                        # a byte order mark), as a local read does.
                        starts.append((index, position if had_rows else 0, 0))
                    if not had_rows:
                        had_rows = True
                        firsts.append(count // chunk_size)
                    count += 1
                position += len(line)
        infos.append(_FileInfo(path, 0, 0, position))
    return _Scan(_TextFilesReader("jsonl", infos, names), starts, firsts)
