"""SQL queries over any DB-API 2.0 connection, and the key-range statements that
``_sqlranges`` reads partitions with.

The rules every source follows are in ``_sources``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import SourceError
from ._sourcebase import _check_args, _Generators
from ._types import Chunk

__all__ = ["SQLSource"]


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
