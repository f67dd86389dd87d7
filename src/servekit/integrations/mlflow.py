"""Serve MLflow pyfunc models: ``load_model("models:/name@alias")``.

Needs the ``mlflow`` extra (``pip install "servekit[mlflow]"``). mlflow is imported only
inside the functions that use it, so importing this module is cheap and
``import servekit`` never imports mlflow.

Example::

    from servekit.integrations.mlflow import load_model

    with sk.Predictor(load_model("models:/churn@champion"), backend=sk.Threads(2)) as p:
        p.predict({"age": 42, "plan": "pro"})
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pydantic

from .._model import Model
from .._signature import Array, Signature

__all__ = ["MLflowModel", "load_model"]

_INSTALL_HINT = 'the MLflow integration needs mlflow: pip install "servekit[mlflow]"'

# mlflow keeps the tracking and registry URIs in process-wide state; a model given its own
# URIs sets them only around its own calls, under this lock, and puts the old ones back.
_URI_LOCK = threading.Lock()

# MLflow column types by DataType name -> the Python type of one value.
_PYTHON_TYPES: dict[str, Any] = {
    "boolean": bool,
    "integer": int,
    "long": int,
    "float": float,
    "double": float,
    "string": str,
    "binary": bytes,
    "datetime": datetime.datetime,
}


def _import_mlflow() -> Any:
    try:
        import mlflow  # type: ignore[import-untyped, import-not-found, unused-ignore]
        import mlflow.models  # type: ignore[import-untyped, import-not-found, unused-ignore]
        import mlflow.pyfunc  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return mlflow


@dataclass(frozen=True, slots=True)
class _Column:
    """One named input or output of an MLflow signature, as plain picklable data."""

    #: Column or tensor name; ``None`` for an unnamed one.
    name: str | None
    #: Column: the DataType name (``"double"``); tensor: the numpy dtype string.
    type: str
    #: Tensor shape including the batch dimension (-1 for any); ``None`` for columns.
    shape: tuple[int, ...] | None = None
    required: bool = True


@dataclass(frozen=True, slots=True)
class _Spec:
    """One side (inputs or outputs) of an MLflow signature, as plain picklable data."""

    #: ``"columns"`` (a column schema) or ``"tensors"`` (a tensor spec).
    kind: str
    columns: tuple[_Column, ...]

    @property
    def named(self) -> bool:
        return all(c.name is not None for c in self.columns)


def _spec_of(schema: Any) -> _Spec | None:
    if schema is None:
        return None
    if schema.is_tensor_spec():
        tensors = tuple(
            _Column(t.name, str(np.dtype(t.type)), tuple(int(d) for d in t.shape))
            for t in schema.inputs
        )
        return _Spec("tensors", tensors)
    columns = tuple(
        _Column(c.name, getattr(c.type, "name", str(c.type)), None, bool(c.required))
        for c in schema.inputs
    )
    return _Spec("columns", columns)


def _array_of(column: _Column) -> Array:
    shape = column.shape[1:] if column.shape else None
    return Array(column.type, tuple(None if d < 0 else d for d in shape) if shape else shape)


def _item_type(spec: _Spec | None, model_name: str) -> Any:
    """The servekit item type of one side of an MLflow signature (``Any`` if undescribed)."""
    if spec is None or not spec.columns:
        return Any
    if spec.kind == "tensors" and len(spec.columns) == 1:
        return _array_of(spec.columns[0])
    if not spec.named:
        # An unnamed column schema (inferred from a list or a Series): not described.
        return Any
    fields: dict[str, Any] = {}
    for column in spec.columns:
        assert column.name is not None  # checked by spec.named
        if spec.kind == "tensors":
            fields[column.name] = (Annotated[np.ndarray, _array_of(column)], ...)
            continue
        value_type: Any = _PYTHON_TYPES.get(column.type, Any)
        if column.required:
            fields[column.name] = (value_type, ...)
        else:
            fields[column.name] = (value_type | None, None)
    return pydantic.create_model(model_name, **fields)


class MLflowModel(Model[Any, Any]):
    """A servekit :class:`~servekit.Model` serving an MLflow pyfunc model.

    ``uri`` is any model URI MLflow understands: ``"models:/name@alias"``,
    ``"models:/name/3"``, ``"runs:/<run_id>/model"`` or a local path. Construction reads
    only the model's MLmodel metadata (for the signature); :meth:`load` loads the model
    in the worker, so the object pickles small for :class:`~servekit.Processes`.

    Items are dicts of column -> value for a column-schema model (they are put together
    into a pandas DataFrame), or arrays for a tensor-spec model (stacked into one array);
    each item gets one row of the model's output.
    """

    def __init__(
        self,
        uri: str,
        *,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
    ) -> None:
        self.uri = uri
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri
        mlflow = _import_mlflow()
        with self._uris(mlflow):
            info = mlflow.models.get_model_info(uri)
        mlflow_signature = info.signature
        self._inputs = _spec_of(mlflow_signature.inputs if mlflow_signature else None)
        self._outputs = _spec_of(mlflow_signature.outputs if mlflow_signature else None)
        self._pyfunc: Any = None
        self._signature: Signature | None = None

    @property
    def model_name(self) -> str:
        """The registered model's name for ``models:/`` URIs, else ``"mlflow"``."""
        if self.uri.startswith("models:/"):
            name = self.uri[len("models:/") :].split("@")[0].split("/")[0]
            if name:
                return name
        return "mlflow"

    @contextlib.contextmanager
    def _uris(self, mlflow: Any) -> Iterator[None]:
        if self.tracking_uri is None and self.registry_uri is None:
            yield
            return
        with _URI_LOCK:
            old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
            if self.tracking_uri is not None:
                mlflow.set_tracking_uri(self.tracking_uri)
            if self.registry_uri is not None:
                mlflow.set_registry_uri(self.registry_uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(old_tracking)
                mlflow.set_registry_uri(old_registry)

    def load(self) -> None:
        """Load the pyfunc model (``mlflow.pyfunc.load_model``)."""
        mlflow = _import_mlflow()
        with self._uris(mlflow):
            self._pyfunc = mlflow.pyfunc.load_model(self.uri)

    def close(self) -> None:
        """Drop the loaded model."""
        self._pyfunc = None

    def predict(self, batch: list[Any]) -> list[Any]:
        """Put the items into the pyfunc's input, call it, and split its output per item."""
        if self._pyfunc is None:
            raise RuntimeError("MLflowModel.predict called before load()")
        output = self._pyfunc.predict(self._model_input(batch))
        return _split(output, len(batch))

    def _model_input(self, batch: list[Any]) -> Any:
        items = [
            item.model_dump() if isinstance(item, pydantic.BaseModel) else item for item in batch
        ]
        spec = self._inputs
        if spec is None:
            return items
        if spec.kind == "tensors":
            if len(spec.columns) == 1:
                return np.stack([np.asarray(item) for item in items])
            return {
                name: np.stack([np.asarray(item[name]) for item in items])
                for name in (c.name for c in spec.columns)
                if name is not None
            }
        import pandas as pd  # type: ignore[import-untyped, import-not-found, unused-ignore]

        if not spec.named:
            return pd.DataFrame(items)
        frame = pd.DataFrame.from_records(items, columns=[c.name for c in spec.columns])
        for column in spec.columns:
            # pandas reads Python ints as int64 and floats as float64; give each column
            # the dtype its MLflow type wants, so schema enforcement does not refuse it.
            dtype = {"integer": "int32", "float": "float32"}.get(column.type)
            if dtype is not None and frame[column.name].notna().all():
                frame[column.name] = frame[column.name].astype(dtype)
        return frame

    def signature(self) -> Signature:
        """The servekit signature made from the MLflow model's signature.

        A column schema becomes a pydantic model with one field per column; a tensor
        spec becomes an :class:`~servekit.Array` (shape without the batch dimension);
        a missing side is ``Any``.
        """
        if self._signature is None:
            base = _class_name(self.model_name)
            self._signature = Signature(
                _item_type(self._inputs, f"{base}Input"),
                _item_type(self._outputs, f"{base}Output"),
            )
        return self._signature

    def __getstate__(self) -> dict[str, Any]:
        # The loaded model stays behind: load() runs again in the worker.
        state = dict(self.__dict__)
        state["_pyfunc"] = None
        state["_signature"] = None
        return state

    def __repr__(self) -> str:
        return f"<MLflowModel {self.uri!r}>"


def _class_name(name: str) -> str:
    words = "".join(ch if ch.isalnum() else " " for ch in name).split()
    return "".join(w[:1].upper() + w[1:] for w in words) or "MLflow"


def _split(output: Any, n: int) -> list[Any]:
    """One output per item: rows of a DataFrame (as dicts), Series or array."""
    import pandas as pd  # type: ignore[import-untyped, import-not-found, unused-ignore]

    if isinstance(output, pd.DataFrame):
        rows: list[Any] = output.to_dict(orient="records")
    elif isinstance(output, pd.Series):
        rows = output.tolist()
    elif isinstance(output, np.ndarray):
        rows = list(output)
    elif isinstance(output, dict):
        rows = [{key: value[i] for key, value in output.items()} for i in range(n)]
    else:
        rows = list(output)
    return rows


def load_model(
    uri: str, *, tracking_uri: str | None = None, registry_uri: str | None = None
) -> MLflowModel:
    """Return a servekit model serving the MLflow model at ``uri``.

    ``uri`` is ``"models:/name@alias"``, ``"models:/name/3"``, ``"runs:/<run_id>/model"``
    or a local path; ``tracking_uri`` and ``registry_uri`` default to MLflow's own.
    Raises ImportError naming ``pip install "servekit[mlflow]"`` when mlflow is missing.
    """
    return MLflowModel(uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
