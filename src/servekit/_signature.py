"""Input and output schemas: what one item of a model looks like.

A :class:`Signature` holds the type of one input item and one output item. Inputs are
validated with pydantic (models, dataclasses, TypedDicts, primitives, and numpy arrays
described by :class:`Array`) before anything is queued, so a bad item is rejected with
:class:`~servekit.InvalidInput` naming the field path, and never reaches a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

import numpy as np
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, TypeAdapter, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from .errors import InvalidInput

__all__ = ["Array", "Signature"]

_MAX_REPORTED_ERRORS = 5


@dataclass(frozen=True, slots=True)
class Array:
    """The dtype and shape of a numpy array item, for signatures and pydantic fields.

    ``shape`` is the shape of one item (no batch dimension); ``None`` in a dimension
    accepts any length, and ``shape=None`` accepts any shape. Nested lists are
    converted; values are cast when numpy calls the cast ``same_kind`` (float64 to
    float32, int to float), and refused otherwise (float to int, str to float).

    Integers are also accepted into a narrower integer dtype when every value fits
    (JSON integers arrive as int64).

    Use it as the item type, or inside an annotation::

        @sk.model(input_type=sk.Array("float32", (256,)))
        def score(batch): ...

        class Request(pydantic.BaseModel):
            pixels: Annotated[np.ndarray, sk.Array("uint8", (28, 28))]
    """

    #: The dtype items are converted to, e.g. ``"float32"``.
    dtype: Any
    #: The shape of one item; ``None`` entries accept any length.
    shape: tuple[int | None, ...] | None = None

    def validate(self, value: Any) -> np.ndarray[Any, Any]:
        """Return ``value`` as an array of this dtype and shape, or raise ValueError."""
        target = np.dtype(self.dtype)
        if isinstance(value, np.ndarray):
            array = value
        else:
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"cannot be read as an array ({exc})") from None
        if array.dtype != target:
            if array.dtype.kind in "iu" and target.kind in "iu" and array.size:
                # Integers from JSON arrive as int64: accept them when every value fits.
                info = np.iinfo(target)
                if array.min() < info.min or array.max() > info.max:
                    raise ValueError(f"values do not fit in {target}")
            elif not np.can_cast(array.dtype, target, casting="same_kind"):
                raise ValueError(f"expected dtype {target}, got {array.dtype} (no safe cast)")
            array = array.astype(target)
        if self.shape is not None and (
            array.ndim != len(self.shape)
            or any(
                want is not None and want != got
                for want, got in zip(self.shape, array.shape, strict=True)
            )
        ):
            want_text = "(" + ", ".join("*" if d is None else str(d) for d in self.shape) + ")"
            raise ValueError(f"expected shape {want_text}, got {tuple(array.shape)}")
        return array

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda array: np.asarray(array).tolist(), when_used="json"
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        kind = np.dtype(self.dtype).kind
        leaves: dict[str, dict[str, Any]] = {
            "b": {"type": "boolean"},
            "i": {"type": "integer"},
            "u": {"type": "integer", "minimum": 0},
            "f": {"type": "number"},
        }
        leaf = leaves.get(kind, {})
        dims = self.shape if self.shape is not None else ()
        result: dict[str, Any] = dict(leaf)
        for dim in reversed(dims):
            result = {"type": "array", "items": result}
            if dim is not None:
                result["minItems"] = result["maxItems"] = dim
        result["x-dtype"] = str(np.dtype(self.dtype))
        if self.shape is not None:
            result["x-shape"] = [d if d is not None else -1 for d in self.shape]
        return result


def _normalise(item_type: Any) -> Any:
    if isinstance(item_type, Array):
        return Annotated[np.ndarray, item_type]
    if item_type is np.ndarray:
        return Annotated[np.ndarray, Array(np.float64, None)]
    return item_type


def item_type_of(batch_type: Any) -> Any:
    """The item type of an annotated batch type: ``list[X]`` or ``Sequence[X]`` gives ``X``."""
    if get_origin(batch_type) in (list, Sequence):
        args = get_args(batch_type)
        return args[0] if args else Any
    return Any


class Signature:
    """The types of one input item and one output item of a model.

    ``Any`` (the default) means "not described": such items are not validated.

    >>> sig = Signature(int, float)
    >>> sig.validate("3")
    3
    >>> sorted(sig.json_schema())
    ['input', 'output']
    """

    __slots__ = ("_input_adapter", "_output_adapter", "input_type", "output_type")

    def __init__(self, input_type: Any = Any, output_type: Any = Any) -> None:
        #: The type of one input item.
        self.input_type = _normalise(input_type)
        #: The type of one output item.
        self.output_type = _normalise(output_type)
        self._input_adapter: TypeAdapter[Any] | None = (
            None if self.input_type is Any else TypeAdapter(self.input_type)
        )
        self._output_adapter: TypeAdapter[Any] | None = (
            None if self.output_type is Any else TypeAdapter(self.output_type)
        )

    @property
    def validates(self) -> bool:
        """Whether inputs are checked (the input type is described)."""
        return self._input_adapter is not None

    def validate(self, item: Any, *, index: int | None = None) -> Any:
        """Return ``item`` validated (and converted) to the input type.

        Raises :class:`InvalidInput` naming the field path of each problem; ``index``
        (the item's position in ``predict_many``) is put in front of the path.
        """
        if self._input_adapter is None:
            return item
        try:
            return self._input_adapter.validate_python(item)
        except ValidationError as exc:
            raise _invalid(exc, index) from None

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of one input item and one output item.

        An undescribed (``Any``) side is the empty schema ``{}``, which accepts anything.
        """
        return {
            "input": self._input_adapter.json_schema() if self._input_adapter else {},
            "output": self._output_adapter.json_schema() if self._output_adapter else {},
        }

    def __repr__(self) -> str:
        return f"Signature({_type_name(self.input_type)} -> {_type_name(self.output_type)})"


def _type_name(t: Any) -> str:
    if get_origin(t) is Annotated:
        args = get_args(t)
        return repr(args[1]) if len(args) > 1 else repr(t)
    return getattr(t, "__name__", repr(t))


def _path(loc: Sequence[int | str], index: int | None) -> str:
    parts = [] if index is None else [f"[{index}]"]
    for key in loc:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        else:
            parts.append(f".{key}" if parts else key)
    return "".join(parts) or "input"


def _invalid(exc: ValidationError, index: int | None) -> InvalidInput:
    errors = [
        {"loc": _path(err["loc"], index), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False)
    ]
    lines = [f"{e['loc']}: {e['msg']}" for e in errors[:_MAX_REPORTED_ERRORS]]
    if len(errors) > _MAX_REPORTED_ERRORS:
        lines.append(f"... and {len(errors) - _MAX_REPORTED_ERRORS} more")
    message = (
        "invalid input: "
        + "; ".join(lines)
        + " (the model's input schema is predictor.signature.json_schema()['input'])"
    )
    return InvalidInput(message, errors=errors)
