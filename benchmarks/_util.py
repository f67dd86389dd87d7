"""Shared helpers for the benchmarks: BLAS pinning, interleaved trials, table output.

The machine the benchmarks run on is shared and noisy, so no figure is an absolute time
on its own: every figure is a difference or a ratio against a baseline measured in the
same run. Each trial runs a baseline and its contender back to back (in an order that
rotates from trial to trial). A throughput figure is the median over trials of the
per-trial ratio; a per-call time is best-of-trials (noise only ever adds time), shown
next to the median of the per-trial differences. Spreads (±) are median absolute
deviations over trials.

Import this module before servekit (or numpy): it pins the BLAS thread pools to one
thread unless the environment already says otherwise. Worker processes inherit that.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import gc  # noqa: E402 - the environment must be set before anything imports numpy
import math  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

__all__ = [
    "Table",
    "describe_run",
    "fmt_int",
    "fmt_us",
    "free_port",
    "mad",
    "median",
    "paired",
    "quantile",
    "run_trials",
    "start_server",
]

#: One measurement: runs a fixed amount of work and returns a number (ns, items/s...).
Measure = Callable[[], float]


def run_trials(
    groups: dict[str, dict[str, Measure]], trials: int, *, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Run every group's measurements once per trial; return the samples.

    Within a group the measurements run back to back, so that a baseline and its
    contender see the same machine; their order rotates from one trial to the next, so
    that neither always runs first. The groups run one after the other in each trial,
    so every comparison is spread over the whole run.
    """
    samples: dict[str, dict[str, list[float]]] = {
        group: {name: [] for name in measures} for group, measures in groups.items()
    }
    for trial in range(-warmup, trials):
        for group, measures in groups.items():
            names = list(measures)
            shift = trial % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                value = measures[name]()
                if trial >= 0:
                    samples[group][name].append(value)
    return samples


def paired(
    a: Sequence[float], b: Sequence[float], op: Callable[[float, float], float]
) -> list[float]:
    """``op(a[i], b[i])`` for each trial ``i``: a difference or a ratio within one trial."""
    return [op(x, y) for x, y in zip(a, b, strict=True)]


def median(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def mad(values: Sequence[float]) -> float:
    """The median absolute deviation from the median (a noise-resistant spread)."""
    mid = statistics.median(values)
    return statistics.median(abs(v - mid) for v in values)


def fmt_us(value: float) -> str:
    """Microseconds with two or three significant figures."""
    size = abs(value)
    if size < 10:
        return f"{value:.2f}"
    if size < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_int(value: float) -> str:
    """A count with thousands separators."""
    return f"{value:,.0f}"


class Table:
    """Rows of cells printed as aligned columns, one line per measured row.

    Each row is: the group, a label, the figures, the target, and a verdict: ``ok`` or
    ``MISS`` for a figure with a target, ``info`` for one reported for information.
    """

    def __init__(self, group: str) -> None:
        self.group = group
        self._rows: list[tuple[str, list[str], str, str]] = []

    def row(
        self,
        label: str,
        *cells: str,
        target: str | None = None,
        met: bool | None = None,
    ) -> None:
        """Add a row; ``target`` is e.g. ``"<= 5 µs"`` and ``met`` whether it was met."""
        if target is None:
            target_text, verdict = "", "info"
        else:
            target_text, verdict = f"target {target}", "ok" if met else "MISS"
        self._rows.append((label, list(cells), target_text, verdict))

    def print(self, header: str = "") -> None:
        """Print the header line (if any), then the rows, aligned."""
        if header:
            print(f"# {header}")
        ncells = max((len(cells) for _, cells, _, _ in self._rows), default=0)
        lines = [
            [self.group, label, *cells, *[""] * (ncells - len(cells)), target, verdict]
            for label, cells, target, verdict in self._rows
        ]
        widths = [max(map(len, column)) for column in zip(*lines, strict=True)]
        for line in lines:
            text = "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            print(text.rstrip())
        sys.stdout.flush()


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    command: Sequence[str], directory: str, ready_url: str, timeout_s: float = 60.0
) -> subprocess.Popen[bytes]:
    """Start a server process in ``directory`` (on ``PYTHONPATH``) and wait until a GET
    of ``ready_url`` answers 200; the process is killed if it never does."""
    proc = subprocess.Popen(
        list(command), cwd=directory, env={**os.environ, "PYTHONPATH": directory}
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{' '.join(command)} did not become ready")
        time.sleep(0.05)


def describe_run(trials: int, what: str) -> str:
    """A header: what the figures are, the interpreter, the CPUs and the trial count."""
    return (
        f"{what}; {trials} interleaved trials; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; ± is the median absolute deviation over trials"
    )
