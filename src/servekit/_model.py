"""The Model: user code that turns a batch of inputs into a batch of outputs."""

from __future__ import annotations

import inspect
import types
import warnings
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar, get_type_hints, overload

import anyio

from ._collate import Collate, acollated, collated
from ._signature import Signature, item_type_of

__all__ = ["CollatedModel", "FunctionModel", "Model", "as_model", "model"]

In = TypeVar("In")
Out = TypeVar("Out")

#: What ``Model.predict`` may return: one output (or exception object) per input item,
#: or an awaitable of that.
BatchResult = Sequence[Any] | Awaitable[Sequence[Any]]


class Model(ABC, Generic[In, Out]):
    """The base class of user models.

    Subclass it and implement :meth:`predict`; override :meth:`load` to load weights
    and :meth:`close` to release them. servekit calls ``load()`` once in every worker
    that will call the model (in the worker process for :class:`~servekit.Processes`),
    so heavy weights are never loaded in a parent that does not use them.

    The input and output item types come from the annotation of ``predict``
    (``batch: list[In]`` and ``-> list[Out]``) or from the class attributes
    ``input_type`` and ``output_type``; inputs are then validated before they are
    queued.

    ``predict`` may be ``async def``; servekit then awaits it.

    Example::

        class Doubler(sk.Model[float, float]):
            def predict(self, batch: list[float]) -> list[float]:
                return [2 * x for x in batch]
    """

    #: The model's name in predictors and transports (default: the class name).
    name: ClassVar[str | None] = None
    #: The type of one input item, when the annotation of ``predict`` does not say it.
    input_type: ClassVar[Any] = None
    #: The type of one output item, when the annotation of ``predict`` does not say it.
    output_type: ClassVar[Any] = None

    def load(self) -> None:
        """Load weights and other heavy state. Runs once in each worker, before predict."""

    @abstractmethod
    def predict(self, batch: list[In]) -> Any:
        """Return one output per item of ``batch``, in order.

        Return an exception object in an item's place to fail that item alone.
        """

    def close(self) -> None:
        """Release what :meth:`load` acquired. Runs once in each worker at shutdown."""

    @property
    def model_name(self) -> str:
        """The name used for this model: :attr:`name`, or the class name."""
        return self.name or type(self).__name__

    @property
    def is_async(self) -> bool:
        """Whether ``predict`` is a coroutine function."""
        return inspect.iscoroutinefunction(self.predict)

    def signature(self) -> Signature:
        """The model's :class:`~servekit.Signature`, from attributes or annotations."""
        hints = _hints(type(self).predict)
        params = [p for p in hints if p != "return"]
        input_type = self.input_type
        if input_type is None:
            input_type = item_type_of(hints[params[0]]) if params else Any
        output_type = self.output_type
        if output_type is None:
            output_type = item_type_of(hints.get("return", Any))
        return Signature(input_type, output_type)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    if not (inspect.isroutine(fn) or isinstance(fn, type)):
        fn = type(fn).__call__  # a callable object: its __call__ holds the annotations
    try:
        hints = get_type_hints(fn, include_extras=True)
    except (NameError, TypeError, AttributeError) as exc:
        # Annotations that cannot be resolved (a forward reference to a name that does
        # not exist at run time) leave the model undescribed rather than unusable; say so.
        warnings.warn(
            f"servekit could not resolve the annotations of {fn.__qualname__} ({exc}); "
            "its inputs will not be validated. Set input_type/output_type explicitly",
            stacklevel=4,
        )
        return {}
    _keep_resolved(fn, hints)
    return hints


def _keep_resolved(fn: Callable[..., Any], hints: dict[str, Any]) -> None:
    """Put the resolved ``hints`` in place of ``fn``'s string annotations.

    Under ``from __future__ import annotations`` every annotation is a string, resolved
    in the globals of the function's module. A function (or a class's method) that
    cloudpickle sends by value, as it does for a model defined in ``__main__``, takes
    along only the globals its code uses, not the names in its annotations; the copy a
    worker process or cluster node unpickles could not resolve them and would lose its
    input validation. With the resolved objects in ``__annotations__`` (what
    ``typing.get_type_hints`` gives, so nothing changes for anyone reading them) the
    copy carries its types. This runs when the signature is first computed, which a
    Predictor does when it is made, before the model is pickled anywhere.
    """
    target = getattr(fn, "__func__", fn)  # a bound method: its function
    annotations = getattr(target, "__annotations__", None)
    if not isinstance(target, types.FunctionType) or not isinstance(annotations, dict):
        return
    if any(isinstance(value, str) for value in annotations.values()):
        target.__annotations__ = {
            name: hints.get(name, value) for name, value in annotations.items()
        }


