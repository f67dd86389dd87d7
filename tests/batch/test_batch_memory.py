"""BT-05: a 1 GiB Parquet input is scored with a bounded peak memory (streaming)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS, WIDTH = 1 << 20, 256  # 1,048,576 rows x 1 KiB = 1 GiB of float32
LIMIT_MIB = 300

_RUN = textwrap.dedent(
    """
    import json, sys
    from servekit.batch import run_batch

    def row_sum(batch):
        return [float(row.sum()) for row in batch]

    report = run_batch(row_sum, sys.argv[1], sys.argv[2], key="id", columns="x",
                       chunk_size=4096, progress=False)
    # VmHWM: this process's peak resident set since exec (ru_maxrss would also count
    # the pages shared with the parent it was forked from).
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    peak = int(hwm.split()[1]) / 1024  # KiB -> MiB
    print(json.dumps({"rows": report.rows_succeeded, "peak_mib": peak}))
    """
)


def test_batch_bt05_a_1_gib_parquet_input_runs_in_bounded_memory(tmp_path: Path) -> None:
    source = tmp_path / "big.parquet"
    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), WIDTH))])
    step = 1 << 16
    block = np.arange(step * WIDTH, dtype=np.float32)  # distinct values: no encoding wins
    with pq.ParquetWriter(
        source, schema, compression="none", use_dictionary=False, write_statistics=False
    ) as writer:
        for start in range(0, ROWS, step):
            ids = np.arange(start, start + step, dtype=np.int64)
            x = pa.FixedSizeListArray.from_arrays(pa.array(block), WIDTH)
            writer.write_table(pa.table({"id": ids, "x": x}, schema=schema))
    assert source.stat().st_size >= 1 << 30

    result = subprocess.run(
        [sys.executable, "-c", _RUN, str(source), str(tmp_path / "out.parquet")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["rows"] == ROWS
    assert figures["peak_mib"] < LIMIT_MIB, figures
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == ROWS
    assert out["prediction"][0].as_py() == float(sum(range(WIDTH)))
    print(f"\nBT-05: 1 GiB Parquet scored with a peak RSS of {figures['peak_mib']:.0f} MiB")
