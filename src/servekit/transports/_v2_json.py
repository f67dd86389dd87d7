"""Strict, depth-bounded JSON parsing for the OIP V2 codec, and checks of parsed values.

:func:`parse_json_bounded` applies the codec's "JSON strictness" rules (see
:mod:`servekit.transports._v2`); the private helpers read one field of a parsed JSON
object and raise :class:`~servekit.transports.V2Error` naming the field when it is
malformed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ._v2_errors import V2Error

__all__ = ["parse_json_bounded"]


# --------------------------------------------------------------------------- JSON

# A JSON string literal, or one structural bracket. An unterminated string runs to the
# end of the input (the parser then refuses it), so every match succeeds on its first,
# greedy path: the scan is linear even for input like '"\\"\\"\\"...' with no closing quote.
_SCAN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
_OPENERS = frozenset("[{")
_CLOSERS = frozenset("]}")


def _refuse_constant(token: str) -> Any:
    raise V2Error(
        f"invalid JSON: {token} is not a JSON value; send non-finite floats as the strings "
        '"NaN", "Infinity", "-Infinity"'
    )


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise V2Error(f"invalid JSON: duplicate key {key!r} in one object")
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(
    parse_constant=_refuse_constant, object_pairs_hook=_object_without_duplicates
)


def parse_json_bounded(body: bytes | memoryview, max_depth: int) -> Any:
    """Parse UTF-8 JSON ``body``, refusing nesting deeper than ``max_depth``.

    The depth is checked by a linear scan before the (recursive) parser runs, so deep
    input is refused quickly and never reaches Python's recursion limit. Invalid UTF-8,
    invalid JSON, ``NaN``/``Infinity`` tokens and duplicate keys raise :class:`V2Error`.

    >>> parse_json_bounded(b'{"a": [1, 2]}', 2)
    {'a': [1, 2]}
    """
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise V2Error(f"invalid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = 0
    # Fewer brackets in all than the limit (most bodies): no need to scan for depth.
    scan = text.count("[") + text.count("{") > max_depth
    for match in _SCAN.finditer(text) if scan else ():
        token = match.group()
        if token in _OPENERS:
            depth += 1
            if depth > max_depth:
                raise V2Error(f"invalid JSON: nested deeper than {max_depth} levels")
        elif token in _CLOSERS:
            depth -= 1
    try:
        return _DECODER.decode(text)
    except V2Error:
        raise
    except RecursionError:  # pragma: no cover - the scan bounds the depth
        raise V2Error("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int strings past Python's digit limit
        raise V2Error(f"invalid JSON: {exc}") from None


# -------------------------------------------------------------------- JSON values


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise V2Error(f"{where} must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _name(item: dict[str, Any], where: str) -> str:
    if "name" not in item:
        raise V2Error(f"{where}.name is required")
    name = item["name"]
    if not isinstance(name, str) or not name:
        raise V2Error(f"{where}.name must be a non-empty string, not {_json_type(name)}")
    return name


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    if "parameters" not in item:
        return {}
    return dict(_object(item["parameters"], f"{where}.parameters"))


def _optional_bool(params: dict[str, Any], key: str, where: str) -> bool | None:
    if key not in params:
        return None
    value = params[key]
    if not isinstance(value, bool):
        raise V2Error(f"{where}.parameters.{key} must be true or false")
    return value