class FunctionModel(Model[Any, Any]):
    """A :class:`Model` made from a plain function (see :func:`model`).

    A batch function takes a list and returns a list; a per-item function
    (``per_item=True``) takes one item and returns one output, and is lifted to batches
    with each item's exception kept to that item.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        per_item: bool = False,
        name: str | None = None,
        input_type: Any = None,
        output_type: Any = None,
    ) -> None:
        self.fn = fn
        self.per_item = per_item
        self._name: str = name or str(getattr(fn, "__name__", type(fn).__name__))
        self._input_type = input_type
        self._output_type = output_type
        self._async = inspect.iscoroutinefunction(fn)

    @property
    def model_name(self) -> str:
        """The function's name, or the ``name`` given."""
        return self._name

    @property
    def is_async(self) -> bool:
        """Whether the function is a coroutine function."""
        return self._async

    def predict(self, batch: list[Any]) -> Any:
        """Call the function on the batch (or on each item, for per-item functions)."""
        if not self.per_item:
            return self.fn(batch)
        if self._async:
            return self._apredict_items(batch)
        outputs: list[Any] = []
        for item in batch:
            try:
                outputs.append(self.fn(item))
            except Exception as exc:
                outputs.append(exc)
        return outputs

    async def _apredict_items(self, batch: list[Any]) -> list[Any]:
        outputs: list[Any] = [None] * len(batch)

        async def one(index: int, item: Any) -> None:
            try:
                outputs[index] = await self.fn(item)
            except Exception as exc:
                outputs[index] = exc

        async with anyio.create_task_group() as tg:
            for index, item in enumerate(batch):
                tg.start_soon(one, index, item)
        return outputs

    def signature(self) -> Signature:
        """The signature from ``input_type``/``output_type`` or the function's annotations."""
        hints = _hints(self.fn)
        params = [p for p in inspect.signature(self.fn).parameters if p in hints]
        first = hints[params[0]] if params else Any
        ret = hints.get("return", Any)
        if not self.per_item:
            first, ret = item_type_of(first), item_type_of(ret)
        input_type = self._input_type if self._input_type is not None else first
        output_type = self._output_type if self._output_type is not None else ret
        return Signature(input_type, output_type)

    def __repr__(self) -> str:
        kind = "per-item" if self.per_item else "batch"
        return f"<FunctionModel {self._name!r} ({kind})>"


class CollatedModel(Model[Any, Any]):
    """A model whose ``predict`` receives collated batches (see :class:`~servekit.Stack`).

    The Predictor wraps its model in this when its Batcher has a ``collate``, so that the
    back end, wherever it runs (a worker process included), collates the list of items
    just before the model and splits the outputs right after it; error isolation still
    works on the list, one item at a time if need be.
    """

    def __init__(self, inner: Model[Any, Any], collate: Collate) -> None:
        self.inner = inner
        self.collate = collate
        self._predict: Any = (
            acollated(inner.predict, collate)
            if inner.is_async
            else collated(inner.predict, collate)
        )

    @property
    def model_name(self) -> str:
        """The wrapped model's name."""
        return self.inner.model_name

    @property
    def is_async(self) -> bool:
        """Whether the wrapped model is async."""
        return self.inner.is_async

    def load(self) -> None:
        """Load the wrapped model."""
        self.inner.load()

    def predict(self, batch: list[Any]) -> Any:
        """Collate ``batch``, call the wrapped model, split its outputs per item."""
        return self._predict(batch)

    def close(self) -> None:
        """Close the wrapped model."""
        self.inner.close()

    def signature(self) -> Signature:
        """The wrapped model's signature."""
        return self.inner.signature()

    def __getstate__(self) -> dict[str, Any]:
        return {"inner": self.inner, "collate": self.collate}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["inner"], state["collate"])  # type: ignore[misc]


@overload
def model(fn: Callable[..., Any], /) -> FunctionModel: ...


@overload
def model(
    *,
    per_item: bool = False,
    name: str | None = None,
    input_type: Any = None,
    output_type: Any = None,
) -> Callable[[Callable[..., Any]], FunctionModel]: ...


def model(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    per_item: bool = False,
    name: str | None = None,
    input_type: Any = None,
    output_type: Any = None,
) -> FunctionModel | Callable[[Callable[..., Any]], FunctionModel]:
    """Turn a plain function into a :class:`Model`.

    Used bare on a batch function, or with options::

        @sk.model
        def double(batch: list[float]) -> list[float]:
            return [2 * x for x in batch]

        @sk.model(per_item=True)
        def square(x: float) -> float:
            return x * x
    """

    def wrap(f: Callable[..., Any]) -> FunctionModel:
        return FunctionModel(
            f, per_item=per_item, name=name, input_type=input_type, output_type=output_type
        )

    return wrap(fn) if fn is not None else wrap


def as_model(obj: Any, *, per_item: bool = False) -> Model[Any, Any]:
    """Return ``obj`` as a :class:`Model`: models as they are, callables wrapped."""
    if isinstance(obj, Model):
        return obj
    if callable(obj):
        return FunctionModel(obj, per_item=per_item)
    raise TypeError(
        f"expected a servekit.Model or a callable, got {type(obj).__name__}; "
        "subclass servekit.Model or pass a function"
    )
