"""Offline batch inference: run_batch against a hand-written pyarrow loop, memory, processes.

1. Throughput. A Parquet file of ROWS rows (``id`` int64, ``x`` fixed_size_list<float32>
   [256]) is scored by the MLP of the batching benchmark (256 -> 1024 ReLU -> 16, BLAS
   pinned to one thread) into Parquet, chunks of CHUNK rows:
   - baseline: a hand-written loop: ``ParquetFile.iter_batches(CHUNK)``, the 2-D array
     from the list column, the model, a ``ParquetWriter`` with id + prediction;
   - servekit: ``run_batch(mlp, in, out, key="id", columns="x", chunk_size=CHUNK)``.
   Each runs in its own fresh process, interleaved; the figure is the median over trials
   of servekit rows/s ÷ baseline rows/s. Target >= 0.9.
2. Memory. Peak RSS (ru_maxrss of a fresh process) of run_batch over the file and over
   one 10x larger with the same schema; target: larger <= 1.2x smaller. The model here
   is a cheap one (the row sum): memory depends on chunking, and the MLP over 10x the
   rows would only make the benchmark slow.
3. Processes. rows/s of run_batch with ``Processes(2)`` over ``Inline`` on a GIL-bound
   model (a pure-Python loop per row), target >= 1.6x.

Run: ``python benchmarks/batch.py`` (or ``nox -s bench -- batch``); needs pyarrow.
Files go to a temporary directory under the current one (about 12 GB at the peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _util import Table, describe_run, median  # first: pins BLAS threads

ROWS = 1_000_000
CHUNK = 4096
TRIALS = 3
BIG = 10  # the memory test's larger input is this many times larger
GIL_ROWS = 40_000
GIL_CHUNK = 1024
TARGET_RATIO, TARGET_RSS, TARGET_PROCESSES = 0.9, 1.2, 1.6

_COMMON = """
import os, resource, sys, time, json
import numpy as np
import pyarrow as pa, pyarrow.parquet as pq
rng = np.random.default_rng(0)
W1 = (rng.standard_normal((256, 1024)) / 16).astype(np.float32)
W2 = (rng.standard_normal((1024, 16)) / 32).astype(np.float32)

def mlp_array(x):
    return np.maximum(x @ W1, 0) @ W2

def mlp(batch):  # servekit batch function: a list of rows in, a list of rows out
    return list(mlp_array(np.stack(batch)))

def row_sum(batch):
    return [float(r.sum()) for r in batch]

def gil_bound(batch):
    out = []
    for r in batch:
        total = 0.0
        for v in r.tolist() * 40:
            total += v * v
        out.append(total)
    return out

def done(rows, seconds):
    # VmHWM: the peak resident set since exec (ru_maxrss would also count the pages
    # shared with the parent this process was forked from).
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    rss = int(hwm.split()[1]) * 1024
    print(json.dumps({"rows": rows, "seconds": seconds, "rss": rss}))
"""

_BASELINE = """
src, dst, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
f = pq.ParquetFile(src)
writer = None
n = 0
for batch in f.iter_batches(batch_size=chunk):
    x = batch.column("x")
    width = x.type.list_size
    arr = np.asarray(x.flatten()).reshape(-1, width)
    y = mlp_array(arr)
    out = pa.table({
        "id": batch.column("id"),
        "prediction": pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), y.shape[1]),
    })
    if writer is None:
        writer = pq.ParquetWriter(dst, out.schema)
    writer.write_table(out)
    n += len(arr)
writer.close()
done(n, time.perf_counter() - t)
"""

_SERVEKIT = """
import servekit as sk
from servekit.batch import run_batch
src, dst, chunk, model, backend = sys.argv[1:6]
fn = {"mlp": mlp, "row_sum": row_sum, "gil_bound": gil_bound}[model]
predictor = sk.Predictor(fn, validate=False,
                         backend=sk.Processes(2) if backend == "processes" else sk.Inline())
with predictor:  # started (worker processes up) before the clock starts
    t = time.perf_counter()
    report = run_batch(predictor, src, dst, key="id", columns="x", chunk_size=int(chunk),
                       progress=False)
    seconds = time.perf_counter() - t
