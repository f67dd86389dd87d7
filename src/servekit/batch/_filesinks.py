"""File outputs: JSON Lines, CSV and Parquet, written as part files and published
atomically.

File sinks (:class:`JSONLSink`, :class:`CSVSink`, :class:`ParquetSink`)
    * Chunks go to part files in ``<path>.parts/`` (a sibling of the output, so on the
      same file system and renames are atomic): ``part-00000012.<ext>`` per finished
      chunk, or an ``part-00000012.empty`` marker for a chunk with no output rows. Each
      is written as ``<name>.tmp``, flushed, fsynced, renamed into place, and the
      directory is fsynced: a part exists whole or not at all (BT-03).
    * ``manifest.json`` in the parts directory holds the run's manifest (written the
      same way). ``resume=True`` compares it with the new manifest
      (:class:`~servekit.ResumeMismatch` naming the differing keys), deletes stray
      ``*.tmp`` files and returns the indices whose part or marker exists.
    * A cluster run's workers commit each partition's parts as one ``c-<first>-<last>/``
      directory inside the parts directory (read like flat parts); uncommitted attempt
      directories (``a-*``) are removed by a resumed run (see ``_attempts``).
    * ``finish()`` concatenates the parts in index order into ``<path>.tmp`` next to the
      output, fsyncs it, renames it over ``<path>`` and fsyncs the directory, then
      removes the parts directory: a reader sees no file (or the old one) or the whole
      new one, never a part (BT-04). ``close()`` publishes nothing and keeps the parts.
    * ``overwrite=True`` removes an old parts directory at ``open`` but leaves an old
      *output file* in place until ``finish()`` replaces it by the atomic rename: the
      old output stays readable during the run (BT-04), and a run that dies never
      leaves the caller with neither the old nor the new output. An output path that
      is a directory is refused (:class:`~servekit.OutputExists`), never removed.
    * ``resume=True`` with no parts directory but an existing output means the run
      already finished: :class:`~servekit.OutputExists`, unless ``overwrite=True`` is
      given too, which starts a fresh run. The output's parent directory is created if
      missing; a ``<path>.tmp`` left by a crashed ``finish`` is deleted at ``open``.
    * JSONL: one JSON object per row, columns in order, compact separators, UTF-8 (not
      ASCII-escaped). numpy arrays become lists, numpy scalars Python numbers, pydantic
      models ``model_dump(mode="json")``; NaN and infinities become ``null``. Parts
      concatenate byte for byte; an all-empty run publishes an empty file.
    * CSV: RFC 4180 quoting (``csv`` module, minimal quoting, ``"\\n"`` line ends), a
      header row of the column names. ``None`` and non-finite floats are empty fields,
      ``bool`` is ``true``/``false``, other numbers ``str()`` (floats: shortest repr),
      strings as is, lists/arrays/dicts/models JSON text. Each part holds its own header;
      ``finish`` keeps the first and checks every part has the same columns
      (``ValueError`` naming them otherwise). An all-empty run publishes a header-only
      file when the manifest has an ``"output_columns"`` list, else an empty (0-byte)
      file.
    * Parquet (pyarrow, imported only when used): numpy 1-D columns go to Arrow without
      per-row Python objects, a numpy ``(n, k)`` column (or a list of equal-shape 1-D
      arrays, stacked) becomes a ``FixedSizeList<k>`` column, lists of Python values
      are inferred by ``pa.array`` (dicts become structs). ``finish`` streams the parts
      through one ``ParquetWriter``; parts whose schemas differ only by type promotion
      (a column all ``None`` in one part, int vs float, nullability) are unified with
      ``pa.unify_schemas(promote_options="permissive")`` and cast; different column
      names are a ``ValueError``. An all-empty run publishes a valid 0-row file whose
      columns are the manifest's ``"output_columns"`` as ``string`` columns, or no
      columns at all.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from servekit.batch._sinkbase import (
    _check_lengths,
    _check_manifest,
    _json_text,
    _normalized,
    _output_columns,
)
from servekit.errors import OutputExists

__all__ = ["CSVSink", "JSONLSink", "ParquetSink"]

_PART_RE = re.compile(r"^part-(\d{8})\.(?P<ext>[A-Za-z0-9]+)$")
_MANIFEST = "manifest.json"
_EMPTY = "empty"


# --------------------------------------------------------------------------- values


def _column_list(name: str, values: Any, n_rows: int) -> list[Any]:
    """A column as a Python list of ``n_rows`` cells (numpy arrays via ``tolist``)."""
    cells: list[Any] = values.tolist() if isinstance(values, np.ndarray) else list(values)
    if len(cells) != n_rows:
        raise ValueError(f"column {name!r} has {len(cells)} values for {n_rows} rows")
    return cells


# --------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so renames in it survive a crash (no-op where unsupported)."""
    if os.name == "nt":  # pragma: no cover - Windows cannot open directories
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """fsync a file written by someone else (pyarrow) by its path."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final`` and fsync the directory."""
    _fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` through ``<final>.tmp`` + fsync + rename."""
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    _publish(tmp, final)


class _PartFileSink:
    """Shared machinery of the file sinks: part files, manifest, resume and publish."""

    #: The part files' extension (without the dot).
    ext: ClassVar[str] = ""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path``; parts go to ``<path>.parts/`` next to it."""
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self._manifest: dict[str, Any] = {}
        self._open = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # -- Sink protocol

    def open(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> set[int]:
        """Prepare the parts directory; see the module docstring for the rules."""
        self._manifest = _normalized(manifest)
        if self.path.is_dir():
            raise OutputExists(f"the output {self.path} is a directory; refusing to replace it")
        manifest_path = self.parts_dir / _MANIFEST
        if resume and manifest_path.is_file():
            try:
                stored = json.loads(manifest_path.read_text(encoding="utf-8"))
            except ValueError:
                stored = None
            _check_manifest(stored, manifest, str(self.parts_dir))
            for stray in self.parts_dir.glob("*.tmp"):
                stray.unlink()
            for attempt in self.parts_dir.glob("a-*"):  # a cluster's uncommitted attempts
                shutil.rmtree(attempt, ignore_errors=True)
            self._remove_stale_output_tmp()
            self._open = True
            return self._done()
        if resume and not self.parts_dir.exists() and self.path.exists() and not overwrite:
            raise OutputExists(
                f"{self.path} exists and there is nothing to resume: the run already "
                "finished. Use overwrite=True to run again."
            )
        if (self.path.exists() or self.parts_dir.exists()) and not overwrite and not resume:
            raise OutputExists(
                f"{self.path} (or its parts directory {self.parts_dir}) already exists; "
                "pass overwrite=True to replace it or resume=True to finish an interrupted run"
            )
        if self.parts_dir.exists():
            if not overwrite and any(
                not p.name.endswith(".tmp") for p in self.parts_dir.iterdir()
            ):  # resume=True, a parts directory without a manifest holding other files
                raise OutputExists(
                    f"{self.parts_dir} exists without a manifest; pass overwrite=True"
                )
            shutil.rmtree(self.parts_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_output_tmp()
        self.parts_dir.mkdir()
        _write_bytes_atomic(
            manifest_path, json.dumps(self._manifest, sort_keys=True, indent=1).encode("utf-8")
        )
        _fsync_dir(self.parts_dir.parent)
        self._open = True
        return set()

    def write_chunk(self, index: int, columns: dict[str, Any], n_rows: int) -> None:
        """Write chunk ``index`` as one part file (or an ``.empty`` marker), atomically."""
        self._require_open()
        if index < 0:
            raise ValueError(f"chunk index must be >= 0, got {index}")
        _check_lengths(columns, n_rows)
        stem = f"part-{index:08d}"
        ext = self.ext if n_rows else _EMPTY
        final = self.parts_dir / f"{stem}.{ext}"
        other = self.parts_dir / f"{stem}.{_EMPTY if n_rows else self.ext}"
        if other.exists():  # a redone chunk changing kind: never leave both behind
            other.unlink()
            _fsync_dir(self.parts_dir)
        if not n_rows:
            _write_bytes_atomic(final, b"")
            return
        tmp = final.with_name(final.name + ".tmp")
        self._write_part(tmp, columns, n_rows)
        _publish(tmp, final)

    def finish(self) -> None:
        """Assemble the parts in index order and publish ``<path>`` atomically."""
        self._require_open()
        parts = self._parts()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self._assemble([p for _, p in parts if p.suffix != f".{_EMPTY}"], tmp)
            _publish(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        shutil.rmtree(self.parts_dir)
        _fsync_dir(self.path.parent)
        self._open = False

    def close(self) -> None:
        """Stop without publishing; the parts stay for ``resume=True``."""
        self._open = False

    # -- helpers

    def _remove_stale_output_tmp(self) -> None:
        """Delete a ``<path>.tmp`` left by a finish that crashed before its rename."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        if tmp.is_file():
            tmp.unlink()

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"{self!r} is not open (call open() first)")

    def _parts(self) -> list[tuple[int, Path]]:
        """Finished parts and markers, in index order: this directory's, then those of
        the partitions a cluster committed (``c-*`` directories, see ``_attempts``; a
        chunk in two of them is taken from the first by name)."""
        found: dict[int, Path] = {}
        committed = []
        for entry in self.parts_dir.iterdir():
            m = _PART_RE.match(entry.name)
            if m and m["ext"] in (self.ext, _EMPTY):
                found[int(m.group(1))] = entry
            elif entry.name.startswith("c-") and entry.is_dir():
                committed.append(entry)
        for directory in sorted(committed):
            for entry in directory.iterdir():
                m = _PART_RE.match(entry.name)
                if m and m["ext"] in (self.ext, _EMPTY):
                    found.setdefault(int(m.group(1)), entry)
        return sorted(found.items())

    def _done(self) -> set[int]:
        return {index for index, _ in self._parts()}

    def _write_part(self, tmp: Path, columns: dict[str, Any], n_rows: int) -> None:
        """Write one chunk's rows to ``tmp`` (flushed; the caller fsyncs and renames)."""
        raise NotImplementedError

    def _assemble(self, parts: list[Path], tmp: Path) -> None:
        """Write the final output to ``tmp`` from the non-empty ``parts``, in order."""
        raise NotImplementedError


def _concat_files(parts: Iterable[tuple[Path, int]], out: IO[bytes]) -> None:
    """Copy each part from the given byte offset on into ``out``."""
    for part, offset in parts:
        with open(part, "rb") as f:
            f.seek(offset)
            shutil.copyfileobj(f, out, 1 << 20)


class JSONLSink(_PartFileSink):
    """JSON Lines output: one JSON object per row, columns in order."""

    ext = "jsonl"

    def _write_part(self, tmp: Path, columns: dict[str, Any], n_rows: int) -> None:
        names = list(columns)
        cols = [_column_list(name, columns[name], n_rows) for name in names]
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            if not names:
                f.write("{}\n" * n_rows)
                return
            f.writelines(
                _json_text(dict(zip(names, row, strict=True))) + "\n"
                for row in zip(*cols, strict=True)
            )

    def _assemble(self, parts: list[Path], tmp: Path) -> None:
        with open(tmp, "wb") as out:
            _concat_files(((p, 0) for p in parts), out)


def _csv_cell(value: Any) -> Any:
    """A CSV field: ``""`` for None/NaN, ``true``/``false``, numbers, str, else JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return _json_text(value)


def _csv_line(values: Sequence[Any]) -> bytes:
    """One CSV record, encoded as the CSV sink writes it."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode("utf-8")


class CSVSink(_PartFileSink):
    """CSV output: a header row of column names, then one record per row."""

    ext = "csv"

    def _write_part(self, tmp: Path, columns: dict[str, Any], n_rows: int) -> None:
        names = list(columns)
        cols = [_column_list(name, columns[name], n_rows) for name in names]
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(names)
            writer.writerows([_csv_cell(v) for v in row] for row in zip(*cols, strict=True))

    def _header(self, part: Path) -> list[str]:
        """The column names in a part file's header."""
        with open(part, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])

    def _assemble(self, parts: list[Path], tmp: Path) -> None:
        with open(tmp, "wb") as out:
            if not parts:
                names = _output_columns(self._manifest)
                if names:
                    out.write(_csv_line(names))
                return
            first = self._header(parts[0])
            header = _csv_line(first)
            copies: list[tuple[Path, int]] = []
            for i, part in enumerate(parts):
                names = self._header(part)
                if names != first:
                    raise ValueError(
                        f"CSV parts have different columns: {parts[0].name} has {first}, "
                        f"{part.name} has {names}"
                    )
                copies.append((part, 0 if i == 0 else len(header)))
            _concat_files(copies, out)


def _import_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or an ImportError saying what to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is installed in the tests
        raise ImportError('Parquet output needs pyarrow: pip install "servekit[parquet]"') from exc
    return pa, pq


def _fixed_size_list(pa: Any, array: np.ndarray[Any, Any]) -> Any:
    """An ``(n, k, ...)`` numpy array as nested Arrow fixed-size lists, without copies
    per row."""
    flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, int(size))
    return flat


def _arrow_column(pa: Any, name: str, values: Any, n_rows: int) -> Any:
    """One column as an Arrow array (the fast paths first)."""
    if isinstance(values, np.ndarray):
        if values.ndim >= 2 and values.dtype != object:
            return _fixed_size_list(pa, values)
        if values.ndim == 1 and values.dtype != object:
            return pa.array(values)
        values = list(values)
    cells = list(values)
    if len(cells) != n_rows:
        raise ValueError(f"column {name!r} has {len(cells)} values for {n_rows} rows")
    if (
        cells
        and all(isinstance(v, np.ndarray) and v.ndim >= 1 for v in cells)
        and len({(v.shape, v.dtype) for v in cells}) == 1
        and cells[0].dtype != object
    ):
        return _fixed_size_list(pa, np.stack(cells))
    plain = [_arrow_value(v) for v in cells]
    try:
        return pa.array(plain)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"column {name!r} cannot be written to Parquet: {exc}") from exc


def _arrow_value(value: Any) -> Any:
    """A cell as a value ``pa.array`` infers well (numpy to Python, models dumped)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _arrow_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_arrow_value(v) for v in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return model_dump(mode="json")
    return value


class ParquetSink(_PartFileSink):
    """Parquet output through pyarrow (``pip install "servekit[parquet]"``)."""

    ext = "parquet"

    def open(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> set[int]:
        """Check pyarrow is installed, then open as every file sink does."""
        _import_pyarrow()
        return super().open(manifest, resume=resume, overwrite=overwrite)

    def _write_part(self, tmp: Path, columns: dict[str, Any], n_rows: int) -> None:
        pa, pq = _import_pyarrow()
        arrays = [_arrow_column(pa, name, values, n_rows) for name, values in columns.items()]
        table = pa.Table.from_arrays(arrays, names=list(columns))
        pq.write_table(table, str(tmp))

    def _assemble(self, parts: list[Path], tmp: Path) -> None:
        pa, pq = _import_pyarrow()
        if not parts:
            names = _output_columns(self._manifest) or []
            schema = pa.schema([(n, pa.string()) for n in names])
            pq.write_table(schema.empty_table(), str(tmp))
            return
        schemas = [pq.read_schema(str(p)).remove_metadata() for p in parts]
        first = schemas[0]
        for part, schema in zip(parts, schemas, strict=True):
            if schema.names != first.names:
                raise ValueError(
                    f"Parquet parts have different columns: {parts[0].name} has "
                    f"{first.names}, {part.name} has {schema.names}"
                )
        target = first
        if any(not s.equals(first) for s in schemas):
            try:
                target = pa.unify_schemas(schemas, promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise ValueError(f"Parquet parts have incompatible schemas: {exc}") from exc
        with pq.ParquetWriter(str(tmp), target) as writer:
            for part in parts:
                table = pq.read_table(str(part)).replace_schema_metadata(None)
                if not table.schema.equals(target):
                    table = table.cast(target)
                writer.write_table(table)
