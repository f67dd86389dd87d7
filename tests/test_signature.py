from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import numpy as np
import pydantic
import pytest
from typing_extensions import TypedDict

import servekit as sk


class Customer(pydantic.BaseModel):
    age: int
    plan: str


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Pair(TypedDict):
    a: int
    b: int


def test_pydantic_model_input_is_validated_with_the_field_path() -> None:
    sig = sk.Signature(Customer, float)
    assert sig.validate({"age": "41", "plan": "pro"}) == Customer(age=41, plan="pro")
    with pytest.raises(sk.InvalidInput) as info:
        sig.validate({"age": "old", "plan": "pro"})
    assert info.value.errors[0]["loc"] == "age"
    assert "age" in str(info.value)


def test_index_is_put_in_front_of_the_path() -> None:
    sig = sk.Signature(Customer)
    with pytest.raises(sk.InvalidInput) as info:
        sig.validate({"plan": "pro"}, index=3)
    assert info.value.errors[0]["loc"] == "[3].age"


@pytest.mark.parametrize(
    ("item_type", "good", "bad"),
    [
        (int, "7", "seven"),
        (float, 1, "x"),
        (Point, {"x": 1, "y": 2}, {"x": 1}),
        (Pair, {"a": 1, "b": 2}, {"a": 1, "b": "z"}),
        (list[int], [1, 2], [1, "q"]),
    ],
)
def test_primitives_dataclasses_typeddicts(item_type: Any, good: Any, bad: Any) -> None:
    sig = sk.Signature(item_type)
    sig.validate(good)
    with pytest.raises(sk.InvalidInput):
        sig.validate(bad)


def test_nested_path_names_list_positions() -> None:
    class Order(pydantic.BaseModel):
        items: list[Point]

    with pytest.raises(sk.InvalidInput) as info:
        sk.Signature(Order).validate({"items": [{"x": 1, "y": 2}, {"x": "no", "y": 1}]})
    assert info.value.errors[0]["loc"] == "items[1].x"


def test_array_spec_converts_lists_and_checks_dtype_and_shape() -> None:
    sig = sk.Signature(sk.Array("float32", (None, 3)))
    out = sig.validate([[1, 2, 3], [4, 5, 6]])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 3)
    with pytest.raises(sk.InvalidInput, match=r"expected shape \(\*, 3\)"):
        sig.validate(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(sk.InvalidInput, match="dtype"):
        sig.validate(np.array([["a", "b", "c"]]))
    with pytest.raises(sk.InvalidInput):
        sig.validate(np.zeros(3))  # wrong number of dimensions


def test_array_refuses_unsafe_casts_but_allows_same_kind() -> None:
    ints = sk.Signature(sk.Array("int64", (2,)))
    with pytest.raises(sk.InvalidInput):
        ints.validate(np.array([1.5, 2.5]))
    floats = sk.Signature(sk.Array("float32", (2,)))
    assert floats.validate(np.array([1, 2], dtype=np.int64)).dtype == np.float32


def test_array_inside_a_pydantic_model() -> None:
    class Image(pydantic.BaseModel):
        pixels: Annotated[np.ndarray, sk.Array("uint8", (2, 2))]

    img = sk.Signature(Image).validate({"pixels": [[1, 2], [3, 4]]})
    assert img.pixels.dtype == np.uint8
    assert img.model_dump(mode="json") == {"pixels": [[1, 2], [3, 4]]}
    with pytest.raises(sk.InvalidInput) as info:
        sk.Signature(Image).validate({"pixels": [[1, 2, 3]]})
    assert info.value.errors[0]["loc"] == "pixels"


def test_json_schema_of_models_and_arrays() -> None:
    schema = sk.Signature(Customer, sk.Array("float32", (None, 16))).json_schema()
    assert schema["input"]["properties"]["age"]["type"] == "integer"
    out = schema["output"]
    assert out["type"] == "array" and out["items"]["type"] == "array"
    assert out["items"]["minItems"] == out["items"]["maxItems"] == 16
    assert out["items"]["items"] == {"type": "number"}
    assert out["x-dtype"] == "float32"


def test_undescribed_signature_validates_nothing() -> None:
    sig = sk.Signature()
    marker = object()
    assert sig.validate(marker) is marker
    assert not sig.validates
    assert sig.json_schema() == {"input": {}, "output": {}}