done(report.rows_succeeded, seconds)
"""


def _run(code: str, *args: object) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", _COMMON + code, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _make_input(path: Path, rows: int, width: int = 256) -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np, pyarrow as pa, pyarrow.parquet as pq
        path, rows, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        rng = np.random.default_rng(1)
        schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), width))])
        with pq.ParquetWriter(path, schema, compression="none") as w:
            step = 100_000
            for start in range(0, rows, step):
                n = min(step, rows - start)
                x = rng.standard_normal(n * width).astype(np.float32)
                w.write_table(pa.table({
                    "id": np.arange(start, start + n, dtype=np.int64),
                    "x": pa.FixedSizeListArray.from_arrays(pa.array(x), width),
                }, schema=schema), row_group_size=step)
        """
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(rows), str(width)], check=True)


def main() -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        d = Path(tmp)
        small, big, gil = d / "in.parquet", d / "big.parquet", d / "gil.parquet"
        _make_input(small, ROWS)

        ratios, base_rates, sk_rates = [], [], []
        for trial in range(TRIALS):
            runs = [("base", _BASELINE, ()), ("sk", _SERVEKIT, ("mlp", "inline"))]
            if trial % 2:
                runs.reverse()
            rates = {}
            for name, code, extra in runs:
                out = d / f"out-{name}-{trial}.parquet"
                r = _run(code, small, out, CHUNK, *extra)
                rates[name] = r["rows"] / r["seconds"]
                out.unlink()
            base_rates.append(rates["base"])
            sk_rates.append(rates["sk"])
            ratios.append(rates["sk"] / rates["base"])

        rss_small = _run(_SERVEKIT, small, d / "s.parquet", CHUNK, "row_sum", "inline")["rss"]
        small.unlink()
        _make_input(big, ROWS * BIG)
        rss_big = _run(_SERVEKIT, big, d / "b.parquet", CHUNK, "row_sum", "inline")["rss"]
        big.unlink()

        _make_input(gil, GIL_ROWS, width=64)
        inline = _run(_SERVEKIT, gil, d / "g1.parquet", GIL_CHUNK, "gil_bound", "inline")
        procs = _run(_SERVEKIT, gil, d / "g2.parquet", GIL_CHUNK, "gil_bound", "processes")
        speedup = (procs["rows"] / procs["seconds"]) / (inline["rows"] / inline["seconds"])

    table = Table("batch")
    ratio = median(ratios)
    table.row("hand-written rows/s", f"{median(base_rates):,.0f}")
    table.row("run_batch rows/s", f"{median(sk_rates):,.0f}")
    table.row(
        "run_batch ÷ hand-written",
        f"{ratio:.2f}",
        f"(trials {', '.join(f'{r:.2f}' for r in ratios)})",
        target=f">= {TARGET_RATIO}",
        met=ratio >= TARGET_RATIO,
    )
    growth = rss_big / rss_small
    table.row(
        f"peak RSS {BIG}x input ÷ 1x",
        f"{growth:.2f}",
        f"({rss_small / 2**20:,.0f} MiB -> {rss_big / 2**20:,.0f} MiB)",
        target=f"<= {TARGET_RSS}",
        met=growth <= TARGET_RSS,
    )
    table.row(
        "Processes(2) ÷ Inline (GIL-bound)",
        f"{speedup:.2f}",
        f"({inline['rows'] / inline['seconds']:,.0f} -> "
        f"{procs['rows'] / procs['seconds']:,.0f} rows/s)",
        target=f">= {TARGET_PROCESSES}",
        met=speedup >= TARGET_PROCESSES,
    )
    table.print(
        describe_run(
            TRIALS,
            f"{ROWS:,} rows x float32[256] Parquet, MLP 256-1024-16, chunks of {CHUNK}; "
            f"each run a fresh process; {os.environ.get('OPENBLAS_NUM_THREADS')} BLAS thread",
        )
    )


if __name__ == "__main__":
    main()
