"""Models defined in ``__main__`` under postponed annotations, run the ways that pickle
them by value (cloudpickle): the tests run this file as a script, in a subprocess.

``from __future__ import annotations`` makes every annotation below a string, and a
function pickled by value takes along only the globals its code uses: the names in
the annotations (``Point``, ``Annotated``, ``np``, ``sk``) are not among them. The
signature (what validates the inputs) must still be the one the driver saw.

Usage::

    python _main_models.py pickle OUT      # cloudpickle both models (as run_batch does)
    python _main_models.py store DIR       # save both models in a ModelStore at DIR
    python _main_models.py processes       # run_batch on a Processes back end
    python _main_models.py dask ADDRESS    # run_batch with DaskRunner (a running cluster)
    python _main_models.py ray ADDRESS     # run_batch with RayRunner (a running Ray)

Each run prints one JSON line per model: its report's status, rows succeeded and
failures by stage, and the failed rows' keys and stages.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Annotated, Any

import numpy as np
import pydantic

import servekit as sk
from servekit.batch import run_batch


class Point(pydantic.BaseModel):
    x: float
    y: float


class Norm(sk.Model[Point, float]):
    """Items must be Points: a plain dict has no ``.x``."""

    def predict(self, batch: list[Point]) -> list[float]:
        return [(p.x * p.x + p.y * p.y) ** 0.5 for p in batch]


def total(batch: list[Annotated[np.ndarray, sk.Array("float32", (3,))]]) -> list[float]:
    """Items must be float32 arrays of 3 values: a list has no ``.sum()``."""
    return [float(v.sum()) for v in batch]


N = 12
BAD = 7  # the row of each input that fails validation


def inputs() -> dict[str, tuple[Any, list[Any], dict[str, Any]]]:
    points: list[Any] = [{"id": i, "x": float(i), "y": 1.0} for i in range(N)]
    points[BAD] = {"id": BAD, "x": "not a number", "y": 1.0}
    arrays: list[Any] = [np.full(3, i, dtype=np.float32) for i in range(N)]
    arrays[BAD] = np.zeros(2, dtype=np.float32)  # the wrong shape
    return {
        "Norm": (Norm(), points, {"key": "id", "columns": ["x", "y"]}),
        "total": (total, arrays, {}),
    }


def main() -> None:
    mode = sys.argv[1]
    if mode == "store":
        from servekit.registry import ModelStore

        store = ModelStore(sys.argv[2])
        for name, (model, _, _) in inputs().items():
            store.save(name, model)  # no Predictor made first
        return
    if mode == "pickle":
        import cloudpickle

        blobs = {}
        for name, (model, _, _) in inputs().items():
            predictor = sk.Predictor(model)  # as run_batch makes it, before pickling
            blobs[name] = cloudpickle.dumps(predictor.model)
        with open(sys.argv[2], "wb") as f:
            f.write(cloudpickle.dumps(blobs))
        return
    runner: Any = None
    if mode == "dask":
        from distributed import Client
        from servekit.batch import DaskRunner

        client = Client(sys.argv[2])
        runner = DaskRunner(client)
    elif mode == "ray":
        import ray

        from servekit.batch import RayRunner

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ray.init(address=sys.argv[2], log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        runner = RayRunner(actors=1)
    for name, (model, rows, options) in inputs().items():
        if mode == "processes":
            model = sk.Predictor(model, backend=sk.Processes(1))
            model.start()
        out: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        report = run_batch(
            model,
            rows,
            out,
            error_sink=errors,
            chunk_size=4,
            progress=False,
            runner=runner,
            **options,
        )
        if mode == "processes":
            model.close()
        failed = [{"row": e["row"], "stage": e["stage"]} for e in errors]
        print(
            json.dumps(
                {
                    "model": name,
                    "status": report.status,
                    "rows_succeeded": report.rows_succeeded,
                    "failed_by_stage": report.failed_by_stage,
                    "failed": failed,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
