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
4. Ray: ``runner=RayRunner()`` on ``ray.init(num_cpus=2)`` (started before the clock;
   Ray Data starting its actor pool is on the clock, as it is in every real run).

Each figure is the median over TRIALS of a per-trial ratio, the runs of a trial back
to back in an order that rotates. Run: ``nox -s bench_distributed`` (needs the dask and
ray extras and dask[dataframe], so it lives in its own directory, which ``nox -s
bench`` does not run: it runs every benchmarks/*.py, and this one needs the extras).
About two and a half minutes of CPU on 2 cores; longer on a loaded machine.

No ``from __future__ import annotations`` here: the model is defined in ``__main__``,
so it goes to the workers by value, and string annotations could not be resolved there.
"""

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
TRIALS = 3
RAY_TRIALS = 2
TARGET_DASK, TARGET_HAND = 1.6, 0.9


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


def main() -> None:
    import servekit as sk
    from servekit.batch import DaskRunner, RayRunner, run_batch

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

        from distributed import Client, LocalCluster

        dask_ratios: list[float] = []
        hand_ratios: list[float] = []
        rates_by: dict[str, list[float]] = {"local": [], "dask": [], "hand": [], "ray": []}
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
            for trial in range(TRIALS):
                runs = [("local", local), ("dask", dask), ("hand", hand)]
                runs = runs[trial % 3 :] + runs[: trial % 3]
                got = {name: timed(fn) for name, fn in runs}
                for name, rate in got.items():
                    rates_by[name].append(rate)
                dask_ratios.append(got["dask"] / got["local"])
                hand_ratios.append(got["dask"] / got["hand"])

        import ray

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ray.init(
                num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
            )
            ray.data.DataContext.get_current().enable_progress_bars = False
            ray_runner = RayRunner()
            ray_ratios = []

            def on_ray() -> int:
                clear(out)
                report = run_batch(
                    gil_bound,
                    src,
                    out,
                    key="id",
                    columns="x",
                    chunk_size=CHUNK,
                    progress=False,
                    runner=ray_runner,
                )
                return report.rows_succeeded

            tiny = d / "tiny.parquet"
            make_input(tiny, CHUNK)
            ray_fixed: list[float] = []
            steady_ratios: list[float] = []
            for trial in range(RAY_TRIALS):
                runs = [("local", local), ("ray", on_ray)]
                if trial % 2:
                    runs.reverse()
                got = {name: timed(fn) for name, fn in runs}
                rates_by["local"].append(got["local"])
                rates_by["ray"].append(got["ray"])
                ray_ratios.append(got["ray"] / got["local"])
                # The fixed cost of a run (Ray Data starting its actor pool, each actor
                # importing servekit and loading the model): a run over one chunk.
                t = time.perf_counter()
                clear(out)
                run_batch(
                    gil_bound,
                    tiny,
                    out,
                    key="id",
                    columns="x",
                    chunk_size=CHUNK,
                    progress=False,
                    runner=ray_runner,
                )
                fixed = time.perf_counter() - t
                ray_fixed.append(fixed)
                steady = ROWS / (ROWS / got["ray"] - fixed)
                steady_ratios.append(steady / got["local"])
            ray.shutdown()
        local_predictor.close()

    table = Table("batch on a cluster")
    for name, label in (
        ("local", "local (Inline) rows/s"),
        ("dask", "DaskRunner rows/s"),
        ("hand", "hand-written dask.dataframe rows/s"),
        ("ray", "RayRunner rows/s"),
    ):
        table.row(label, f"{median(rates_by[name]):,.0f}")

    def trials(values: list[float]) -> str:
        return f"(trials {', '.join(f'{v:.2f}' for v in values)})"

    dask_ratio, hand_ratio, ray_ratio = median(dask_ratios), median(hand_ratios), median(ray_ratios)
    table.row(
        "DaskRunner ÷ local",
        f"{dask_ratio:.2f}",
        trials(dask_ratios),
        target=f">= {TARGET_DASK}",
        met=dask_ratio >= TARGET_DASK,
    )
    table.row(
        "DaskRunner ÷ hand-written",
        f"{hand_ratio:.2f}",
        trials(hand_ratios),
        target=f">= {TARGET_HAND}",
        met=hand_ratio >= TARGET_HAND,
    )
    table.row(
        "RayRunner ÷ local",
        f"{ray_ratio:.2f}",
        trials(ray_ratios),
        target=f">= {TARGET_DASK}",
        met=ray_ratio >= TARGET_DASK,
    )
    steady_ratio = median(steady_ratios)
    table.row(
        "RayRunner ÷ local, less its fixed start",
        f"{steady_ratio:.2f}",
        f"(fixed start {median(ray_fixed):.1f} s; trials "
        f"{', '.join(f'{v:.2f}' for v in steady_ratios)})",
    )
    table.print(
        describe_run(
            TRIALS,
            f"{ROWS:,} rows x float32[{WIDTH}] Parquet ({ROWS // ROW_GROUP} row groups), "
            f"GIL-bound model, chunks of {CHUNK}; 2 worker processes / 2 Ray CPUs; "
            f"{TRIALS} Dask trials, {RAY_TRIALS} Ray trials; "
            f"{os.environ.get('OPENBLAS_NUM_THREADS')} BLAS thread",
        )
    )


if __name__ == "__main__":
    main()
