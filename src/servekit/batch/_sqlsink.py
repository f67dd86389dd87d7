"""SQL output: rows into a table through any DB-API 2.0 connection, published at
``finish``.

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
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from servekit.batch._sinkbase import (
    _check_lengths,
    _check_manifest,
    _json_text,
    _normalized,
    _output_columns,
)
from servekit.errors import OutputExists

__all__ = ["SQLSink"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
