"""Safe loading: no unpickling without permission, no TOCTOU, no escape from the root."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

import servekit as sk
from servekit.registry import (
    ArtifactIntegrityError,
    InvalidModelName,
    ModelStore,
    UnpinnedArtifactWarning,
    UnsafeArtifactError,
    _artifact,
    _store,
    load_artifact,
    validate_name,
)
from servekit.registry._artifact import sha256_of


class Evil:
    """Unpickling this creates the sentinel directory: proof that code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (self.sentinel,))


def _resolve_name_gadget(sentinel: Path) -> bytes:
    """A picklescan-bypass style gadget: ``pkgutil.resolve_name("os:mkdir")(sentinel)``.

    Scanners that only look at the top-level callable see ``pkgutil.resolve_name`` and
    may call it harmless; permission, not scanning, is what must stop it (SEC-04).
    """
    return b"cpkgutil\nresolve_name\n(Vos:mkdir\ntR(V" + str(sentinel).encode() + b"\ntR."


class Double(sk.Model[float, float]):
    def predict(self, batch: list[float]) -> list[float]:
        return [2 * x for x in batch]


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "sentinel"


@pytest.fixture
def evil_file(tmp_path: Path, sentinel: Path) -> Path:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil(sentinel)))
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


# -- SEC-01: no unpickling without permission -------------------------------------------


