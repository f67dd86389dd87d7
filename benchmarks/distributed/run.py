"""Batch inference on a cluster: DaskRunner and RayRunner against a local run, and
against a hand-written dask.dataframe pipeline doing the same work.

The input is the batch benchmark's (benchmarks/batch.py): a Parquet file of ``id``
int64 and ``x`` fixed_size_list<float32>[64], scored by its GIL-bound model (a
pure-Python loop per row, so threads cannot help and only processes scale), in chunks
of CHUNK rows, into Parquet. Row groups hold ROW_GROUP rows, so that the hand-written
pipeline (which splits by row group) gets as many partitions as servekit does.

1. local: ``run_batch(gil_bound, in, out, key="id", columns="x")`` on ``Inline`` in one
   process (the predictor started before the clock);
2. Dask: the same call with ``runner=DaskRunner(client)`` on a LocalCluster of 2 worker
   processes with 1 thread each (the cluster started before the clock; loading the
   model on the workers is on the clock). Target: >= 1.6x the local rows/s;
3. hand-written: ``dd.read_parquet(in).map_partitions(score).to_parquet(out)`` on the
   same cluster. Target: servekit's rows/s >= 0.9x of it;
4. Ray: ``runner=RayRunner()`` on ``ray.init(num_cpus=2)`` (started before the clock,
   with one warm-up run, as the Dask cluster gets: a Ray session's first dataset also
   starts Ray Data's own helper actors, once per session). Ray Data starting the run's
   actor pool is on the clock, as it is in every real run: Ray Data makes a new pool
   for every dataset, where Dask's workers stay up between runs.

   Ray's fixed cost per run (starting the actors: each imports Ray Data and servekit
   and loads the model) is measured in each run: the time of the first result (one
   partition done) less that partition's time at the local rate; the steady ratio is
   the run's rows/s with that fixed cost taken out.

Each figure is the median over the trials of a per-trial ratio, the runs of a trial
back to back in an order that rotates. Run: ``nox -s bench_distributed`` (needs the dask
and ray extras and dask[dataframe], so it lives in its own directory, which ``nox -s
bench`` does not run: it runs every benchmarks/*.py, and this one needs the extras), or
``python benchmarks/distributed/run.py [--only dask|ray] [--trials N]``. About two
minutes on 2 idle cores; longer on a loaded machine.

The model is defined in ``__main__`` (so it goes to the workers by value) in a module
with postponed annotations: servekit resolves them before pickling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _util import Table, describe_run, median  # first: pins BLAS threads

# isort: split
import numpy as np

ROWS = 40_000
WIDTH = 64
CHUNK = 1024
ROW_GROUP = 5_000  # 8 row groups: 4 partitions per worker, as DaskRunner makes
PARTITION_ROWS = 5 * CHUNK  # 40 chunks in 8 partitions, as RayRunner() makes for 2 actors
TRIALS = 3
TARGET_DASK, TARGET_HAND = 1.6, 0.9

#: A figure's row: label, cells, target (None: for information) and whether it was met.
Row = tuple[str, tuple[str, ...], "str | None", "bool | None"]


def gil_bound(batch: list[Any]) -> list[float]:
    """The batch benchmark's GIL-bound model: a pure-Python loop per row."""
    out = []
    for r in batch:
        total = 0.0
        for v in r.tolist() * 40:
            total += v * v
        out.append(total)
    return out


