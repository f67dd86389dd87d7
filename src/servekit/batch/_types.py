"""What sources, sinks and the runner hand each other: chunks, row errors, protocols.

Rows are numbered from 0 in reading order, bad rows included, so that a row's number
(and the chunk it falls in: ``row // chunk_size``) is the same on every run over the
same input. That is what makes resume exact: chunk ``i`` always covers input rows
``i * chunk_size`` to ``(i + 1) * chunk_size - 1``.

Data moves in columns, not row objects: a chunk's ``columns`` map a column name to a
sequence with one entry per good row (a list, or a numpy array whose first axis is the
rows: a column of 256-float vectors is one ``(n, 256)`` array). Sources and sinks that
speak Arrow or SQL never build a Python object per cell they do not need to.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Chunk", "RowError", "Sink", "Source", "Stage"]

#: Where a row failed: reading it, validating it against the model's signature (or a
#: non-finite number), running the model, or writing its output.
Stage = str
STAGES = ("read", "validate", "model", "write")


@dataclass(frozen=True, slots=True)
class RowError:
    """One failed row, as the error output records it."""

    #: The row's number in the input (0-based, reading order, bad rows included).
    row: int
    #: Where it failed: ``"read"``, ``"validate"``, ``"model"`` or ``"write"``.
    stage: Stage
    #: The error's stable code (a :class:`~servekit.ServekitError` code, or
    #: ``"malformed_row"`` for a row that could not be parsed).
    code: str
    #: What went wrong, for a person.
    message: str
    #: The row's key column values, when they could be read.
    key: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Chunk:
    """A run of consecutive input rows, read together and written together."""

    #: The chunk's number, from 0.
    index: int
    #: The number of the chunk's first input row (``index * chunk_size``).
    start: int
    #: Input rows the chunk covers, good and bad (``chunk_size`` except for the last).
    size: int
    #: Column name -> one value per good row (a list, or an array with rows first).
    columns: dict[str, Any]
    #: The input row number of each good row, in order.
    rows: list[int]
    #: The rows of this chunk that could not be read.
    errors: list[RowError] = field(default_factory=list)

    def __len__(self) -> int:
        """The number of good rows."""
        return len(self.rows)


@runtime_checkable
class Source(Protocol):
    """A streaming batch input: chunks of rows, with bounded memory."""

    def describe(self) -> dict[str, Any]:
        """What identifies this input, JSON-ready (kind, path, size, modification time,
        query...): stored with a checkpoint, so a resume over another input is refused."""
        ...

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Chunks of ``chunk_size`` input rows, from chunk ``start_chunk`` on (the rows
        before it are skipped as cheaply as the format allows). Raises
        :class:`~servekit.SourceError` if the input cannot be read as a whole."""
        ...

    def close(self) -> None:
        """Release files or cursors; calling it again does nothing."""
        ...


@runtime_checkable
class Sink(Protocol):
    """A batch output: written chunk by chunk, each chunk atomically."""

    def open(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> set[int]:
        """Prepare to write. ``manifest`` (JSON-ready run settings and the source's
        ``describe()``) is stored with the checkpoint.

        A fresh run (``resume=False``) refuses an existing output or checkpoint with
        :class:`~servekit.OutputExists` unless ``overwrite=True``, which removes them.
        With ``resume=True`` it returns the indices of the chunks already written, after
        checking the stored manifest equals ``manifest``
        (:class:`~servekit.ResumeMismatch` otherwise); with nothing to resume it starts
        fresh. Sinks that cannot resume return an empty set.
        """
        ...

    def write_chunk(self, index: int, columns: dict[str, Any], n_rows: int) -> None:
        """Persist chunk ``index``'s output rows (``n_rows`` of them, possibly 0) and
        record the chunk as done, atomically: after a crash either both or neither are
        there. Writing the same index again (a resumed run redoing it) replaces it."""
        ...

    def finish(self) -> None:
        """Every chunk is written: publish the final output atomically (a reader sees
        the old state or the whole output, never a part) and remove the checkpoint."""
        ...

    def close(self) -> None:
        """Release resources without publishing; calling it again does nothing."""
        ...
