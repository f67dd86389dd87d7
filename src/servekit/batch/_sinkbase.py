"""What the sinks share: values as JSON text, the check that a chunk's columns all
have its rows, and the run manifest a sink stores and compares on resume."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from servekit.errors import ResumeMismatch

__all__: list[str] = []


# --------------------------------------------------------------------------- values


def _check_lengths(columns: dict[str, Any], n_rows: int) -> None:
    """Raise ``ValueError`` unless every column has ``n_rows`` values."""
    for name, values in columns.items():
        if len(values) != n_rows:
            raise ValueError(f"column {name!r} has {len(values)} values for {n_rows} rows")


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: numpy to Python, models dumped, NaN/inf to None."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return _jsonable(model_dump(mode="json"))
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON")


def _json_default(value: Any) -> Any:
    """``json.dumps`` hook for values it does not know (numpy, pydantic, dates)."""
    return _jsonable(value)


def _json_text(value: Any) -> str:
    """Compact JSON text of ``value``; NaN/inf become ``null``."""
    try:
        return json.dumps(
            value,
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
            default=_json_default,
        )
    except ValueError:  # a NaN or infinity somewhere: clean the whole value
        return json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- manifests


def _normalized(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as it reads back from JSON (tuples become lists, and so on)."""
    result: dict[str, Any] = json.loads(json.dumps(manifest, default=_json_default))
    return result


def _check_manifest(stored: Any, manifest: dict[str, Any], where: str) -> None:
    """Raise :class:`ResumeMismatch` naming the keys where ``stored`` and ``manifest`` differ."""
    new = _normalized(manifest)
    if not isinstance(stored, dict):
        raise ResumeMismatch(f"the checkpoint at {where} has an unreadable manifest")
    differing = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
    if differing:
        raise ResumeMismatch(
            f"cannot resume from the checkpoint at {where}: it was written by a run with "
            f"other settings (differing: {', '.join(differing)}). Start over with "
            "overwrite=True."
        )


def _output_columns(manifest: dict[str, Any]) -> list[str] | None:
    """The manifest's ``"output_columns"``, if it is a list of strings."""
    names = manifest.get("output_columns")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    return None
