"""RayRunner: run_batch's partitions on Ray Data (extra ``ray``).

The driver plans the partitions (see ``_partitions``) and makes a Ray Dataset of them,
one row (a pickled partition) per block. ``map_batches`` runs them on a pool of actors
of a callable class: each actor unpickles and loads the model once, in its constructor,
and keeps it for every partition it is given. A partition's result (its chunk counts
and row errors, or its outputs for sinks the driver writes) comes back as one row;
the driver turns each into counts and progress, so on Ray progress moves a partition
at a time. Ray retries the task of an actor that died on another actor; the retry's
parts are committed once, as on Dask (``_attempts``).

The read is fused with the model: a Parquet, CSV or JSON Lines partition is read by
the actor that predicts it (the dataset holds only the partitions' descriptions), and
file outputs are written by the actors, so only counts and row errors come back.
Each actor is given one partition at a time (``max_tasks_in_flight_per_actor=1``):
partitions are coarse (seconds each), so a second one queued on a busy actor would
only wait there while another actor may sit idle at the end of the run.

What Ray costs: Ray Data starts a new pool of actors for every dataset, so every run
pays for its actors' start (a process each, importing Ray Data and servekit and
loading the model: about a second of CPU per actor); a Ray session's first dataset
also starts Ray Data's own helper actors. See "When Ray pays off" in the guide.

``ray`` is imported only here, when a run starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._partitions import (
    DriverWriter,
    WorkerModel,
    make_spec,
    model_payload,
    plan,
    run_partition,
)
from ._runner import RunnerJob, _ChunkResult
from ._types import Chunk

__all__ = ["RayRunner"]


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError('RayRunner needs Ray Data: pip install "servekit[ray]"') from exc
    return ray


class RayRunner:
    """Run a batch job on Ray: ``run_batch(..., runner=RayRunner())``.

    Runs on the Ray cluster this process is connected to (call ``ray.init(...)`` first;
    without it Ray Data starts a local one). ``actors`` model replicas run at once
    (default: the cluster's CPUs divided by ``num_cpus``), each an actor that loads the
    model once; ``num_cpus`` (and ``num_gpus``) are reserved per actor. The input is split
    into partitions of about ``partition_rows`` rows (default: about four per actor).
    File outputs are written by the actors, so their path must be on storage that every
    node and the driver see; other sinks are written by the driver.

    Example::

        import ray
        ray.init(address="auto")
        report = run_batch(model, "in.parquet", "out.parquet", key="id",
                           runner=RayRunner(actors=8))
    """

    def __init__(
        self,
        *,
        actors: int | None = None,
        partition_rows: int | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> None:
        _import_ray()
        for name, value in (("actors", actors), ("partition_rows", partition_rows)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        self.actors = actors
        self.partition_rows = partition_rows
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    def __repr__(self) -> str:
        return f"RayRunner(actors={self.actors!r}, partition_rows={self.partition_rows!r})"

    def _pool_size(self, ray: Any) -> int:
        if self.actors is not None:
            return self.actors
        if not ray.is_initialized():
            ray.init()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        return max(1, int(cpus / self.num_cpus) if self.num_cpus else int(cpus))

    def _execute(self, job: RunnerJob, write: Callable[[Chunk, _ChunkResult], None]) -> None:
        """Plan the partitions, run them through ``map_batches``, collect the results."""
        import cloudpickle

        ray = _import_ray()
        size = self._pool_size(ray)
        reader, planned = plan(job, size, self.partition_rows)
        parts = list(planned)  # Ray Data builds its dataset from a list
        if not parts:
            return
        spec = make_spec(job, reader)
        payload, validate = model_payload(job)
        writer = DriverWriter(job, spec, write)
        for part in parts:
            writer.expect(part.index)
        items = [{"part": cloudpickle.dumps(part)} for part in parts]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            _Worker,
            fn_constructor_kwargs={
                "payload": payload,
                "validate": validate,
                "spec": cloudpickle.dumps(spec),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=min(size, len(parts)), max_tasks_in_flight_per_actor=1
            ),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
        )
        for row in results.iter_rows():
            writer.finished(cloudpickle.loads(row["result"]))
        writer.close()


class _Worker:
    """The callable class ``map_batches`` runs on each actor: the model is loaded once,
    in the constructor, and used for every partition the actor is given."""

    def __init__(self, payload: bytes, validate: bool, spec: bytes) -> None:
        import cloudpickle

        self.model = WorkerModel(payload, validate)
        self.model.predictor()  # loaded once per actor, here
        self.spec = cloudpickle.loads(spec)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        import cloudpickle

        out = []
        for blob in batch["part"]:
            result = run_partition(self.spec, self.model.predictor(), cloudpickle.loads(blob))
            out.append(cloudpickle.dumps(result))
        return {"result": out}

    def __del__(self) -> None:
        # The model's close() runs here. As of Ray 2.60 this is the one teardown hook
        # Ray Data gives a callable class: Ray Core calls ``__ray_shutdown__`` on an
        # actor's class when the actor exits gracefully, but the actor class is Ray
        # Data's own wrapper (``_MapWorker``), whose ``__ray_shutdown__`` drops its
        # reference to this instance so that ``__del__`` runs; a method of ours by
        # that name would never be called, and Ray Data documents no close/teardown
        # method for the callable class. Not called when an actor is killed or dies.
        model = getattr(self, "model", None)
        if model is not None:
            model.close()