def make_input(path: Path, rows: int = ROWS) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    x = rng.standard_normal(rows * WIDTH).astype(np.float32)
    table = pa.table(
        {
            "id": np.arange(rows, dtype=np.int64),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x), WIDTH),
        }
    )
    pq.write_table(table, path, row_group_size=ROW_GROUP, compression="none")


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def timed(fn: Any) -> float:
    """rows/s of one run of ``fn`` (which returns the rows it wrote)."""
    t = time.perf_counter()
    rows = fn()
    seconds = time.perf_counter() - t
    if rows != ROWS:
        raise RuntimeError(f"the run wrote {rows} rows, not {ROWS}")
    return float(rows / seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("dask", "ray"), help="run one runner's part")
    parser.add_argument("--trials", type=int, default=TRIALS, help="trials per runner")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import servekit as sk
    from servekit.batch import run_batch

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        d = Path(tmp)
        src, out = d / "in.parquet", d / "out.parquet"
        make_input(src)

        local_predictor = sk.Predictor(gil_bound, validate=False)
        local_predictor.start()

        def local() -> int:
            clear(out)
            report = run_batch(
                local_predictor, src, out, key="id", columns="x", chunk_size=CHUNK, progress=False
            )
            return report.rows_succeeded

        rates: dict[str, list[float]] = {"local": [], "dask": [], "hand": [], "ray": []}
        figures: list[Row] = []
        try:
            if args.only in (None, "dask"):
                figures += bench_dask(rates, local, src, out, args.trials)
            if args.only in (None, "ray"):
                figures += bench_ray(rates, local, d, src, out, args.trials)
        finally:
            local_predictor.close()

    table = Table("batch on a cluster")
    for name, label in (
        ("local", "local (Inline) rows/s"),
        ("dask", "DaskRunner rows/s"),
        ("hand", "hand-written dask.dataframe rows/s"),
        ("ray", "RayRunner rows/s"),
    ):
        if rates[name]:
            table.row(label, f"{median(rates[name]):,.0f}")
    for label, cells, target, met in figures:
        table.row(label, *cells, target=target, met=met)
    table.print(
        describe_run(
            args.trials,
            f"{ROWS:,} rows x float32[{WIDTH}] Parquet ({ROWS // ROW_GROUP} row groups), "
            f"GIL-bound model, chunks of {CHUNK}; 2 worker processes / 2 Ray CPUs; "
            f"{os.environ.get('OPENBLAS_NUM_THREADS')} BLAS thread; load average "
            f"{os.getloadavg()[0]:.1f} at the end",
        )
    )


def _time_model(rows: list[Any]) -> float:
    """Seconds of the model on ``rows`` (run on a worker, or here)."""
    t = time.perf_counter()
    gil_bound(rows)
    return time.perf_counter() - t


def cluster_cores(client: Any) -> float:
    """How many cores the two workers get now: 2 x the model's time alone in this process
    / its mean time on both workers at once (2.0 = both cores free).

    DaskRunner ÷ local cannot exceed it, whatever the runner does: on a shared machine
    the two processes are often given much less than two cores.
    """
    rows = list(np.random.default_rng(2).standard_normal((1500, WIDTH)).astype(np.float32))
    alone = min(_time_model(rows) for _ in range(2))
    workers = list(client.nthreads())
    futures = [client.submit(_time_model, rows, workers=[w], pure=False) for w in workers]
    together = client.gather(futures)
    return float(len(workers) * alone / (sum(together) / len(together)))


def trials_text(values: list[float]) -> str:
    return f"(trials {', '.join(f'{v:.2f}' for v in values)})"


