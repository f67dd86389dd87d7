"""The worker side of :class:`~servekit.batch.DaskRunner`: the model plugin and the task.

Imported on the driver only when a run starts (and by the workers when they unpickle
the plugin and the task), so ``import servekit.batch`` never imports ``distributed``.
"""

from __future__ import annotations

from typing import Any, cast

from distributed import WorkerPlugin, get_worker  # type: ignore[import-not-found,unused-ignore]

from ._partitions import ChunkStat, Partition, PartitionResult, WorkerModel, WorkSpec, run_partition

__all__ = ["ModelPlugin", "task"]


class ModelPlugin(WorkerPlugin):  # type: ignore[misc,unused-ignore]
    """Holds a run's model on each Dask worker: loaded on first use by a task of the
    run, kept for every later one, closed when the driver unregisters the plugin (or
    the worker shuts down)."""

    def __init__(self, payload: bytes, validate: bool) -> None:
        self.payload = payload
        self.validate = validate
        self.model: WorkerModel | None = None

    def setup(self, worker: Any) -> None:
        """Make the (not yet loaded) model holder."""
        self.model = WorkerModel(self.payload, self.validate)

    def teardown(self, worker: Any) -> None:
        """Close the model, if a task loaded it."""
        if self.model is not None:
            self.model.close()


def task(spec: WorkSpec, part: Partition, plugin_name: str, topic: str) -> PartitionResult:
    """Run one partition on this worker's copy of the model; report each chunk written
    as an event on ``topic``."""
    worker = get_worker()
    plugin = cast(ModelPlugin, worker.plugins[plugin_name])
    model = plugin.model
    if model is None:  # pragma: no cover - setup runs before any task can
        model = plugin.model = WorkerModel(plugin.payload, plugin.validate)

    def report(stat: ChunkStat) -> None:
        worker.log_event(topic, [stat.index, stat.size, stat.n_rows, stat.n_failed])

    return run_partition(spec, model.predictor(), part, report)
