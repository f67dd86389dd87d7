"""Two attempts of the same partition (a cluster that retried a worker it presumed dead,
which then finished late): run directly through the worker-side function, in both
orders and interleaved, the output holds every row exactly once, and the output and
error parts come from the same attempt. No cluster and no timing: the interleaving is
made by running one attempt from inside the other's progress callback."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import servekit as sk
from servekit.batch import JSONLSink, ParquetSink, ParquetSource
from servekit.batch._attempts import Attempt, settle
from servekit.batch._partitions import (
    ChunkStat,
    DriverWriter,
    Partition,
    PartitionResult,
    WorkSpec,
    plan,
    run_partition,
)

N = 120
CHUNK = 10


class FailsMultiples(sk.Model[Any, Any]):
    """Doubles x; fails the rows whose x is a multiple of ``m`` (attempts differ)."""

    def __init__(self, m: int) -> None:
        self.m = m

    def predict(self, batch: list[Any]) -> list[Any]:
        return [ValueError("no") if int(x) % self.m == 0 else x * 2 for x in batch]


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "in.parquet"
        ids = np.arange(N, dtype=np.int64)
        pq.write_table(pa.table({"id": ids, "x": ids.astype(np.float64)}), path)
        source = ParquetSource(path)
        job = SimpleNamespace(source=source, chunk_size=CHUNK, done=frozenset())
        reader, parts = plan(job, 1, 40)  # type: ignore[arg-type]
        self.parts: list[Partition] = list(parts)  # 3 partitions of 4 chunks
        self.out = ParquetSink(tmp_path / "out.parquet")
        self.err = JSONLSink(tmp_path / "errors.jsonl")
        self.out.open({"run": 1}, resume=False, overwrite=False)
        self.err.open({"run": 1, "errors": True}, resume=False, overwrite=False)
        self.spec = WorkSpec(
            reader=reader,
            chunk_size=CHUNK,
            keys=["id"],
            inputs=["x"],
            passthrough=[],
            output="prediction",
            retries=0,
            single=True,
            sink=self.out,
            error_sink=self.err,
            max_error_rate=None,
        )
        self.predictors = {m: sk.Predictor(FailsMultiples(m)) for m in (3, 5)}
        for p in self.predictors.values():
            p.start()

    def run(self, m: int, part: Partition, report: Any = None) -> PartitionResult:
        return run_partition(self.spec, self.predictors[m], part, report)

    def finish(self) -> tuple[list[int], list[int]]:
        settle(self.out, self.err)
        self.out.finish()
        self.err.finish()
        for p in self.predictors.values():
            p.close()
        out = pq.read_table(self.out.path).column("id").to_pylist()
        errors = [json.loads(line)["id"] for line in self.err.path.read_text().splitlines()]
        return out, errors


def _check(out: list[int], errors: list[int], winners: dict[int, int]) -> None:
    """Every row exactly once, in the output or the errors, as the winner of its
    partition (the model failing multiples of ``winners[partition]``) decided."""
    assert sorted(out + errors) == list(range(N))
    assert not set(out) & set(errors)
    for i in range(N):
        m = winners[i // 40]
        assert (i in errors) == (i % m == 0), (i, m)


@pytest.mark.parametrize("first", [3, 5])
def test_one_attempt_after_the_other_the_first_commit_wins(tmp_path: Path, first: int) -> None:
    s = Setup(tmp_path)
    second = 8 - first
    results = {}
    for part in s.parts:
        won = s.run(first, part)
        late = s.run(second, part)  # the presumed-dead worker finishing late
        assert late.stats == won.stats  # the loser reports what was committed
        results[part.index] = won
    # The losers left nothing behind but the committed directories.
    assert sorted(p.name[:2] for p in s.out.parts_dir.iterdir() if p.is_dir()) == ["c-"] * 3
    out, errors = s.finish()
    _check(out, errors, {0: first, 1: first, 2: first})


@pytest.mark.parametrize("inner", [3, 5])
@pytest.mark.parametrize("point", ["between_parts", "between_chunks"])
def test_an_attempt_that_commits_while_another_is_writing_wins(
    tmp_path: Path, inner: int, point: str
) -> None:
    s = Setup(tmp_path)
    outer = 8 - inner
    part = s.parts[1]
    inner_result: list[PartitionResult] = []
    started: list[bool] = []

    def retry_now() -> None:
        if not started:
            started.append(True)
            inner_result.append(s.run(inner, part))  # the retry runs and commits now

    if point == "between_parts":
        # The outer attempt wrote its first chunk's error part, not yet its output
        # part: the retry runs in between (where a part-by-part overwrite would pair
        # one attempt's output with the other's errors).
        write = s.out._write_part

        def write_after_retry(tmp: Path, columns: dict[str, Any], n_rows: int) -> None:
            retry_now()
            write(tmp, columns, n_rows)

        s.out._write_part = write_after_retry  # type: ignore[method-assign]
        late = s.run(outer, part)
        s.out._write_part = write  # type: ignore[method-assign]
    else:
        late = s.run(outer, part, lambda stat: retry_now())
    assert inner_result and late.stats == inner_result[0].stats
    s.run(3, s.parts[0])
    s.run(3, s.parts[2])
    out, errors = s.finish()
    _check(out, errors, {0: 3, 1: inner, 2: 3})


def test_a_loser_that_died_after_staging_its_errors_is_not_published(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    winner = s.run(5, s.parts[0])
    # Another attempt of the same chunks staged its error parts and died before its
    # (failing) commit rename.
    loser = Attempt(s.out, s.err)
    for chunk in range(4):
        loser.write_errors(chunk, {"row": [chunk * 10], "id": [chunk * 10]}, 1)
    assert loser.err_dir is not None
    loser.err_dir.rename(s.err.parts_dir / f"s-00000000-00000003-{loser.id}")
    settle(s.out, s.err)
    assert [p.name for p in s.err.parts_dir.iterdir() if p.is_dir()] == ["c-00000000-00000003"]
    assert winner.stats[0].n_failed == 2  # 0 and 5
    for part in s.parts[1:]:
        s.run(5, part)
    out, errors = s.finish()
    _check(out, errors, {0: 5, 1: 5, 2: 5})


def test_uncommitted_attempts_are_not_read_and_a_resume_removes_them(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    attempt = Attempt(s.out, s.err)
    attempt.write(0, {"id": [1]}, 1)
    attempt.write_errors(0, {"row": [0]}, 1)
    assert s.out._done() == set()  # written, not committed: not a finished chunk
    s.out.close()
    assert s.out.open({"run": 1}, resume=True, overwrite=False) == set()
    assert not attempt.out_dir.exists()


def test_a_late_attempt_after_the_run_finished_changes_nothing(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    for part in s.parts:
        s.run(3, part)
    late_spec = s.spec
    out, errors = s.finish()
    before = s.out.path.read_bytes()
    predictor = sk.Predictor(FailsMultiples(5))
    predictor.start()
    try:
        s.out._open = s.err._open = True  # the late worker's copies are still open
        with pytest.raises(FileNotFoundError):
            run_partition(late_spec, predictor, s.parts[0])
    finally:
        predictor.close()
    assert s.out.path.read_bytes() == before
    assert not s.out.parts_dir.exists()
    _check(out, errors, {0: 3, 1: 3, 2: 3})


def test_error_parts_staged_by_a_commit_are_settled_once(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.run(3, s.parts[0])
    staged = [p.name for p in s.err.parts_dir.iterdir() if p.is_dir()]
    assert len(staged) == 1 and staged[0].startswith("s-")
    assert s.err._done() == set()  # staged, not yet settled
    settle(s.out, s.err)
    settle(s.out, s.err)  # idempotent
    assert s.err._done() == {0, 1, 2, 3} == s.out._done()
    for part in s.parts[1:]:
        s.run(3, part)
    out, errors = s.finish()
    _check(out, errors, {0: 3, 1: 3, 2: 3})


def test_the_driver_counts_and_writes_a_partition_once() -> None:
    from servekit.batch._runner import _ChunkResult, _Counts

    written: list[int] = []
    counts = _Counts()
    job = SimpleNamespace(
        counts=counts, tracker=SimpleNamespace(update=lambda c: None), sink=None, error_sink=None
    )
    spec = SimpleNamespace(sink=None)
    writer = DriverWriter(job, spec, lambda chunk, out: written.append(chunk.index))  # type: ignore[arg-type]
    writer.expect(0)
    result = PartitionResult(0, [ChunkStat(0, 2, 2, [])], [_ChunkResult({}, 2, [])])
    writer.finished(result)
    writer.finished(result)  # a retried task's result for the same partition
    assert written == [0]