def bench_dask(
    rates: dict[str, list[float]], local: Any, src: Path, out: Path, trials: int
) -> list[Row]:
    """DaskRunner and the hand-written pipeline against local runs: the figures' rows."""
    from distributed import Client, LocalCluster
    from servekit.batch import DaskRunner, run_batch

    dask_ratios: list[float] = []
    hand_ratios: list[float] = []
    cores: list[float] = []
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
        ) as cluster,
        Client(cluster) as client,
    ):
        runner = DaskRunner(client)

        def dask() -> int:
            clear(out)
            report = run_batch(
                gil_bound,
                src,
                out,
                key="id",
                columns="x",
                chunk_size=CHUNK,
                progress=False,
                runner=runner,
            )
            return report.rows_succeeded

        def hand() -> int:
            import dask.dataframe as dd
            import pandas as pd

            def score(df: Any) -> Any:
                return pd.DataFrame(
                    {"id": df["id"].to_numpy(), "prediction": gil_bound(list(df["x"]))}
                )

            clear(out)
            frame = dd.read_parquet(src, split_row_groups=True)
            meta = pd.DataFrame({"id": np.array([], np.int64), "prediction": np.array([])})
            frame.map_partitions(score, meta=meta).to_parquet(out, write_index=False)
            return int(dd.read_parquet(out).shape[0].compute())

        dask(), hand()  # warm-up: the workers import servekit, pyarrow, pandas
        for trial in range(trials):
            cores.append(cluster_cores(client))
            runs = [("local", local), ("dask", dask), ("hand", hand)]
            runs = runs[trial % 3 :] + runs[: trial % 3]
            got = {name: timed(fn) for name, fn in runs}
            for name, rate in got.items():
                rates[name].append(rate)
            dask_ratios.append(got["dask"] / got["local"])
            hand_ratios.append(got["dask"] / got["hand"])
    dask_ratio, hand_ratio = median(dask_ratios), median(hand_ratios)
    return [
        (
            "cores the 2 workers get now",
            (f"{median(cores):.2f}", trials_text(cores)),
            None,
            None,
        ),
        (
            "DaskRunner ÷ local",
            (f"{dask_ratio:.2f}", trials_text(dask_ratios)),
            f">= {TARGET_DASK}",
            dask_ratio >= TARGET_DASK,
        ),
        (
            "DaskRunner ÷ hand-written",
            (f"{hand_ratio:.2f}", trials_text(hand_ratios)),
            f">= {TARGET_HAND}",
            hand_ratio >= TARGET_HAND,
        ),
    ]


def bench_ray(
    rates: dict[str, list[float]], local: Any, d: Path, src: Path, out: Path, trials: int
) -> list[Row]:
    """RayRunner against local runs, and Ray's fixed cost per run: the figures' rows."""
    import ray

    from servekit.batch import BatchProgress, RayRunner, run_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # The plan RayRunner() makes here (4 partitions per actor), said explicitly so
        # that the first result is known to hold one partition's rows.
        runner = RayRunner(partition_rows=PARTITION_ROWS)
        seen: list[BatchProgress] = []

        def on_ray(path: Path = src) -> int:
            clear(out)
            seen.clear()
            report = run_batch(
                gil_bound,
                path,
                out,
                key="id",
                columns="x",
                chunk_size=CHUNK,
                progress=seen.append,
                runner=runner,
            )
            return report.rows_succeeded

        tiny = d / "tiny.parquet"
        make_input(tiny, 2 * CHUNK)
        t = time.perf_counter()
        on_ray(tiny)  # warm-up: the session's first dataset starts Ray Data's helpers
        first_run = time.perf_counter() - t
        ratios: list[float] = []
        fixed: list[float] = []
        steady: list[float] = []
        for trial in range(trials):
            runs = [("local", local), ("ray", on_ray)]
            if trial % 2:
                runs.reverse()
            got = {name: timed(fn) for name, fn in runs}
            rates["local"].append(got["local"])
            rates["ray"].append(got["ray"])
            ratios.append(got["ray"] / got["local"])
            # The fixed cost of this run: the first result came when one actor had
            # started and predicted one partition (at about the local rate).
            first = next(p.elapsed_s for p in seen if p.rows_read)
            cost = first - PARTITION_ROWS / got["local"]
            fixed.append(cost)
            steady.append(ROWS / (ROWS / got["ray"] - cost) / got["local"])
        ray.shutdown()
    return [
        ("RayRunner ÷ local", (f"{median(ratios):.2f}", trials_text(ratios)), None, None),
        (
            "RayRunner ÷ local, less its fixed cost per run",
            (f"{median(steady):.2f}", trials_text(steady)),
            None,
            None,
        ),
        (
            "RayRunner fixed cost per run (actor start)",
            (f"{median(fixed):.2f} s", f"(trials {', '.join(f'{v:.2f}' for v in fixed)})"),
            None,
            None,
        ),
        (
            "RayRunner first run of a Ray session",
            (f"{first_run:.2f} s", "(2 chunks; Ray Data starts its helper actors once)"),
            None,
            None,
        ),
    ]


if __name__ == "__main__":
    main()
