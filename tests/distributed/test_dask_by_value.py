"""DaskRunner with models defined in ``__main__`` under postponed annotations: each
worker's by-value copy validates its inputs, so the one invalid row of each input
fails at the ``validate`` stage (not in the model, and not silently)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).parent.parent / "_main_models.py"


def test_main_models_validate_on_the_workers(dask_client: Any, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "dask", dask_client.scheduler.address],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in reports] == ["Norm", "total"]
    for report in reports:
        assert report["failed"] == [{"row": 7, "stage": "validate"}], report
        assert report["rows_succeeded"] == 11, report
        assert report["status"] == "completed_with_errors", report
