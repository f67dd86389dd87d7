"""servekit.integrations.mlflow against a real MLflow registry in a sqlite file.

Runs in its own nox session (``nox -s mlflow``), which installs the ``mlflow`` extra; the
default ``tests`` session does not collect tests/integrations.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

import servekit as sk
from servekit.integrations.mlflow import MLflowModel, load_model

# Importing mlflow warns about its own type hints; the project turns warnings into errors.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import mlflow
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

# mlflow and the libraries under it warn about their own deprecations and about how the
# test models are logged; the project turns warnings into errors, so let these through.
pytestmark = [
    pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning"),
    # Saving an input example trips a pandas 3 deprecation inside MLflow; log none instead.
    pytest.mark.filterwarnings("ignore:.*input example was not provided:UserWarning"),
]


# The models take the DataFrame or array that MLflow builds from the logged signature, so
# their predict has no type hints; this attribute keeps MLflow from wrapping predict for
# type-hint validation and from warning (it forces that warning past any filter) about it.
class ColumnDoubler(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return pd.DataFrame({"doubled": model_input["x"] * 2, "name": model_input["name"]})


class TensorDoubler(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return np.asarray(model_input) * 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A sqlite tracking/registry store and a file artifact store, both in tmp."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment(
            "servekit", artifact_location=(tmp / "artifacts").as_uri()
        )
        client = MlflowClient()
        frame = pd.DataFrame({"x": [1.0, 2.0], "name": ["a", "b"]})
        out = ColumnDoubler().predict(None, frame)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.pyfunc.log_model(
                name="model",
                python_model=ColumnDoubler(),
                signature=infer_signature(frame, out),
                registered_model_name="doubler",
            )
        client.set_registered_model_alias("doubler", "champion", "1")
        array = np.zeros((2, 3), dtype=np.float32)
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=TensorDoubler(),
                signature=infer_signature(array, array),
                registered_model_name="tensor-doubler",
            )
        yield {"uri": uri, "run_id": run.info.run_id}
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)


@pytest.mark.parametrize("backend", [sk.Inline(), sk.Threads(2)], ids=["inline", "threads"])
def test_registered_alias_predicts_rows(registry: dict[str, str], backend: sk.Backend) -> None:
    model = load_model("models:/doubler@champion")
    assert model.model_name == "doubler"
    with sk.Predictor(model, backend=backend) as predictor:
        assert predictor.predict({"x": 1.5, "name": "a"}) == {"doubled": 3.0, "name": "a"}
        outputs = predictor.predict_many([{"x": float(i), "name": str(i)} for i in range(5)])
        assert outputs == [{"doubled": 2.0 * i, "name": str(i)} for i in range(5)]
        with pytest.raises(sk.InvalidInput, match="name") as info:
            predictor.predict({"x": 1.0})
        assert info.value.errors[0]["loc"] == "name"
        with pytest.raises(sk.InvalidInput, match="x"):
            predictor.predict({"x": "not a number", "name": "a"})


def test_signature_carries_the_columns(registry: dict[str, str]) -> None:
    schema = load_model("models:/doubler@champion").signature().json_schema()
    assert schema["input"]["properties"]["x"]["type"] == "number"
    assert schema["input"]["properties"]["name"]["type"] == "string"
    assert schema["input"]["required"] == ["x", "name"]
    assert set(schema["output"]["properties"]) == {"doubled", "name"}


def test_version_run_and_path_uris_and_explicit_tracking_uri(registry: dict[str, str]) -> None:
    run_uri = f"runs:/{registry['run_id']}/model"
    local = mlflow.artifacts.download_artifacts(run_uri)
    uris = ["models:/doubler/1", run_uri, local]
    for uri in uris:
        with sk.Predictor(load_model(uri)) as predictor:
            assert predictor.predict({"x": 2.0, "name": "b"}) == {"doubled": 4.0, "name": "b"}
    # With the URIs given to the model and MLflow's own pointing elsewhere.
    mlflow.set_tracking_uri("sqlite:///nonexistent-dir/none.db")
    try:
        model = load_model(
            "models:/doubler/1", tracking_uri=registry["uri"], registry_uri=registry["uri"]
        )
        with sk.Predictor(model) as predictor:
            assert predictor.predict({"x": 1.0, "name": "c"}) == {"doubled": 2.0, "name": "c"}
    finally:
        mlflow.set_tracking_uri(registry["uri"])


def test_tensor_spec_model(registry: dict[str, str]) -> None:
    model = load_model("models:/tensor-doubler/1")
    signature = model.signature()
    assert signature.input_type.__metadata__[0] == sk.Array("float32", (3,))
    assert signature.json_schema()["input"]["x-shape"] == [3]
    with sk.Predictor(model, backend=sk.Threads(2)) as predictor:
        out = predictor.predict(np.array([1, 2, 3], dtype=np.float32))
        assert isinstance(out, np.ndarray) and out.tolist() == [2.0, 4.0, 6.0]
        many = predictor.predict_many([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        assert [m.tolist() for m in many] == [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
        with pytest.raises(sk.InvalidInput, match="shape"):
            predictor.predict([1.0, 2.0])


def test_processes_load_in_the_worker(registry: dict[str, str]) -> None:
    uris = {"tracking_uri": registry["uri"], "registry_uri": registry["uri"]}
    with sk.Predictor(load_model("models:/doubler@champion", **uris), backend=sk.Processes(1)) as p:
        assert p.predict_many([{"x": 1.0, "name": "a"}, {"x": 2.5, "name": "b"}]) == [
            {"doubled": 2.0, "name": "a"},
            {"doubled": 5.0, "name": "b"},
        ]


def test_pickles_without_the_loaded_model(registry: dict[str, str]) -> None:
    import cloudpickle

    model = load_model("models:/doubler@champion")
    model.load()
    copy = cloudpickle.loads(cloudpickle.dumps(model))
    assert isinstance(copy, MLflowModel) and copy._pyfunc is None
    assert copy.signature().json_schema() == model.signature().json_schema()
