"""ModelStore: versioned model artifacts on local disk, with aliases and safe loading.

Layout (everything a store writes stays under its root)::

    root/
      churn/
        1/model.pkl  1/manifest.json    one directory per version, never rewritten
        2/...
        aliases.json                     {"champion": 2, ...}, replaced atomically
        .lock                            flock target serialising writers of this name
        .last_version                    highest version ever allocated (never reused)
      ~tmp-<random>/                     a version being written (names cannot start "~")

Decisions:

- **Locking.** Writers of one name take an exclusive ``fcntl.flock`` on ``root/<name>/.lock``
  for the short critical section that allocates a version number and renames the staged
  directory into place, and for every alias or delete change. A lock is needed anyway
  for the read-modify-write of ``aliases.json`` and for "refuse to delete an aliased
  version"; the kernel drops a flock when its process dies, so a crashed writer never
  leaves a stale lock (an ``O_EXCL`` lock file would). ``os.mkdir`` alone would allocate
  numbers atomically but would hand out a deleted latest version's number again; the
  high-water mark in ``.last_version`` is updated under the same lock. Readers take no
  lock: versions appear by one atomic ``rename`` and ``aliases.json`` by ``os.replace``.
- **Delete.** A version that aliases point to is not deleted (:class:`VersionInUse`)
  unless ``force=True``, which also removes those aliases, so no alias ever dangles.
- **Manifest hashing.** The sha256 in the manifest covers ``model.pkl``, the only file
  whose loading runs code. The manifest itself is not hashed: a hash stored next to the
  thing it protects stops corruption, not an attacker who can write the store. Against
  that, pin the artifact's hash outside the store (``load(ref, sha256=...)``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

from .._model import Model, as_model
from .._signature import Signature
from ._artifact import (
    ArtifactIntegrityError,
    InvalidMetadata,
    InvalidModelName,
    ModelNotFound,
    UnsafeArtifactError,
    VersionInUse,
    _read_bytes,
    sha256_of,
    unpickle,
    validate_name,
    verify,
)

if sys.platform != "win32":
    import fcntl

__all__ = ["ArtifactVersionWarning", "ModelInfo", "ModelStore"]

#: Version of the manifest layout; a store refuses manifests from a newer layout.
MANIFEST_FORMAT = 1
_MODEL_FILE = "model.pkl"
_MANIFEST_FILE = "manifest.json"
_ALIASES_FILE = "aliases.json"
_LOCK_FILE = ".lock"
_LAST_VERSION_FILE = ".last_version"
# "~" is not in the name alphabet, so staging and trash directories never collide with
# a model's directory and names() never lists them.
_TMP_PREFIX = "~tmp-"
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
_REF_RE = re.compile(r"(?P<name>[^:@]*)(?::(?P<version>[^:@]*)|@(?P<alias>[^:@]*))?")


class ArtifactVersionWarning(UserWarning):
    """A model is loaded under a Python, numpy or cloudpickle version other than the one
    it was saved with; pickles of code and arrays may then misbehave."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the store knows about one saved version (read from its manifest).

    >>> info = store.save("churn", model)            # doctest: +SKIP
    >>> (info.name, info.version, info.ref)           # doctest: +SKIP
    ('churn', 1, 'churn:1')
    """

    #: The model's name.
    name: str
    #: The version number (1, 2, 3, ...; never reused).
    version: int
    #: The version's directory.
    path: Path
    #: When the version was saved (UTC).
    created_at: _dt.datetime
    #: Hex sha256 of ``model.pkl``, checked on every load.
    sha256: str
    #: Size of ``model.pkl`` in bytes.
    size: int
    #: The JSON metadata given to ``save``.
    metadata: dict[str, Any]
    #: Aliases pointing at this version, sorted.
    aliases: tuple[str, ...]
    #: ``platform.python_version()`` of the saving process.
    python_version: str
    #: ``numpy.__version__`` of the saving process.
    numpy_version: str
    #: ``cloudpickle.__version__`` of the saving process.
    cloudpickle_version: str
    #: ``servekit.__version__`` of the saving process.
    servekit_version: str
    #: The model's signature as JSON Schema (``{"input": ..., "output": ...}``), or None.
    signature: dict[str, Any] | None

    @property
    def ref(self) -> str:
        """The exact reference of this version, ``"name:version"``."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class _Ref:
    name: str
    version: int | None  # None = latest, unless alias is set
    alias: str | None


