"""Models pickled by value (defined in ``__main__``) under postponed annotations keep
their signature: the copy a worker unpickles validates its inputs as the original does.

The models live in ``_main_models.py``, run as a script in a subprocess, so that they
are ``__main__``'s and cloudpickle sends them by value, with only the globals their
code uses (not the names their string annotations refer to).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

import servekit as sk

SCRIPT = Path(__file__).parent / "_main_models.py"


def run_script(*args: str, cwd: Path) -> list[dict[str, Any]]:
    """Run the script as ``__main__``; the JSON lines it printed."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "could not resolve the annotations" not in done.stderr, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_a_copy_unpickled_elsewhere_validates_as_the_original(tmp_path: Path) -> None:
    run_script("pickle", str(tmp_path / "models.pkl"), cwd=tmp_path)
    blobs = cloudpickle.loads((tmp_path / "models.pkl").read_bytes())
    # Unpickled here, away from the script's globals (filterwarnings=error: a model
    # whose annotations cannot be resolved warns, and the test fails on it).
    check(cloudpickle.loads(blobs["Norm"]), cloudpickle.loads(blobs["total"]))


def test_a_model_saved_in_a_store_and_loaded_elsewhere_validates(tmp_path: Path) -> None:
    from servekit.registry import ModelStore

    run_script("store", str(tmp_path / "models"), cwd=tmp_path)
    store = ModelStore(tmp_path / "models")
    check(store.load("Norm:1"), store.load("total:1"))


def check(norm_model: Any, total_model: Any) -> None:
    norm, total = sk.Predictor(norm_model), sk.Predictor(total_model)
    assert norm.validates and total.validates
    assert "Point" in repr(norm.signature)
    with norm, total:
        assert norm.predict({"x": 3, "y": 4}) == 5.0
        with pytest.raises(sk.InvalidInput, match="x"):
            norm.predict({"x": "not a number", "y": 1})
        assert total.predict([1, 2, 3]) == 6.0
        with pytest.raises(sk.InvalidInput, match="shape"):
            total.predict(np.zeros(2, dtype=np.float32))


def test_processes_back_end_fails_the_invalid_row_at_validate(tmp_path: Path) -> None:
    # Processes validates in the parent, before the pickled model sees a row: a guard
    # that the by-value path keeps doing so.
    reports = run_script("processes", cwd=tmp_path)
    assert [r["model"] for r in reports] == ["Norm", "total"]
    for report in reports:
        assert report["failed"] == [{"row": 7, "stage": "validate"}], report
        assert report["rows_succeeded"] == 11, report
