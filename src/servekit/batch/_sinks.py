"""Batch outputs: JSON Lines, CSV and Parquet files, SQL tables, callables and lists.

Every sink implements :class:`~servekit.batch._types.Sink`. The decisions:

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

:class:`SQLSink`
    * Any DB-API 2.0 connection (tested with ``sqlite3`` and ``duckdb``); the caller owns
      it and it is never closed. Table and column names must match
      ``^[A-Za-z_][A-Za-z0-9_]*$`` and are always double-quoted.
    * Rows go to ``<table>__servekit_staging`` with an extra ``_servekit_chunk`` column;
      checkpoints to ``servekit_batch_chunks(run, chunk, rows)``, the manifest to
      ``servekit_batch_runs(run, manifest)`` with ``run`` = the target table's name.
    * Column types come from the first non-empty chunk: bool ``BOOLEAN``, int ``BIGINT``,
      float ``DOUBLE PRECISION``, str ``TEXT``, anything else ``TEXT`` holding JSON.
      Values are converted one by one the same way (so a column that was all ``None``
      in the first chunk is ``TEXT``); NaN/inf become ``NULL``. A later chunk with a
      column the staging table lacks is a ``ValueError``.
    * ``write_chunk`` is one transaction (deleting the chunk's earlier rows and checkpoint
      if it was written before, inserting rows and checkpoint, commit; rollback and
      re-raise on any error). DDL runs inside transactions, which sqlite, duckdb and
      PostgreSQL honour (MySQL commits DDL implicitly: not atomic there).
    * ``overwrite=True`` drops an old staging table and the run's bookkeeping rows at
      ``open``, but the old *target* table stays readable until ``finish()``, which, in
      one transaction, drops it, drops ``_servekit_chunk`` from the staging table (kept
      if the database cannot drop columns), renames staging to target and deletes the
      run's bookkeeping rows (BT-04). A resumed run whose target table exists may
      replace it too: its checkpoint can only have been created with ``overwrite=True``
      (``open`` refuses an existing target otherwise). A run whose chunks were all empty
      creates the
      target with the manifest's ``"output_columns"`` as ``TEXT`` columns, or no table
      when those are unknown (SQL has no zero-column table).
    * ``paramstyle`` (``qmark``, ``numeric``, ``named``, ``format``, ``pyformat``)
      chooses the placeholders of every parameterised statement.

:class:`CallableSink` / :class:`ListSink`
    Row dicts via :func:`columns_to_rows` (numpy values stay numpy; a row of a 2-D column
    is that row's 1-D array). They cannot resume: ``open`` always returns ``set()``.
    ``CallableSink`` does not call its function for a chunk with no rows.
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from servekit.batch._types import Sink
from servekit.errors import OutputExists, ResumeMismatch

__all__ = [
    "CSVSink",
    "CallableSink",
    "JSONLSink",
    "ListSink",
    "ParquetSink",
    "SQLSink",
    "columns_to_rows",
    "open_sink",
]

_PART_RE = re.compile(r"^part-(\d{8})\.(?P<ext>[A-Za-z0-9]+)$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MANIFEST = "manifest.json"
_EMPTY = "empty"


# --------------------------------------------------------------------------- values


def _column_list(name: str, values: Any, n_rows: int) -> list[Any]:
    """A column as a Python list of ``n_rows`` cells (numpy arrays via ``tolist``)."""
    cells: list[Any] = values.tolist() if isinstance(values, np.ndarray) else list(values)
    if len(cells) != n_rows:
        raise ValueError(f"column {name!r} has {len(cells)} values for {n_rows} rows")
    return cells


def _check_lengths(columns: dict[str, Any], n_rows: int) -> None:
    """Raise ``ValueError`` unless every column has ``n_rows`` values."""
    for name, values in columns.items():
        if len(values) != n_rows:
            raise ValueError(f"column {name!r} has {len(values)} values for {n_rows} rows")


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: numpy to Python, models dumped, NaN/inf to None."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return _jsonable(model_dump(mode="json"))
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON")


def _json_default(value: Any) -> Any:
    """``json.dumps`` hook for values it does not know (numpy, pydantic, dates)."""
    return _jsonable(value)


def _json_text(value: Any) -> str:
    """Compact JSON text of ``value``; NaN/inf become ``null``."""
    try:
        return json.dumps(
            value,
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
            default=_json_default,
        )
    except ValueError:  # a NaN or infinity somewhere: clean the whole value
        return json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))


def columns_to_rows(columns: dict[str, Any], n_rows: int) -> list[dict[str, Any]]:
    """Turn columns (name -> list or numpy array with rows first) into ``n_rows`` dicts.

    Values are not converted: numpy values stay numpy, and a row of a 2-D column is that
    row's 1-D array. Raises ``ValueError`` if a column does not have ``n_rows`` values.
    """
    _check_lengths(columns, n_rows)
    names = list(columns)
    cols = [columns[name] for name in names]
    return [{name: col[i] for name, col in zip(names, cols, strict=True)} for i in range(n_rows)]


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


def _normalized(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as it reads back from JSON (tuples become lists, and so on)."""
    result: dict[str, Any] = json.loads(json.dumps(manifest, default=_json_default))
    return result


