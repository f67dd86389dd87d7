"""ModelStore: versions, aliases, metadata, deletion, concurrency, and broken artifacts."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import servekit as sk
from servekit.registry import (
    ArtifactIntegrityError,
    ArtifactLoadError,
    ArtifactVersionWarning,
    InvalidMetadata,
    InvalidModelName,
    ModelInfo,
    ModelNotFound,
    ModelStore,
    VersionInUse,
)
from servekit.registry._artifact import sha256_of


class Scale(sk.Model[float, float]):
    """A Model subclass with state, saved by reference to this module."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def predict(self, batch: list[float]) -> list[float]:
        return [self.factor * x for x in batch]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def _pkl(store: ModelStore, ref: str) -> Path:
    return store.info(ref).path / "model.pkl"


def _leftovers(store: ModelStore) -> list[str]:
    """Staging/trash directories and half-written temp files anywhere in the store."""
    found = [p.name for p in store.root.iterdir() if p.name.startswith("~")]
    found += [p.name for p in store.root.rglob("*.tmp")]
    return found


# -- round trips ------------------------------------------------------------------------


def test_model_subclass_round_trip_with_manifest(store: ModelStore) -> None:
    info = store.save("churn", Scale(3.0), metadata={"auc": 0.91, "tags": ("a", "b")})
    assert isinstance(info, ModelInfo)
    assert (info.name, info.version, info.ref) == ("churn", 1, "churn:1")
    assert info.path == store.root / "churn" / "1"
    loaded = store.load("churn:1")
    assert isinstance(loaded, Scale) and loaded.predict([1.0, 2.0]) == [3.0, 6.0]

    data = (info.path / "model.pkl").read_bytes()
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert manifest["files"] == {"model.pkl": {"sha256": sha256_of(data), "size": len(data)}}
    assert (info.sha256, info.size) == (sha256_of(data), len(data))
    assert info.metadata == {"auc": 0.91, "tags": ["a", "b"]}  # tuples are stored as lists
    assert info.created_at.utcoffset() == datetime.timedelta(0)
    assert manifest["servekit_version"] == sk.__version__ == info.servekit_version
    assert info.python_version and info.numpy_version and info.cloudpickle_version
    # The signature comes from the annotations of predict.
    assert info.signature == {"input": {"type": "number"}, "output": {"type": "number"}}


def test_explicit_signature_wins_and_unschemable_is_none(store: ModelStore) -> None:
    info = store.save("m", Scale(1.0), signature=sk.Signature(int, str))
    assert info.signature == {"input": {"type": "integer"}, "output": {"type": "string"}}

    class NoSchema(sk.Model[Any, Any]):
        def predict(self, batch: list[Any]) -> list[Any]:
            return batch

        def signature(self) -> sk.Signature:
            raise RuntimeError("cannot describe")

    assert store.save("n", NoSchema()).signature is None


def test_function_model_is_stored_by_value(store: ModelStore, tmp_path: Path) -> None:
    offset = 10  # captured by the closure: only by-value pickling can carry it

    @sk.model
    def add_offset(batch: list[int]) -> list[int]:
        return [x + offset for x in batch]

    info = store.save("adder", add_offset)
    assert store.load("adder").predict([1, 2]) == [11, 12]
    assert info.signature == {
        "input": {"type": "integer"},
        "output": {"type": "integer"},
    }
    # A fresh interpreter that cannot import this test module still loads and runs it.
    code = (
        "import sys; from servekit.registry import ModelStore; "
        "print(ModelStore(sys.argv[1]).load('adder:1').predict([5]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store.root)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=True,
    )
    assert out.stdout.strip() == "[15]"


def test_plain_callable_is_wrapped_and_non_callable_refused(store: ModelStore) -> None:
    store.save("f", lambda batch: [x * 2 for x in batch])
    loaded = store.load("f")
    assert isinstance(loaded, sk.FunctionModel) and loaded.predict([2]) == [4]
    with pytest.raises(TypeError, match=r"servekit\.Model or a callable"):
        store.save("g", 42)  # type: ignore[arg-type]


# -- versions, names, refs --------------------------------------------------------------


def test_versions_count_up_and_latest_resolves(store: ModelStore) -> None:
    for factor in (1.0, 2.0, 3.0):
        store.save("churn", Scale(factor))
    store.save("fraud", Scale(9.0))
    assert [i.version for i in store.versions("churn")] == [1, 2, 3]
    assert store.names() == ["churn", "fraud"]
    for ref in ("churn", "churn:latest", "churn@latest"):
        loaded = store.load(ref)
        assert isinstance(loaded, Scale) and loaded.factor == 3.0, ref
    loaded = store.load("churn:2")
    assert isinstance(loaded, Scale) and loaded.factor == 2.0
    assert store.info("churn").version == 3
    assert store.versions("nothing") == []


@pytest.mark.parametrize("ref", ["churn:0", "churn:-1", "churn:01", "churn:x", "a:1:2", "a@b@c"])
def test_malformed_refs_are_invalid(store: ModelStore, ref: str) -> None:
    store.save("churn", Scale(1.0))
    with pytest.raises(InvalidModelName):
        store.load(ref)


