"""DaskRunner: run_batch's partitions as tasks on a Dask cluster (extra ``dask``).

The driver (the process calling :func:`~servekit.batch.run_batch`) plans the partitions
(see ``_partitions``), registers a worker plugin holding the pickled model, and submits
one task per partition. Each worker unpickles and loads the model the first time one of
its tasks needs it and keeps it until the run ends, when unregistering the plugin closes
it (a worker that joins mid-run, such as the replacement of a killed one, gets the
plugin too). Workers report each chunk they write as a Dask event; the driver turns
those into the run's progress and, when partitions finish, into its counts. A task
whose worker dies is run again by the scheduler on another worker: each run of a
partition writes its parts privately and commits them with one rename that the first
finisher wins (``_attempts``), so the output still holds every row once.

``distributed`` is imported only here, when a DaskRunner is made.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ._partitions import (
    DriverWriter,
    Partition,
    PartitionResult,
    make_spec,
    model_digest,
    model_payload,
    plan,
)
from ._runner import RunnerJob, _ChunkResult
from ._types import Chunk

__all__ = ["DaskRunner"]


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            'DaskRunner needs dask.distributed: pip install "servekit[dask]"'
        ) from exc
    return distributed


class DaskRunner:
    """Run a batch job on a Dask cluster: ``run_batch(..., runner=DaskRunner(client))``.

    ``client`` is a ``distributed.Client`` connected to the cluster (the caller
    owns it; it is never closed here). The input is split into partitions of about
    ``partition_rows`` rows (rounded up to whole chunks; default: about four partitions
    per worker thread); each is one task. Each worker loads the model once and keeps it
    for every partition it runs. File outputs are written by the workers, so their path
    must be on storage that every worker and the driver see; other sinks are written by
    the driver. ``max_in_flight`` bounds the partitions whose rows the driver has read
    and shipped but not yet seen finish (inputs the workers cannot read themselves:
    arrays, DataFrames, iterables, SQL queries without key ranges; default: two per
    worker thread). An ``SQLSource`` given ``connect`` and ``partition_key`` is read by
    the workers in key ranges instead.

    Example::

        from distributed import Client
        with Client("tcp://scheduler:8786") as client:
            report = run_batch(model, "in.parquet", "out.parquet", key="id",
                               runner=DaskRunner(client))
    """

    def __init__(
        self,
        client: Any,
        *,
        partition_rows: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        _import_distributed()
        if partition_rows is not None and (
            isinstance(partition_rows, bool)
            or not isinstance(partition_rows, int)
            or partition_rows < 1
        ):
            raise ValueError(f"partition_rows must be an int >= 1, got {partition_rows!r}")
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        self.client = client
        self.partition_rows = partition_rows
        self.max_in_flight = max_in_flight

    def __repr__(self) -> str:
        return f"DaskRunner({self.client!r}, partition_rows={self.partition_rows!r})"

    def _slots(self) -> int:
        """Worker threads in the cluster (tasks it runs at once), at least 1."""
        threads: dict[str, int] = self.client.nthreads()
        return max(1, sum(threads.values()))

    def _execute(self, job: RunnerJob, write: Callable[[Chunk, _ChunkResult], None]) -> None:
        """Plan, submit and collect the partitions of ``job`` (see the module docs)."""
        distributed = _import_distributed()
        from ._dask_worker import ModelPlugin, task

        client = self.client
        slots = self._slots()
        reader, parts = plan(job, slots, self.partition_rows)
        spec = make_spec(job, reader)
        payload, validate = model_payload(job)
        run_id = uuid.uuid4().hex[:12]
        plugin_name = f"servekit-model-{model_digest(payload)}-{run_id}"
        topic = f"servekit-batch-{run_id}"
        writer = DriverWriter(job, spec, write)
        # Both the event handler and the futures' callbacks run on the client's thread;
        # the driver's thread waits on this queue and does all the counting and writing.
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        pending: dict[Any, Partition] = {}
        limit = self.max_in_flight or 2 * slots
        client.register_plugin(ModelPlugin(payload, validate), name=plugin_name)
        subscribed = False
        try:
            if spec.sink is not None:
                client.subscribe_topic(topic, lambda event: events.put(("chunk", event[1])))
                subscribed = True
            spec_future = client.scatter(spec, broadcast=True, hash=False)

            def submit(part: Partition) -> None:
                arg: Any = part
                if part.chunks is not None:  # rows go to the cluster once, not in a graph
                    arg = client.scatter(part, hash=False)
                future = client.submit(
                    task,
                    spec_future,
                    arg,
                    plugin_name,
                    topic,
                    key=f"servekit-batch-{run_id}-{part.index}",
                    pure=False,
                )
                future.add_done_callback(lambda f: events.put(("done", f)))
                pending[future] = part
                writer.expect(part.index)

            feed: Iterator[Partition] = iter(parts)
            shipped = reader is None

            def fill() -> None:
                for part in feed:
                    submit(part)
                    if shipped and len(pending) >= limit:
                        return

            fill()
            while pending:
                kind, value = events.get()
                if kind == "chunk":
                    writer.tally.progress(*value)
                    continue
                if value not in pending:
                    continue
                pending.pop(value)
                if value.status == "cancelled":
                    raise distributed.CancelledError(
                        f"the cluster cancelled partition task {value.key!r}"
                    )
                result: PartitionResult = value.result()  # re-raises a task's error
                writer.finished(result)
                if shipped:
                    fill()
            writer.close()
        finally:
            if pending:
                client.cancel(list(pending), force=True)
            if subscribed:
                client.unsubscribe_topic(topic)
            # Tears the plugin down on every worker: the model's close() runs there.
            client.unregister_worker_plugin(plugin_name)
