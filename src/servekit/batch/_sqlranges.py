"""SQL key ranges: the partitions of an :class:`~servekit.batch.SQLSource` given
``connect`` and ``partition_key``, planned on the driver and read on the workers (see
``_partitions`` for how they fit the other kinds)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import SourceError
from ._partitions import Partition, _Reader, default_partitions
from ._sqlsource import SQLSource, key_range_query, quote_identifier, sql_cursor
from ._types import Chunk

__all__ = ["SQLRangeReader"]


@dataclasses.dataclass(slots=True)
class SQLRangeReader(_Reader):
    """Reads a partition's key range through a connection of the worker's own."""

    connect: Callable[[], Any]
    query: str
    params: list[Any]
    key: str

    @classmethod
    def plan(
        cls, source: SQLSource, chunk_size: int, workers: int, partition_rows: int | None
    ) -> tuple[SQLRangeReader, Iterator[Partition]]:
        """Read the key column once in key order, noting the key starting each chunk."""
        key = source._partition_key
        assert key is not None
        assert source._connect is not None
        _check_picklable(source._connect)
        connection = source._open()
        column = quote_identifier(key)
        keys = f"SELECT {column} FROM ({source._query}) AS servekit_rows ORDER BY {column}"
        cursor, _ = sql_cursor(connection, keys, list(source._params))
        try:
            starts: list[Any] = []
            count = 0
            previous: Any = None
            while rows := cursor.fetchmany(max(chunk_size, 1024)):
                for (value,) in rows:
                    if value is None:
                        raise SourceError(
                            f"partition_key {key!r} is NULL in a row: key ranges need a "
                            "key that is never NULL"
                        )
                    if count and value == previous:
                        raise SourceError(
                            f"partition_key {key!r} repeats the value {value!r}: key ranges "
                            "need unique keys"
                        )
                    if count % chunk_size == 0:
                        starts.append(value)
                    previous = value
                    count += 1
        finally:
            with contextlib.suppress(Exception):
                cursor.close()
        this = cls(source._connect, source._query, list(source._params), key)
        return this, _key_partitions(starts, count, workers, partition_rows, chunk_size)

    def read(self, part: Partition, chunk_size: int) -> Iterator[Chunk]:
        try:
            connection = self.connect()
        except Exception as exc:
            raise SourceError(f"connect() failed on a worker: {exc}") from exc
        try:
            low, high = part.low is not None, part.high is not None
            query = key_range_query(connection, self.query, self.key, low, high)
            bounds = [b for b in (part.low, part.high) if b is not None]
            cursor, names = sql_cursor(connection, query, [*self.params, *bounds])
            try:
                yield from self._chunks(cursor, names, part, chunk_size)
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    @staticmethod
    def _chunks(cursor: Any, names: list[str], part: Partition, chunk_size: int) -> Iterator[Chunk]:
        index, start, read = part.first_chunk, part.first_chunk * chunk_size, 0
        while True:
            rows = cursor.fetchmany(chunk_size)
            n = len(rows)
            read += n
            if read > part.n_rows or (n < chunk_size and read != part.n_rows):
                raise SourceError(
                    f"the key range of partition {part.index} holds {read if n else 'fewer'}"
                    f" rows, not the {part.n_rows} planned: the query's rows changed "
                    "during the run"
                )
            if not n:
                return
            columns = {
                name: list(col) for name, col in zip(names, zip(*rows, strict=True), strict=True)
            }
            yield Chunk(index, start, n, columns, list(range(start, start + n)))
            if read == part.n_rows:
                if cursor.fetchone() is not None:
                    raise SourceError(
                        f"the key range of partition {part.index} holds more rows than the "
                        f"{part.n_rows} planned: the query's rows changed during the run"
                    )
                return
            index += 1
            start += n


def _key_partitions(
    starts: list[Any], n_rows: int, workers: int, partition_rows: int | None, chunk_size: int
) -> Iterator[Partition]:
    """Partitions from the key starting each chunk: the first is open below, the last
    open above (rows outside the planned keys would be counted, and refused)."""
    per = default_partitions(len(starts), workers, partition_rows, chunk_size)
    cuts = list(range(0, len(starts), per))
    for i, first in enumerate(cuts):
        last = cuts[i + 1] if i + 1 < len(cuts) else len(starts)
        rows = min(last * chunk_size, n_rows) - first * chunk_size
        yield Partition(
            i,
            first,
            last - first,
            low=starts[first] if first else None,
            high=starts[last] if last < len(starts) else None,
            n_rows=rows,
        )


def _check_picklable(connect: Callable[[], Any]) -> None:
    """Refuse a connection factory the workers could not be sent, before any work."""
    import cloudpickle

    try:
        cloudpickle.dumps(connect)
    except Exception as exc:
        raise TypeError(
            f"connect cannot be pickled to go to the cluster's workers ({exc}); wrap the "
            "driver's connect in a function defined at module level (for example "
            "def connect(): return duckdb.connect(path, read_only=True)) and pass that, "
            "or functools.partial of it"
        ) from exc