def test_unknown_model_version_or_alias_is_not_found(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="no model named 'churn'"):
        store.load("churn")
    store.save("churn", Scale(1.0))
    with pytest.raises(ModelNotFound, match=r"no version 7 \(versions: 1\)"):
        store.info("churn:7")
    with pytest.raises(ModelNotFound, match="no alias 'champion'"):
        store.load("churn@champion")
    with pytest.raises(LookupError):  # ModelNotFound is a LookupError for host code
        store.load("churn:2")


# -- aliases ----------------------------------------------------------------------------


def test_aliases_set_move_remove(store: ModelStore) -> None:
    for factor in (1.0, 2.0, 3.0):
        store.save("churn", Scale(factor))
    store.set_alias("churn", "champion", 1)
    store.set_alias("churn", "challenger", 3)
    assert store.aliases("churn") == {"champion": 1, "challenger": 3}
    champion = store.load("churn@champion")
    assert isinstance(champion, Scale) and champion.factor == 1.0
    assert store.info("churn:1").aliases == ("champion",)

    store.set_alias("churn", "champion", 2)  # move
    champion = store.load("churn@champion")
    assert isinstance(champion, Scale) and champion.factor == 2.0
    assert [i.aliases for i in store.versions("churn")] == [(), ("champion",), ("challenger",)]

    store.remove_alias("churn", "challenger")
    assert store.aliases("churn") == {"champion": 2}
    with pytest.raises(ModelNotFound):
        store.load("churn@challenger")
    with pytest.raises(ModelNotFound):
        store.remove_alias("churn", "challenger")
    assert _leftovers(store) == []


def test_alias_rules(store: ModelStore) -> None:
    store.save("churn", Scale(1.0))
    with pytest.raises(ModelNotFound, match="no version 5"):
        store.set_alias("churn", "champion", 5)
    with pytest.raises(InvalidModelName, match="reserved"):
        store.set_alias("churn", "latest", 1)
    with pytest.raises(InvalidModelName, match="invalid alias"):
        store.set_alias("churn", "../x", 1)
    with pytest.raises(TypeError):
        store.set_alias("churn", "champion", "1")  # type: ignore[arg-type]
    assert store.aliases("churn") == {}


# -- delete -----------------------------------------------------------------------------


def test_delete_never_reuses_numbers(store: ModelStore) -> None:
    for factor in (1.0, 2.0, 3.0):
        store.save("churn", Scale(factor))
    store.delete("churn:2")
    assert [i.version for i in store.versions("churn")] == [1, 3]
    store.delete("churn:3")  # the latest: its number must not come back
    assert store.save("churn", Scale(4.0)).version == 4
    with pytest.raises(ModelNotFound):
        store.delete("churn:3")
    store.delete("churn:1")
    store.delete("churn:4")
    assert store.names() == []
    assert store.save("churn", Scale(5.0)).version == 5
    assert _leftovers(store) == []


def test_delete_needs_an_explicit_version(store: ModelStore) -> None:
    store.save("churn", Scale(1.0))
    for ref in ("churn", "churn:latest", "churn@latest"):
        with pytest.raises(InvalidModelName, match="explicit version"):
            store.delete(ref)
    assert [i.version for i in store.versions("churn")] == [1]


def test_delete_of_an_aliased_version_is_refused_unless_forced(store: ModelStore) -> None:
    store.save("churn", Scale(1.0))
    store.save("churn", Scale(2.0))
    store.set_alias("churn", "champion", 1)
    store.set_alias("churn", "stable", 1)
    with pytest.raises(VersionInUse, match="champion, stable") as caught:
        store.delete("churn:1")
    assert caught.value.aliases == ("champion", "stable")
    assert [i.version for i in store.versions("churn")] == [1, 2]

    store.delete("churn@champion", force=True)
    assert [i.version for i in store.versions("churn")] == [2]
    assert store.aliases("churn") == {}  # no alias is left dangling


# -- metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"s": {1, 2}}, r"metadata\['s'\] is a set"),
        ({"x": float("nan")}, "nan, which JSON cannot hold"),
        ({"d": {1: "a"}}, "key 1 of type int"),
        ({"o": object()}, "is a object"),
        ({"deep": [{"a": [Path("p")]}]}, r"metadata\['deep'\]\[0\]\['a'\]\[0\]"),
    ],
)
def test_metadata_must_be_json(store: ModelStore, metadata: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidMetadata, match=match):
        store.save("churn", Scale(1.0), metadata=metadata)
    assert store.versions("churn") == []
    assert _leftovers(store) == []


# -- version drift ----------------------------------------------------------------------