def _parse_ref(ref: str) -> _Ref:
    match = _REF_RE.fullmatch(ref) if isinstance(ref, str) else None
    if match is None:
        raise InvalidModelName(
            f"invalid model reference {ref!r}: use 'name', 'name:3', 'name:latest' or 'name@alias'"
        )
    name = validate_name(match["name"])
    if match["alias"] is not None:
        alias = validate_name(match["alias"], kind="alias")
        # "@latest" reads naturally; it means what ":latest" means.
        return _Ref(name, None, None if alias == "latest" else alias)
    text = match["version"]
    if text is None or text == "latest":
        return _Ref(name, None, None)
    if not _VERSION_RE.fullmatch(text):
        raise InvalidModelName(
            f"invalid version {text!r} in {ref!r}: use a positive integer or 'latest'"
        )
    return _Ref(name, int(text), None)


def _check_json(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON data (tuples become lists), or raise InvalidMetadata."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMetadata(f"{where} is {value}, which JSON cannot hold; use null")
        return value
    if isinstance(value, (list, tuple)):
        return [_check_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise InvalidMetadata(
                    f"{where} has key {key!r} of type {type(key).__name__}; JSON keys must "
                    "be strings"
                )
            out[key] = _check_json(v, f"{where}[{key!r}]")
        return out
    raise InvalidMetadata(
        f"{where} is a {type(value).__name__}, which is not JSON; metadata may hold only "
        "dicts with string keys, lists, strings, numbers, booleans and None"
    )


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory entry is; Windows cannot
    # open directories, and its renames are journaled by NTFS.
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) with ``data``, flushed to disk."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _signature_schema(model: Model[Any, Any], signature: Signature | None) -> dict[str, Any] | None:
    try:
        sig = signature if signature is not None else model.signature()
        schema = sig.json_schema()
        # The schema goes into a JSON file: make sure it can.
        return dict(json.loads(json.dumps(schema, allow_nan=False)))
    except Exception:
        # A signature is a description; a model whose annotations cannot be turned into
        # JSON Schema is still worth saving.
        return None


class ModelStore:
    """Versioned model artifacts under a directory: save, load, alias, delete.

    References name a version: ``"churn:3"``, ``"churn:latest"`` (or just ``"churn"``),
    and ``"churn@champion"`` through an alias. Every load verifies the artifact's
    sha256 against its manifest before unpickling. Several threads and processes may
    write one store at once (on POSIX, through ``fcntl.flock``; on Windows there is no
    lock, so keep one writer at a time); version numbers are never reused.

    Example::

        store = ModelStore("models/")
        info = store.save("churn", Churn(), metadata={"auc": 0.91})
        store.set_alias("churn", "champion", info.version)
        model = store.load("churn@champion")
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        os.makedirs(root, exist_ok=True)
        #: The store's directory, fully resolved; no path the store uses leaves it.
        self.root = Path(os.path.realpath(root))

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # -- paths ------------------------------------------------------------------------

    def _contained(self, path: Path) -> Path:
        """Return ``path`` if it really lies inside the root, symlinks resolved."""
        real = Path(os.path.realpath(path))
        if real != self.root and not real.is_relative_to(self.root):
            raise UnsafeArtifactError(
                f"{path} resolves to {real}, outside the model store {self.root}; "
                "a symlink in the store points elsewhere. Remove it"
            )
        return path

    def _name_dir(self, name: str) -> Path:
        return self._contained(self.root / validate_name(name))

    def _version_dir(self, name: str, version: int) -> Path:
        return self._contained(self._name_dir(name) / str(version))

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold the writers' lock of ``name``; yields its directory (created if need be)."""
        name_dir = self._name_dir(name)
        if not name_dir.is_dir():
            name_dir.mkdir(exist_ok=True)  # exist_ok: another writer may win the race
            _fsync_dir(self.root)
        self._contained(name_dir)  # re-check: a symlink may have appeared meanwhile
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(name_dir / _LOCK_FILE, flags, 0o644)
        try:
            if sys.platform != "win32":
                # Blocks until other writers (threads or processes) are done; released
                # when fd closes, or by the kernel if this process dies.
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield name_dir
        finally:
            os.close(fd)

    # -- reading ----------------------------------------------------------------------

    def _version_numbers(self, name: str) -> list[int]:
        name_dir = self._name_dir(name)
        try:
            entries = os.listdir(name_dir)
        except FileNotFoundError:
            return []
        return sorted(
            int(e)
            for e in entries
            if _VERSION_RE.fullmatch(e) and (name_dir / e / _MANIFEST_FILE).exists()
        )

    def _read_aliases(self, name: str) -> dict[str, int]:
        path = self._contained(self._name_dir(name) / _ALIASES_FILE)
        try:
            raw = json.loads(_read_bytes(path))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ArtifactIntegrityError(
                f"{path} is not valid JSON ({exc}); fix or delete it to drop all aliases"
            ) from None
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in raw.items()
        ):
            raise ArtifactIntegrityError(
                f"{path} must map alias names to version numbers; fix or delete it"
            )
        return dict(raw)

    def _resolve(self, ref: str) -> tuple[str, int]:
        parsed = _parse_ref(ref)
        if parsed.alias is not None:
            aliases = self._read_aliases(parsed.name)
            if parsed.alias not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise ModelNotFound(
                    f"model {parsed.name!r} has no alias {parsed.alias!r} (aliases: {known}); "
                    "set it with store.set_alias()"
                )
            return parsed.name, aliases[parsed.alias]
        versions = self._version_numbers(parsed.name)
        if not versions:
            raise ModelNotFound(
                f"no model named {parsed.name!r} in {self.root}; save one with store.save()"
            )
        if parsed.version is None:
            return parsed.name, versions[-1]
        if parsed.version not in versions:
            raise ModelNotFound(
                f"model {parsed.name!r} has no version {parsed.version} "
                f"(versions: {', '.join(map(str, versions))})"
            )
        return parsed.name, parsed.version

    def _manifest(self, name: str, version: int) -> tuple[Path, dict[str, Any]]:
        vdir = self._version_dir(name, version)
        path = self._contained(vdir / _MANIFEST_FILE)
        try:
            manifest = json.loads(_read_bytes(path))
        except FileNotFoundError:
            raise ModelNotFound(f"model {name!r} has no version {version}") from None
        except ValueError as exc:
            raise ArtifactIntegrityError(
                f"{path} is not valid JSON ({exc}); the version is damaged, save it again"
            ) from None
        try:
            fmt = manifest["format"]
            entry = manifest["files"][_MODEL_FILE]
            if not (isinstance(entry["sha256"], str) and type(entry["size"]) is int):
                raise TypeError("sha256 must be a string and size an integer")
        except (KeyError, TypeError) as exc:
            raise ArtifactIntegrityError(
                f"{path} lacks required fields ({exc}); the version is damaged, save it again"
            ) from None
        if fmt != MANIFEST_FORMAT:
            raise ArtifactIntegrityError(
                f"{path} has manifest format {fmt!r}; this servekit reads format "
                f"{MANIFEST_FORMAT}. Upgrade servekit to load it"
            )
        return vdir, manifest

    def _info(self, name: str, version: int, aliases: Mapping[str, int]) -> ModelInfo:
        vdir, m = self._manifest(name, version)
        entry = m["files"][_MODEL_FILE]
        try:
            created_at = _dt.datetime.fromisoformat(str(m.get("created_at")))
        except ValueError:
            raise ArtifactIntegrityError(
                f"{vdir / _MANIFEST_FILE} has no valid created_at; the version is damaged"
            ) from None
        return ModelInfo(
            name=name,
            version=version,
            path=vdir,
            created_at=created_at,
            sha256=entry["sha256"],
            size=entry["size"],
            metadata=dict(m.get("metadata") or {}),
            aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
            python_version=str(m.get("python_version", "")),
            numpy_version=str(m.get("numpy_version", "")),
            cloudpickle_version=str(m.get("cloudpickle_version", "")),
            servekit_version=str(m.get("servekit_version", "")),
            signature=m.get("signature"),
        )

    def info(self, ref: str) -> ModelInfo:
        """The :class:`ModelInfo` of the version ``ref`` names.

        >>> store.info("churn@champion").version          # doctest: +SKIP
        2
        """
        name, version = self._resolve(ref)
        return self._info(name, version, self._read_aliases(name))

    def versions(self, name: str) -> list[ModelInfo]:
        """Every saved version of ``name``, oldest first (empty if there is none).

        >>> [i.version for i in store.versions("churn")]  # doctest: +SKIP
        [1, 2, 3]
        """
        aliases = self._read_aliases(name)
        return [self._info(name, v, aliases) for v in self._version_numbers(name)]

    def names(self) -> list[str]:
        """The names of the models that have at least one version, sorted.

        >>> store.names()                                 # doctest: +SKIP
        ['churn', 'fraud']
        """
        found = []
        for entry in os.listdir(self.root):
            try:
                validate_name(entry)
            except InvalidModelName:
                continue  # staging directories and stray files
            try:
                if (self.root / entry).is_dir() and self._version_numbers(entry):
                    found.append(entry)
            except UnsafeArtifactError:
                continue  # a symlink out of the store: not a model of this store
        return sorted(found)

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of ``name``, mapped to the versions they point at.

        >>> store.aliases("churn")                        # doctest: +SKIP
        {'champion': 2, 'challenger': 3}
        """
        return self._read_aliases(name)

    def load(self, ref: str, *, sha256: str | None = None) -> Model[Any, Any]:
        """Load the model ``ref`` names, after verifying its bytes.

        ``model.pkl`` is read into memory once, its sha256 is checked against the
        manifest (and against ``sha256`` too, if you pin one outside the store), and only
        then are those same bytes unpickled. A mismatch raises
        :class:`ArtifactIntegrityError` and nothing is unpickled. If the model was saved
        under another Python (major.minor), numpy or cloudpickle version, an
        :class:`ArtifactVersionWarning` names both versions.

        >>> model = store.load("churn@champion")           # doctest: +SKIP
        """
        name, version = self._resolve(ref)
        vdir, manifest = self._manifest(name, version)
        entry = manifest["files"][_MODEL_FILE]
        what = f"model {name}:{version} ({vdir / _MODEL_FILE})"
        try:
            data = _read_bytes(self._contained(vdir / _MODEL_FILE))
        except FileNotFoundError:
            raise ArtifactIntegrityError(
                f"{what} is missing although its manifest exists; save the model again"
            ) from None
        verify(data, entry["sha256"], what=what)
        if sha256 is not None:
            verify(data, sha256, what=what)
        _warn_on_version_drift(manifest, name, version)
        obj = unpickle(data, what=what)
        if not isinstance(obj, Model):
            raise ArtifactIntegrityError(
                f"{what} holds a {type(obj).__name__}, not a servekit Model; it was not "
                "written by ModelStore.save"
            )
        return obj

    # -- writing ----------------------------------------------------------------------

    def save(
        self,
        name: str,
        model: Model[Any, Any] | Callable[..., Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        signature: Signature | None = None,
    ) -> ModelInfo:
        """Save ``model`` as the next version of ``name`` and return its :class:`ModelInfo`.

        A plain callable is wrapped as a :class:`~servekit.FunctionModel` first. The
        model is pickled with cloudpickle (functions and classes defined in ``__main__``
        or a notebook are stored by value). ``metadata`` must be JSON data. The version
        appears all at once, or not at all if anything fails.

        >>> store.save("churn", Churn(), metadata={"auc": 0.91}).version   # doctest: +SKIP
        1
        """
        validate_name(name)
        meta = _check_json(dict(metadata or {}), "metadata")
        the_model = as_model(model)
        # Before pickling: working out the signature resolves string annotations into
        # the model's functions, so a by-value copy (a model of ``__main__``) keeps them.
        schema = _signature_schema(the_model, signature)
        data = cloudpickle.dumps(the_model)
        manifest = {
            "format": MANIFEST_FORMAT,
            "files": {_MODEL_FILE: {"sha256": sha256_of(data), "size": len(data)}},
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "python_version": platform.python_version(),
            "numpy_version": np.__version__,
            "cloudpickle_version": cloudpickle.__version__,
            "servekit_version": _servekit_version(),
            "metadata": meta,
            "signature": schema,
        }
        # Stage the whole version outside the lock (the slow part: writing and fsyncing
        # the pickle), in the root so the final rename stays on one filesystem.
        staging = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            _write_file(staging / _MODEL_FILE, data)
            _write_file(staging / _MANIFEST_FILE, _dumps(manifest))
            _fsync_dir(staging)
            with self._locked(name) as name_dir:
                # Every numbered entry counts, even one without a manifest (a stray
                # directory): renaming onto it would fail, or replace it if empty.
                taken = [int(e) for e in os.listdir(name_dir) if _VERSION_RE.fullmatch(e)]
                version = max([self._last_version(name_dir), *taken]) + 1
                # Record the number before using it: if we die between the two steps the
                # number is skipped, never handed out twice.
                self._write_atomic(name_dir / _LAST_VERSION_FILE, str(version).encode())
                os.rename(staging, name_dir / str(version))
                _fsync_dir(name_dir)
                aliases = self._read_aliases(name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._info(name, version, aliases)

    def _last_version(self, name_dir: Path) -> int:
        try:
            text = _read_bytes(self._contained(name_dir / _LAST_VERSION_FILE)).decode()
        except FileNotFoundError:
            return 0
        return int(text) if _VERSION_RE.fullmatch(text.strip()) else 0

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data``: readers see the old or the new file, never half."""
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            _write_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``name@alias`` at ``version`` (creating or moving the alias).

        ``latest`` is reserved (``name@latest`` always means the newest version).

        >>> store.set_alias("churn", "champion", 2)       # doctest: +SKIP
        """
        validate_name(alias, kind="alias")
        if alias == "latest":
            raise InvalidModelName("'latest' is reserved: it always names the newest version")
        if type(version) is not int:
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        with self._locked(name) as name_dir:
            if version not in self._version_numbers(name):
                raise ModelNotFound(f"model {name!r} has no version {version}; save it first")
            aliases = self._read_aliases(name)
            aliases[alias] = version
            self._write_atomic(name_dir / _ALIASES_FILE, _dumps(aliases))

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``; the version it pointed at stays.

        Raises :class:`ModelNotFound` if there is no such alias.

        >>> store.remove_alias("churn", "challenger")     # doctest: +SKIP
        """
        validate_name(alias, kind="alias")
        with self._locked(name) as name_dir:
            aliases = self._read_aliases(name)
            if aliases.pop(alias, None) is None:
                raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
            self._write_atomic(name_dir / _ALIASES_FILE, _dumps(aliases))

    def delete(self, ref: str, *, force: bool = False) -> None:
        """Delete one version: ``ref`` is ``"name:3"`` or ``"name@alias"``.

        A bare name or ``:latest`` is refused, so a moving pointer never picks what is
        deleted. A version that aliases point at is kept and :class:`VersionInUse` is
        raised, unless ``force=True``, which deletes it and removes those aliases. Its
        number is never reused.

        >>> store.delete("churn:1")                       # doctest: +SKIP
        """
        parsed = _parse_ref(ref)
        if parsed.version is None and parsed.alias is None:
            raise InvalidModelName(
                f"delete needs an explicit version, like '{parsed.name}:3', not {ref!r}"
            )
        with self._locked(parsed.name) as name_dir:
            name, version = self._resolve(ref)
            aliases = self._read_aliases(name)
            pointing = tuple(sorted(a for a, v in aliases.items() if v == version))
            if pointing and not force:
                raise VersionInUse(
                    f"{name}:{version} is aliased as {', '.join(pointing)}; move or remove "
                    "those aliases first, or pass force=True to delete it and them",
                    aliases=pointing,
                )
            if pointing:
                kept = {a: v for a, v in aliases.items() if v != version}
                self._write_atomic(name_dir / _ALIASES_FILE, _dumps(kept))
            # Rename first, so the version vanishes atomically for readers; then remove.
            trash = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            os.rename(self._version_dir(name, version), trash)
            _fsync_dir(name_dir)
        shutil.rmtree(trash, ignore_errors=True)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"


def _servekit_version() -> str:
    # Imported late: servekit/__init__ may import this module.
    import servekit

    return str(getattr(servekit, "__version__", "unknown"))


def _warn_on_version_drift(manifest: Mapping[str, Any], name: str, version: int) -> None:
    # Python is compared by major.minor: cloudpickle stores code objects by value, and
    # bytecode changes between minor releases. numpy and cloudpickle by full version.
    def major_minor(v: str) -> str:
        return ".".join(v.split(".")[:2])

    current = {
        "Python": platform.python_version(),
        "numpy": np.__version__,
        "cloudpickle": cloudpickle.__version__,
    }
    for lib, key in (
        ("Python", "python_version"),
        ("numpy", "numpy_version"),
        ("cloudpickle", "cloudpickle_version"),
    ):
        saved = str(manifest.get(key, ""))
        now = current[lib]
        differs = major_minor(saved) != major_minor(now) if lib == "Python" else saved != now
        if saved and differs:
            warnings.warn(
                f"model {name}:{version} was saved with {lib} {saved} and is loaded with "
                f"{lib} {now}; if it misbehaves, load it under {lib} {saved} or save it again",
                ArtifactVersionWarning,
                stacklevel=3,
            )
