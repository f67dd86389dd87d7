from __future__ import annotations

from typing import Any

import anyio
import pydantic
import pytest

import servekit as sk


class Customer(pydantic.BaseModel):
    age: int


class Churn(sk.Model[Customer, float]):
    def predict(self, batch: list[Customer]) -> list[float]:
        return [c.age / 100 for c in batch]


def test_signature_comes_from_the_predict_annotations() -> None:
    sig = Churn().signature()
    assert sig.input_type is Customer
    assert sig.output_type is float
    assert Churn().model_name == "Churn"


def test_class_attributes_override_annotations() -> None:
    class Untyped(sk.Model[Any, Any]):
        name = "custom"
        input_type = int
        output_type = str

        def predict(self, batch):  # type: ignore[no-untyped-def]
            return [str(x) for x in batch]

    sig = Untyped().signature()
    assert (sig.input_type, sig.output_type) == (int, str)
    assert Untyped().model_name == "custom"


def test_bare_decorator_makes_a_batch_model() -> None:
    @sk.model
    def double(batch: list[float]) -> list[float]:
        return [2 * x for x in batch]

    assert isinstance(double, sk.Model)
    assert double.predict([1.0, 2.0]) == [2.0, 4.0]
    assert double.signature().input_type is float
    assert double.model_name == "double"


def test_per_item_functions_are_lifted_and_keep_errors_per_item() -> None:
    @sk.model(per_item=True, name="inv")
    def inverse(x: float) -> float:
        return 1 / x

    out = inverse.predict([1.0, 0.0, 4.0])
    assert out[0] == 1.0 and out[2] == 0.25
    assert isinstance(out[1], ZeroDivisionError)
    assert inverse.signature().input_type is float
    assert inverse.model_name == "inv"


@pytest.mark.anyio
async def test_async_per_item_functions_run_concurrently() -> None:
    running = 0
    peak = 0

    async def fetch(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        if x < 0:
            raise ValueError("negative")
        return x + 1

    model = sk.model(per_item=True)(fetch)
    assert model.is_async
    out = await model.predict([1, -1, 3])
    assert out[0] == 2 and out[2] == 4 and isinstance(out[1], ValueError)
    assert peak == 3


def test_predictor_accepts_plain_functions_and_rejects_other_objects() -> None:
    with sk.Predictor(lambda batch: [x + 1 for x in batch]) as p:
        assert p.predict(1) == 2
    with pytest.raises(TypeError, match=r"servekit\.Model or a callable"):
        sk.Predictor(42)