def test_loading_under_other_python_or_numpy_warns_with_both_versions(
    store: ModelStore,
) -> None:
    info = store.save("churn", Scale(2.0))
    manifest_path = info.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["numpy_version"] = "1.0.0"
    manifest["python_version"] = "3.1.5"
    # Consistent edit: the sha256 covers model.pkl only, so version fields may change.
    manifest_path.write_text(json.dumps(manifest))
    with pytest.warns(ArtifactVersionWarning) as record:
        loaded = store.load("churn:1")
    assert isinstance(loaded, Scale) and loaded.factor == 2.0
    texts = [str(w.message) for w in record]
    import platform

    import numpy as np

    assert any("numpy 1.0.0" in t and f"numpy {np.__version__}" in t for t in texts)
    assert any("Python 3.1.5" in t and f"Python {platform.python_version()}" in t for t in texts)
    assert issubclass(ArtifactVersionWarning, UserWarning)


# -- broken artifacts (ML-01) -----------------------------------------------------------


def test_corrupted_artifact_fails_alone(store: ModelStore) -> None:
    store.save("broken", Scale(1.0))
    store.save("good", Scale(2.0))
    pkl = _pkl(store, "broken")
    data = bytearray(pkl.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pkl.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="does not match its pinned sha256"):
        store.load("broken")
    good = store.load("good")
    assert isinstance(good, Scale) and good.predict([1.0]) == [2.0]


def test_garbage_with_matching_hash_is_a_typed_load_error(store: ModelStore) -> None:
    info = store.save("broken", Scale(1.0))
    store.save("good", Scale(2.0))
    garbage = b"\x80\x05this is not a pickle"
    (info.path / "model.pkl").write_bytes(garbage)
    manifest_path = info.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.pkl"] = {"sha256": sha256_of(garbage), "size": len(garbage)}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactLoadError, match="could not be unpickled") as caught:
        store.load("broken")
    assert caught.value.__cause__ is not None
    assert store.load("good").predict([1.0]) == [2.0]


def test_damaged_manifests_are_integrity_errors(store: ModelStore) -> None:
    info = store.save("churn", Scale(1.0))
    manifest_path = info.path / "manifest.json"
    good = manifest_path.read_text()
    for bad in (
        "{not json",
        json.dumps({"format": 1}),
        json.dumps({**json.loads(good), "format": 99}),
    ):
        manifest_path.write_text(bad)
        with pytest.raises(ArtifactIntegrityError):
            store.load("churn:1")
    manifest_path.write_text(good)
    (info.path / "model.pkl").unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        store.load("churn:1")


def test_pinned_hash_outside_the_store(store: ModelStore) -> None:
    info = store.save("churn", Scale(1.0))
    assert isinstance(store.load("churn", sha256=info.sha256.upper()), Scale)
    with pytest.raises(ArtifactIntegrityError):
        store.load("churn", sha256="0" * 64)


def test_errors_pickle_with_their_codes() -> None:
    errors = [
        ArtifactIntegrityError("x"),
        ArtifactLoadError("x"),
        InvalidMetadata("x"),
        InvalidModelName("x"),
        ModelNotFound("x"),
        VersionInUse("x", aliases=("champion",)),
    ]
    codes = {type(e).code for e in errors}
    assert len(codes) == len(errors)
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == "x"
        assert isinstance(copy, sk.ServekitError)
    assert pickle.loads(pickle.dumps(errors[-1])).aliases == ("champion",)


# -- concurrency ------------------------------------------------------------------------


class Tagged(sk.Model[Any, Any]):
    def __init__(self, tag: tuple[int, int]) -> None:
        self.tag = tag

    def predict(self, batch: list[Any]) -> list[Any]:
        return [self.tag for _ in batch]


def _save_five(root: str, worker: int, start: Any) -> None:
    start.wait(60)  # all writers begin together, to make the race real
    store = ModelStore(root)
    for i in range(5):
        store.save("shared", Tagged((worker, i)), metadata={"worker": worker, "i": i})


def test_concurrent_saves_from_threads_get_distinct_versions(store: ModelStore) -> None:
    def save_three(worker: int) -> list[int]:
        return [store.save("t", Tagged((worker, i))).version for i in range(3)]

    with ThreadPoolExecutor(8) as pool:
        got = [v for vs in pool.map(save_three, range(8)) for v in vs]
    assert sorted(got) == list(range(1, 25))
    assert [i.version for i in store.versions("t")] == list(range(1, 25))


def test_stray_numbered_directory_is_never_taken_over(store: ModelStore) -> None:
    store.save("churn", Scale(1.0))
    (store.root / "churn" / "2").mkdir()  # no manifest: not a version, but not free either
    (store.root / "evil").symlink_to(store.root.parent, target_is_directory=True)
    assert [i.version for i in store.versions("churn")] == [1]
    assert store.save("churn", Scale(3.0)).version == 3
    assert store.names() == ["churn"]  # the symlink out of the store is not listed


def test_concurrent_saves_from_processes_get_distinct_versions(store: ModelStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_save_five, args=(str(store.root), w, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(90)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    infos = store.versions("shared")
    assert [i.version for i in infos] == list(range(1, 21))
    tags = set()
    for info in infos:
        model = store.load(info.ref)
        assert isinstance(model, Tagged)
        assert (info.metadata["worker"], info.metadata["i"]) == model.tag
        tags.add(model.tag)
    assert tags == {(w, i) for w in range(4) for i in range(5)}
    assert _leftovers(store) == []
    assert sorted(os.listdir(store.root)) == ["shared"]
