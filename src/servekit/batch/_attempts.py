"""Exactly-once file output when a cluster runs a partition more than once.

A cluster may run a partition twice, at the same time or one after the other: Dask
retries the task of a worker it presumed dead (that was only slow, and goes on), Ray
retries the task of an actor it lost. Both attempts write the same chunks; rewriting
each part in place (last rename wins) keeps every part whole, but not the *pair* of an
output part and its error part: one attempt's output with the other's errors would
hold a row twice or not at all when the attempts differ (a transient error retried in
one and not the other, a model that is not deterministic). So a partition's parts are
committed as one unit, once:

1. **An attempt writes privately.** Each run of a partition on a worker has an attempt
   id (a random uuid) and writes its parts to ``<output>.parts/a-<id>/`` (and
   ``<errors>.parts/a-<id>/``), each part through a temporary file and a rename.
2. **The commit is one rename, and the first wins.** When its chunks are written, the
   attempt stores its id and result (chunk counts and row errors) in its directory,
   moves its error directory to ``<errors>.parts/s-<chunks>-<id>/`` (staged: a name no
   other attempt uses), then renames its output directory to
   ``<output>.parts/c-<first>-<last>/`` (``first``/``last``: the chunks it wrote). A
   directory cannot be renamed over a non-empty one, so exactly one attempt's rename
   succeeds: that is the commit. A later finisher's rename fails; it deletes its own
   directories and returns the winner's stored result, so the driver counts the rows
   the output holds.
3. **The driver settles the error parts** (:func:`settle`, at the start and end of a
   run, after every partition's task returned): for each committed output directory
   it moves the staged error directory of the same attempt id to
   ``<errors>.parts/c-<first>-<last>/`` and deletes the staged directories of losers.
   The sinks read only ``c-*`` directories (and the flat parts of local runs), so the
   output and the errors come from the same attempt of every partition.

Why exactly once: the rows of a chunk reach the output only through the ``c-``
directory holding its part, there is at most one per chunk range (the rename), and a
resumed run plans only chunks no ``c-`` directory (or flat part) holds, so no two
committed directories overlap; a crash between the two renames leaves the output
uncommitted (redone) or committed with its errors staged under the same id (settled at
the next start). A late writer cannot change committed parts: it only ever writes
inside its own ``a-`` directory, which a resumed run deletes at ``open``; after the run
finished (the parts directory removed) its writes fail. The one thing not guarded: a
worker of an *earlier, overwritten* run (``overwrite=True``) whose task is still running
can commit into the new run's parts directory if its chunk range is not yet committed
there; stop the old cluster run (its client) before starting over.

SQL, list and callable sinks are written by the driver from each partition's returned
result, exactly once per partition (a second result for the same partition is
ignored), and ``SQLSink`` writes a chunk's rows and its checkpoint row in one
transaction.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

from ._filesinks import _EMPTY, _fsync_dir, _fsync_file, _PartFileSink, _publish
from ._sinkbase import _check_lengths
from ._types import Sink

__all__ = ["Attempt", "settle", "write_part"]

_ID = "ATTEMPT"
_RESULT = "RESULT.pickle"


def write_part(
    sink: _PartFileSink, directory: Path, index: int, columns: dict[str, Any], n_rows: int
) -> None:
    """Write chunk ``index`` of ``sink`` into ``directory`` (an attempt's own), as
    ``part-<index>.<ext>`` or an ``.empty`` marker, through a temporary file."""
    _check_lengths(columns, n_rows)
    stem = f"part-{index:08d}"
    final = directory / f"{stem}.{sink.ext if n_rows else _EMPTY}"
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex}.tmp")
    if n_rows:
        sink._write_part(tmp, columns, n_rows)
    else:
        tmp.write_bytes(b"")
    _publish(tmp, final)


class Attempt:
    """One run of a partition on a worker: its private directories and its commit."""

    def __init__(self, sink: Sink, error_sink: Sink | None) -> None:
        """Make the attempt's directories in the sinks' parts directories."""
        assert isinstance(sink, _PartFileSink)
        assert error_sink is None or isinstance(error_sink, _PartFileSink)
        sink._require_open()
        self.id = uuid.uuid4().hex
        self.sink = sink
        self.error_sink = error_sink
        self.out_dir = sink.parts_dir / f"a-{self.id}"
        self.err_dir = None if error_sink is None else error_sink.parts_dir / f"a-{self.id}"
        self.staged: Path | None = None
        self.out_dir.mkdir()
        if self.err_dir is not None:
            self.err_dir.mkdir()

    def write(self, index: int, columns: dict[str, Any], n_rows: int) -> None:
        """Write an output part of this attempt."""
        write_part(self.sink, self.out_dir, index, columns, n_rows)

    def write_errors(self, index: int, columns: dict[str, Any], n_rows: int) -> None:
        """Write an error part of this attempt."""
        assert self.error_sink is not None
        assert self.err_dir is not None
        write_part(self.error_sink, self.err_dir, index, columns, n_rows)

    def commit(self, chunks: list[int], result: Any) -> Any:
        """Commit the parts of ``chunks`` (the chunks written) with ``result``; returns
        ``result``, or the result of the attempt that committed them first."""
        if not chunks:
            self.abandon()
            return result
        name = f"{min(chunks):08d}-{max(chunks):08d}"
        (self.out_dir / _RESULT).write_bytes(pickle.dumps(result))
        (self.out_dir / _ID).write_text(self.id, encoding="ascii")
        for path in (self.out_dir / _RESULT, self.out_dir / _ID):
            _fsync_file(path)
        if self.err_dir is not None and self.error_sink is not None:
            staged = self.error_sink.parts_dir / f"s-{name}-{self.id}"
            os.rename(self.err_dir, staged)
            self.staged, self.err_dir = staged, None
            _fsync_dir(staged.parent)
        committed = self.sink.parts_dir / f"c-{name}"
        try:
            os.rename(self.out_dir, committed)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            self.abandon()  # another attempt committed these chunks first
            return pickle.loads((committed / _RESULT).read_bytes())
        _fsync_dir(committed.parent)
        return result

    def abandon(self) -> None:
        """Delete this attempt's uncommitted directories (best effort)."""
        for path in (self.out_dir, self.err_dir, self.staged):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self.err_dir = self.staged = None


def committed_dirs(sink: _PartFileSink) -> list[Path]:
    """The committed ``c-*`` directories of ``sink``, in name order."""
    if not sink.parts_dir.is_dir():
        return []
    return sorted(p for p in sink.parts_dir.iterdir() if p.name.startswith("c-") and p.is_dir())


def settle(sink: Sink, error_sink: Sink | None) -> None:
    """Publish the staged error parts of every committed output directory (the same
    attempt's) and delete those of attempts that lost; see the module docs."""
    if not isinstance(sink, _PartFileSink) or not isinstance(error_sink, _PartFileSink):
        return
    if not error_sink.parts_dir.is_dir():
        return
    winners: dict[str, str] = {}
    for directory in committed_dirs(sink):
        with contextlib.suppress(OSError):
            winners[directory.name[2:]] = (directory / _ID).read_text(encoding="ascii")
    changed = False
    for staged in sorted(error_sink.parts_dir.glob("s-*")):
        name, _, attempt = staged.name[2:].rpartition("-")
        if name not in winners:
            continue  # not committed (yet, or never): left alone, never read
        target = error_sink.parts_dir / f"c-{name}"
        if winners[name] == attempt and not target.exists():
            os.rename(staged, target)
        else:
            shutil.rmtree(staged, ignore_errors=True)
        changed = True
    if changed:
        _fsync_dir(error_sink.parts_dir)