def test_untrusted_artifact_is_refused_before_it_is_read(
    evil_file: Path, sentinel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(path: Path) -> bytes:
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(_artifact, "_read_bytes", no_read)
    with pytest.raises(UnsafeArtifactError, match="trusted=True") as caught:
        load_artifact(evil_file)
    assert caught.value.code == "unsafe_artifact"
    assert not sentinel.exists()
    # Refused before touching the file system at all: a missing file gives the same answer.
    with pytest.raises(UnsafeArtifactError):
        load_artifact(evil_file.with_name("missing.pkl"))


def test_trusted_artifact_loads_which_proves_the_fixture_is_real(
    evil_file: Path, sentinel: Path
) -> None:
    with pytest.warns(UnpinnedArtifactWarning, match="no sha256"):
        load_artifact(evil_file, trusted=True)
    assert sentinel.is_dir()


def test_pinned_sha256_loads_and_wrong_sha256_is_refused(evil_file: Path, sentinel: Path) -> None:
    with pytest.raises(ArtifactIntegrityError, match="does not match"):
        load_artifact(evil_file, sha256="ab" * 32)
    with pytest.raises(ArtifactIntegrityError):
        load_artifact(evil_file, sha256="ab" * 32, trusted=True)  # trusted does not skip it
    with pytest.raises(ValueError, match="64 hex digits"):
        load_artifact(evil_file, sha256="not-a-hash")
    assert not sentinel.exists()
    load_artifact(evil_file, sha256=sha256_of(evil_file.read_bytes()))
    assert sentinel.is_dir()


def test_resolve_name_gadget_is_refused_like_any_pickle(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "gadget.pkl"
    path.write_bytes(_resolve_name_gadget(sentinel))
    with pytest.raises(UnsafeArtifactError):
        load_artifact(path)
    with pytest.raises(ArtifactIntegrityError):
        load_artifact(path, sha256="0" * 64)
    assert not sentinel.exists()
    with pytest.warns(UnpinnedArtifactWarning):
        load_artifact(path, trusted=True)  # the gadget is real
    assert sentinel.is_dir()


def test_load_artifact_round_trip_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({"w": [1, 2]}))
    assert load_artifact(path, sha256=sha256_of(path.read_bytes())) == {"w": [1, 2]}
    with pytest.raises(FileNotFoundError), pytest.warns(UnpinnedArtifactWarning):
        load_artifact(tmp_path / "missing.pkl", trusted=True)


def test_tampered_store_artifact_is_refused(
    store: ModelStore, evil_file: Path, sentinel: Path
) -> None:
    info = store.save("churn", Double())
    (info.path / "model.pkl").write_bytes(evil_file.read_bytes())
    with pytest.raises(ArtifactIntegrityError, match="churn:1"):
        store.load("churn")
    assert not sentinel.exists()


# -- SEC-02: the verified bytes are the loaded bytes ------------------------------------


def test_store_load_unpickles_the_verified_bytes_not_a_swapped_file(
    store: ModelStore, evil_file: Path, sentinel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = store.save("churn", Double())
    pkl = info.path / "model.pkl"
    real_read = _artifact._read_bytes  # the function _store imported
    swapped = []

    def read_then_swap(path: Path) -> bytes:
        data = real_read(path)
        if path.name == "model.pkl":
            # The attacker wins the race: the file changes right after it was read.
            path.write_bytes(evil_file.read_bytes())
            swapped.append(path)
        return data

    monkeypatch.setattr(_store, "_read_bytes", read_then_swap)
    model = store.load("churn")
    assert swapped == [pkl]
    assert isinstance(model, Double) and model.predict([2.0]) == [4.0]
    assert not sentinel.exists()
    assert pkl.read_bytes() == evil_file.read_bytes()  # the swap really happened

    # ...and the next load reads the swapped file, and refuses it.
    monkeypatch.setattr(_store, "_read_bytes", real_read)
    with pytest.raises(ArtifactIntegrityError):
        store.load("churn")
    assert not sentinel.exists()


def test_load_artifact_unpickles_the_verified_bytes_not_a_swapped_file(
    tmp_path: Path, evil_file: Path, sentinel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps([1, 2, 3]))
    digest = sha256_of(good.read_bytes())
    real_read = _artifact._read_bytes

    def read_then_swap(path: Path) -> bytes:
        data = real_read(path)
        path.write_bytes(evil_file.read_bytes())
        return data

    monkeypatch.setattr(_artifact, "_read_bytes", read_then_swap)
    assert load_artifact(good, sha256=digest) == [1, 2, 3]
    assert not sentinel.exists()


# -- SEC-05: names and paths never leave the root ---------------------------------------

REJECTED = [
    "../etc",
    "a/../b",
    "../../etc/passwd",
    "/etc/passwd",
    "model/..",
    "..",
    ".",
    "model/subdir",
    "model/",
    " ..",
    ".. ",
    "",
    " ",
    "\t\n",
    " churn",
    "churn ",
    "a\\b",
    "..\\etc",
    "a\x00b",
    "x" * 129,
]
ACCEPTED = ["...", "..my_model", "churn", "Churn-v2.1_final", "x" * 128, "1"]


@pytest.mark.parametrize("name", REJECTED)
def test_bad_names_are_rejected_everywhere(store: ModelStore, name: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_name(name)
    with pytest.raises(InvalidModelName):
        store.save(name, Double())
    with pytest.raises(InvalidModelName):
        store.load(f"{name}:1")
    with pytest.raises(InvalidModelName):
        store.versions(name)
    store.save("ok", Double())
    with pytest.raises(InvalidModelName):
        store.set_alias("ok", name, 1)
    with pytest.raises(InvalidModelName):
        store.load(f"ok@{name}")
    # Nothing was written anywhere but the valid model's own directory.
    assert sorted(os.listdir(store.root)) == ["ok"]
    assert sorted(os.listdir(store.root.parent)) == ["store"]


@pytest.mark.parametrize("name", ACCEPTED)
def test_good_names_are_accepted(store: ModelStore, name: str) -> None:
    assert validate_name(name) == name
    info = store.save(name, Double())
    assert info.path == store.root / name / "1"
    assert store.names() == [name]
    store.set_alias(name, name, 1)
    assert isinstance(store.load(f"{name}@{name}"), Double)


def test_symlinked_model_dir_pointing_outside_is_refused(tmp_path: Path) -> None:
    outside = ModelStore(tmp_path / "outside")
    outside.save("churn", Double())
    store = ModelStore(tmp_path / "store")
    (store.root / "churn").symlink_to(outside.root / "churn", target_is_directory=True)
    with pytest.raises(UnsafeArtifactError, match="outside the model store"):
        store.load("churn:1")
    with pytest.raises(UnsafeArtifactError):
        store.save("churn", Double())  # and nothing is written through the link
    assert [i.version for i in outside.versions("churn")] == [1]


def test_symlinked_version_dir_pointing_outside_is_refused(tmp_path: Path) -> None:
    outside = ModelStore(tmp_path / "outside")
    outside.save("churn", Double())
    store = ModelStore(tmp_path / "store")
    store.save("churn", Double())
    (store.root / "churn" / "2").symlink_to(outside.root / "churn" / "1")
    with pytest.raises(UnsafeArtifactError, match="outside the model store"):
        store.load("churn:2")
    assert isinstance(store.load("churn:1"), Double)


def test_symlinked_artifact_file_is_refused(tmp_path: Path, evil_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    info = store.save("churn", Double())
    pkl = info.path / "model.pkl"
    # A link to a file outside the store...
    pkl.unlink()
    pkl.symlink_to(evil_file)
    with pytest.raises(UnsafeArtifactError):
        store.load("churn:1")
    # ...and a link that stays inside the store: still not followed (O_NOFOLLOW).
    second = store.save("churn", Double())
    pkl.unlink()
    pkl.symlink_to(second.path / "model.pkl")
    with pytest.raises(UnsafeArtifactError, match="symlink"):
        store.load("churn:1")


def test_store_root_may_itself_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    store = ModelStore(tmp_path / "link")
    store.save("churn", Double())
    assert isinstance(store.load("churn"), Double)
    assert (real / "churn" / "1" / "model.pkl").is_file()