def _check_manifest(stored: Any, manifest: dict[str, Any], where: str) -> None:
    """Raise :class:`ResumeMismatch` naming the keys where ``stored`` and ``manifest`` differ."""
    new = _normalized(manifest)
    if not isinstance(stored, dict):
        raise ResumeMismatch(f"the checkpoint at {where} has an unreadable manifest")
    differing = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
    if differing:
        raise ResumeMismatch(
            f"cannot resume from the checkpoint at {where}: it was written by a run with "
            f"other settings (differing: {', '.join(differing)}). Start over with "
            "overwrite=True."
        )


def _output_columns(manifest: dict[str, Any]) -> list[str] | None:
    """The manifest's ``"output_columns"``, if it is a list of strings."""
    names = manifest.get("output_columns")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


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


# --------------------------------------------------------------------------- SQL

_PARAMSTYLES = ("qmark", "numeric", "named", "format", "pyformat")


def _check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a safe SQL identifier, else raise ``ValueError``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} name {name!r}: must match ^[A-Za-z_][A-Za-z0-9_]*$")
    return name


def _q(name: str) -> str:
    """A checked identifier, double-quoted."""
    return f'"{name}"'


def _sql_type(values: Any) -> str:
    """The SQL type of a column, from its first non-None value (or numpy dtype)."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype != object:
        kind = values.dtype.kind
        return {"b": "BOOLEAN", "i": "BIGINT", "u": "BIGINT", "f": "DOUBLE PRECISION"}.get(
            kind, "TEXT"
        )
    for value in values:
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            return "BOOLEAN"
        if isinstance(value, (int, np.integer)):
            return "BIGINT"
        if isinstance(value, (float, np.floating)):
            return "DOUBLE PRECISION"
        return "TEXT"
    return "TEXT"


def _sql_value(value: Any) -> Any:
    """A cell as a DB-API parameter: scalars as is, NaN/inf None, the rest JSON text."""
    if isinstance(value, np.generic) and not isinstance(value, np.void):
        value = value.item()  # numpy scalars (also the float/str subclasses) to Python
    if value is None or type(value) in (str, bool, int):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    return _json_text(value)


def _sql_column(values: Any) -> list[Any]:
    """A column as a list of DB-API parameters."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "biuf":
        return [_sql_value(v) for v in values.tolist()]
    if isinstance(values, np.ndarray) and values.ndim >= 2:
        return [_json_text(row) for row in values.tolist()]
    return [_sql_value(v) for v in values]


