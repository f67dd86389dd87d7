"""BatchJob: batch runs as jobs of a JobQueue, so an endpoint can start one and poll it.

A run's settings arrive as a job input (JSON), so they are validated like any model
input (a bad spec is refused at submit with :class:`~servekit.InvalidInput`), and every
path in them is confined to ``root`` (:class:`~servekit.UnsafePath`): a request must
never name an arbitrary file of the server (BT-08).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .._model import Model
from .._predictor import Predictor
from ..jobs import report_progress
from ._runner import BatchProgress, run_batch

__all__ = ["BatchJob", "BatchRunSpec"]


class BatchRunSpec(BaseModel):
    """The input of a :class:`BatchJob` job: one batch run (paths relative to the
    job's ``root``)."""

    model_config = ConfigDict(extra="forbid")

    #: The input file (``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``).
    input: str
    #: The output file (``.jsonl``, ``.csv``, ``.parquet``).
    output: str
    #: Key columns copied to the output.
    key: list[str] = Field(default_factory=list)
    #: The model input: one column (a str), several (a list), or None (see run_batch).
    columns: str | list[str] | None = None
    #: Columns copied to the output as they are.
    passthrough: list[str] = Field(default_factory=list)
    #: A file for the failed rows.
    errors: str | None = None
    #: Input rows per chunk.
    chunk_size: int = Field(default=1000, ge=1)
    #: Stop when more than this share of rows fails.
    max_error_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    #: Skip the chunks an earlier run wrote.
    resume: bool = False
    #: Replace an existing output.
    overwrite: bool = False


class BatchJob(Model[BatchRunSpec, dict[str, Any]]):
    """A model whose input is a :class:`BatchRunSpec`: give it to a
    :class:`~servekit.jobs.JobQueue` and every job is one :func:`run_batch`.

    ``predictor`` scores the rows (a Predictor, used as is, or a Model or function,
    made into one and closed with this job model). Paths in the specs are relative to
    ``root`` and may not leave it. The job's result is the run's report as a dict; its
    progress is the share of the input done (when the source knows its size). A run
    stopped by ``max_error_rate`` fails the job with code ``batch_failed``.

    >>> from servekit.jobs import JobQueue                             # doctest: +SKIP
    >>> jobs = JobQueue(BatchJob(score, root="data"), store="jobs.sqlite3")  # doctest: +SKIP
    >>> jobs.submit({"input": "in.csv", "output": "out.parquet", "key": ["id"]})  # doctest: +SKIP
    """

    def __init__(self, predictor: Predictor[Any, Any] | Any, *, root: str | os.PathLike[str]):
        self._owned = not isinstance(predictor, Predictor)
        self.scorer: Predictor[Any, Any] = Predictor(predictor) if self._owned else predictor
        self.root = Path(root)

    def predict(self, batch: list[BatchRunSpec]) -> list[dict[str, Any]]:
        """Run each spec with :func:`run_batch`; return each report as a dict."""
        return [self._run(spec) for spec in batch]

    def _run(self, spec: BatchRunSpec) -> dict[str, Any]:
        def on_progress(state: BatchProgress) -> None:
            if state.fraction is not None:
                report_progress(state.fraction)

        # Paths stay relative here: run_batch resolves them under root and refuses
        # any that leave it (through "..", an absolute path or a symbolic link).
        report = run_batch(
            self.scorer,
            spec.input,
            spec.output,
            key=spec.key,
            columns=spec.columns,
            passthrough=spec.passthrough,
            chunk_size=spec.chunk_size,
            error_sink=spec.errors,
            max_error_rate=spec.max_error_rate,
            resume=spec.resume,
            overwrite=spec.overwrite,
            progress=on_progress,
            root=self.root,
        )
        report_progress(1.0)
        return {
            "status": report.status,
            "rows_read": report.rows_read,
            "rows_succeeded": report.rows_succeeded,
            "rows_failed": report.rows_failed,
            "chunks_written": report.chunks_written,
            "chunks_skipped": report.chunks_skipped,
            "seconds": report.seconds,
            "failed_by_stage": report.failed_by_stage,
        }

    def close(self) -> None:
        """Close the scoring predictor if this job model made it."""
        if self._owned:
            self.scorer.close()
