"""Models the distributed tests send to workers (pickled by value: workers need not
import this module). No ``from __future__ import annotations`` here, so these models do
not rely on the driver resolving string annotations before pickling; the tests with
``tests/_main_models.py`` cover that case."""

import os
import time
from pathlib import Path
from typing import Any

import servekit as sk


def double(xs: list[Any]) -> list[Any]:
    return [x * 2 for x in xs]


class Picky(sk.Model[Any, Any]):
    """Doubles ``x``; fails rows whose ``x`` is a multiple of 97 (a model error); notes
    every load() in ``loads_dir`` (one file per load, named by the process id)."""

    def __init__(self, loads_dir: str | None = None, delay_s: float = 0.0) -> None:
        self.loads_dir = loads_dir
        self.delay_s = delay_s

    def load(self) -> None:
        if self.loads_dir is not None:
            Path(self.loads_dir, f"{os.getpid()}-{time.monotonic_ns()}").touch()

    def predict(self, batch: list[Any]) -> list[Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        out: list[Any] = []
        for x in batch:
            value = float(x)
            out.append(ValueError(f"bad x {value}") if value % 97 == 0 else value * 2)
        return out


class FailWhile(sk.Model[Any, Any]):
    """Fails every row whose ``x`` is at least ``from_x`` while ``flag`` exists, after
    ``delay_s`` seconds (once per batch that has such rows)."""

    def __init__(self, flag: str, from_x: float, delay_s: float = 0.0) -> None:
        self.flag = flag
        self.from_x = from_x
        self.delay_s = delay_s

    def predict(self, batch: list[Any]) -> list[Any]:
        broken = os.path.exists(self.flag)
        out = [
            RuntimeError("broken") if broken and float(x) >= self.from_x else float(x) * 2
            for x in batch
        ]
        if self.delay_s and any(isinstance(o, RuntimeError) for o in out):
            time.sleep(self.delay_s)
        return out


def loads(loads_dir: Path) -> "dict[int, int]":
    """How many times each process id loaded the model."""
    counts: dict[int, int] = {}
    for entry in loads_dir.iterdir():
        pid = int(entry.name.split("-")[0])
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def duckdb_read_only(path: str) -> Any:
    """A read-only DuckDB connection (duckdb.connect itself cannot be pickled)."""
    import duckdb

    return duckdb.connect(path, read_only=True)