class SQLSink:
    """Rows into a SQL table through any DB-API 2.0 connection, published at ``finish``."""

    def __init__(self, connection: Any, table: str, *, paramstyle: str = "qmark") -> None:
        """Write to ``table`` over ``connection`` (never closed here), with DB-API
        ``paramstyle`` placeholders (``qmark`` for sqlite3 and duckdb)."""
        if paramstyle not in _PARAMSTYLES:
            raise ValueError(f"unknown paramstyle {paramstyle!r}; use one of {_PARAMSTYLES}")
        self.connection = connection
        self.table = _check_name(table, "table")
        self.staging = f"{table}__servekit_staging"
        self.paramstyle = paramstyle
        self._columns: list[str] | None = None
        self._done: set[int] = set()
        self._overwrite = False
        self._manifest: dict[str, Any] = {}
        self._open = False
        module = type(connection).__module__ or ""
        self._duckdb = module.split(".")[0].lstrip("_") == "duckdb"

    def __repr__(self) -> str:
        return f"SQLSink(table={self.table!r})"

    # -- DB-API plumbing

    def _cursor(self) -> Any:
        # duckdb's cursor() is a separate connection with its own transactions
        return self.connection if self._duckdb else self.connection.cursor()

    def _placeholders(self, n: int) -> list[str]:
        style = self.paramstyle
        if style == "qmark":
            return ["?"] * n
        if style == "numeric":
            return [f":{i + 1}" for i in range(n)]
        if style == "named":
            return [f":p{i}" for i in range(n)]
        if style == "format":
            return ["%s"] * n
        return [f"%(p{i})s" for i in range(n)]

    def _params(self, values: Sequence[Any]) -> Sequence[Any] | dict[str, Any]:
        if self.paramstyle in ("named", "pyformat"):
            return {f"p{i}": v for i, v in enumerate(values)}
        return tuple(values)

    def _sql(self, template: str, n: int) -> str:
        """``template`` with ``{0}``, ``{1}``... replaced by placeholders."""
        return template.format(*self._placeholders(n))

    def _begin(self, cur: Any) -> None:
        if self._duckdb:
            cur.execute("BEGIN TRANSACTION")
        elif getattr(self.connection, "in_transaction", True) is False:
            cur.execute("BEGIN")  # sqlite3: make DDL part of the transaction too

    def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.rollback()

    def _exists(self, table: str) -> bool:
        cur = self._cursor()
        try:
            cur.execute(f"SELECT * FROM {_q(table)} WHERE 1 = 0")
            cur.fetchall()
        except Exception:
            self._rollback()
            return False
        return True

    def _table_columns(self, table: str) -> list[str]:
        cur = self._cursor()
        cur.execute(f"SELECT * FROM {_q(table)} WHERE 1 = 0")
        cur.fetchall()
        return [d[0] for d in cur.description]

    # -- Sink protocol

    def open(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> set[int]:
        """Create the bookkeeping tables, check or clear the run; see the module docs."""
        self._manifest = _normalized(manifest)
        cur = self._cursor()
        try:
            self._begin(cur)
            cur.execute(
                "CREATE TABLE IF NOT EXISTS servekit_batch_runs "
                "(run TEXT PRIMARY KEY, manifest TEXT NOT NULL)"
            )
            cur.execute(
                "CREATE TABLE IF NOT EXISTS servekit_batch_chunks (run TEXT NOT NULL, "
                'chunk INTEGER NOT NULL, "rows" INTEGER NOT NULL, PRIMARY KEY (run, chunk))'
            )
            self.connection.commit()
        except BaseException:
            self._rollback()
            raise
        cur.execute(
            self._sql("SELECT manifest FROM servekit_batch_runs WHERE run = {0}", 1),
            self._params([self.table]),
        )
        row = cur.fetchone()
        stored = row[0] if row else None
        target_exists = self._exists(self.table)
        staging_exists = self._exists(self.staging)
        self._overwrite = overwrite
        if resume and stored is not None:
            try:
                stored_manifest = json.loads(stored)
            except ValueError:
                stored_manifest = None
            _check_manifest(stored_manifest, manifest, f"table {self.table!r}")
            # a checkpoint next to an existing target was opened with overwrite=True
            # (open refuses otherwise): finish may replace the target
            self._overwrite = overwrite or target_exists
            cur = self._cursor()
            cur.execute(
                self._sql("SELECT chunk FROM servekit_batch_chunks WHERE run = {0}", 1),
                self._params([self.table]),
            )
            self._done = {int(r[0]) for r in cur.fetchall()}
            self._columns = self._data_columns() if staging_exists else None
            self._open = True
            return set(self._done)
        if not overwrite and (target_exists or stored is not None or staging_exists):
            if resume and not staging_exists and stored is None:
                raise OutputExists(
                    f"table {self.table!r} exists and there is nothing to resume: the run "
                    "already finished. Use overwrite=True to run again."
                )
            raise OutputExists(
                f"table {self.table!r} (or its staging table or checkpoint) already exists; "
                "pass overwrite=True to replace it or resume=True to finish an interrupted run"
            )
        cur = self._cursor()
        try:
            self._begin(cur)
            cur.execute(f"DROP TABLE IF EXISTS {_q(self.staging)}")
            for bookkeeping in ("servekit_batch_chunks", "servekit_batch_runs"):
                cur.execute(
                    self._sql(f"DELETE FROM {bookkeeping} WHERE run = {{0}}", 1),
                    self._params([self.table]),
                )
            cur.execute(
                self._sql("INSERT INTO servekit_batch_runs (run, manifest) VALUES ({0}, {1})", 2),
                self._params([self.table, json.dumps(self._manifest, sort_keys=True)]),
            )
            self.connection.commit()
        except BaseException:
            self._rollback()
            raise
        self._columns = None
        self._done = set()
        self._open = True
        return set()

    def _data_columns(self) -> list[str]:
        return [c for c in self._table_columns(self.staging) if c != "_servekit_chunk"]

    def write_chunk(self, index: int, columns: dict[str, Any], n_rows: int) -> None:
        """Insert chunk ``index``'s rows and its checkpoint in one transaction."""
        if not self._open:
            raise RuntimeError(f"{self!r} is not open (call open() first)")
        _check_lengths(columns, n_rows)
        names = [_check_name(n, "column") for n in columns]
        if "_servekit_chunk" in names:
            raise ValueError("the column name '_servekit_chunk' is reserved by SQLSink")
        created = False
        if n_rows and self._columns is not None:
            unknown = [n for n in names if n not in self._columns]
            if unknown:
                raise ValueError(
                    f"chunk {index} has columns {unknown} that the table {self.table!r} "
                    f"(columns {self._columns}) does not have"
                )
        cur = self._cursor()
        try:
            self._begin(cur)
            if n_rows and self._columns is None:
                defs = ", ".join(f"{_q(n)} {_sql_type(columns[n])}" for n in names)
                cur.execute(
                    f"CREATE TABLE {_q(self.staging)} "
                    f'("_servekit_chunk" INTEGER NOT NULL{", " if defs else ""}{defs})'
                )
                self._columns = names
                created = True
            if index in self._done:
                if self._columns is not None:
                    cur.execute(
                        self._sql(
                            f'DELETE FROM {_q(self.staging)} WHERE "_servekit_chunk" = {{0}}', 1
                        ),
                        self._params([index]),
                    )
                cur.execute(
                    self._sql(
                        "DELETE FROM servekit_batch_chunks WHERE run = {0} AND chunk = {1}", 2
                    ),
                    self._params([self.table, index]),
                )
            if n_rows:
                cols = [_sql_column(columns[n]) for n in names]
                col_sql = ", ".join(_q(n) for n in ["_servekit_chunk", *names])
                marks = ", ".join(self._placeholders(len(names) + 1))
                cur.executemany(
                    f"INSERT INTO {_q(self.staging)} ({col_sql}) VALUES ({marks})",
                    [self._params([index, *row]) for row in zip(*cols, strict=True)]
                    if names
                    else [self._params([index])] * n_rows,
                )
            cur.execute(
                self._sql(
                    'INSERT INTO servekit_batch_chunks (run, chunk, "rows") VALUES ({0}, {1}, {2})',
                    3,
                ),
                self._params([self.table, index, n_rows]),
            )
            self.connection.commit()
        except BaseException:
            self._rollback()
            if created:
                self._columns = None
            raise
        self._done.add(index)

    def finish(self) -> None:
        """Publish: drop the old target (with overwrite), rename staging to target and
        delete the run's bookkeeping rows, in one transaction."""
        if not self._open:
            raise RuntimeError(f"{self!r} is not open (call open() first)")
        try:
            self._finish(drop_column=True)
        except Exception:
            if self._columns is None:
                raise
            self._finish(drop_column=False)  # the database cannot drop columns: keep it
        self._open = False

    def _finish(self, *, drop_column: bool) -> None:
        cur = self._cursor()
        try:
            self._begin(cur)
            if self._overwrite:
                cur.execute(f"DROP TABLE IF EXISTS {_q(self.table)}")
            if self._columns is not None:
                if drop_column:
                    cur.execute(f'ALTER TABLE {_q(self.staging)} DROP COLUMN "_servekit_chunk"')
                cur.execute(f"ALTER TABLE {_q(self.staging)} RENAME TO {_q(self.table)}")
            else:
                names = [_check_name(n, "column") for n in _output_columns(self._manifest) or []]
                if names:
                    defs = ", ".join(f"{_q(n)} TEXT" for n in names)
                    cur.execute(f"CREATE TABLE {_q(self.table)} ({defs})")
            for bookkeeping in ("servekit_batch_chunks", "servekit_batch_runs"):
                cur.execute(
                    self._sql(f"DELETE FROM {bookkeeping} WHERE run = {{0}}", 1),
                    self._params([self.table]),
                )
            self.connection.commit()
        except BaseException:
            self._rollback()
            raise

    def close(self) -> None:
        """Stop without publishing; staging rows and checkpoints stay for resume. The
        connection is left open (the caller owns it)."""
        self._open = False


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
