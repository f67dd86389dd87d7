"""Pickled model artifacts: the registry's errors, name rules, and safe loading.

Loading a pickle runs code chosen by whoever wrote the file. So nothing here unpickles
bytes unless the caller vouched for them, either by pinning their sha256 (from a
manifest, or given explicitly) or by saying ``trusted=True``. The hash is computed over
the very bytes that are then unpickled, read into memory once: swapping the file after
the check changes nothing (no time-of-check/time-of-use gap).

The errors raised here live in :mod:`servekit.errors` (its docstring draws the tree)
and are re-exported by :mod:`servekit.registry`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import cloudpickle

from ..errors import (
    ArtifactIntegrityError,
    ArtifactLoadError,
    InvalidMetadata,
    InvalidModelName,
    ModelNotFound,
    UnsafeArtifactError,
    VersionInUse,
)

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactLoadError",
    "InvalidMetadata",
    "InvalidModelName",
    "ModelNotFound",
    "UnpinnedArtifactWarning",
    "UnsafeArtifactError",
    "VersionInUse",
    "load_artifact",
    "sha256_of",
    "validate_name",
]


# One path component from a small portable alphabet. The characters that could leave a
# directory or confuse a shell or URL ("/", "\\", NUL, whitespace, ":", "@") are simply
# not in it; "." and ".." are refused by name. Other dotted names ("...", "..my_model")
# are ordinary directory names and stay allowed (RELIABILITY.md SEC-05).
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class UnpinnedArtifactWarning(UserWarning):
    """``load_artifact(..., trusted=True)`` without a ``sha256``: the load goes ahead, but
    nothing pins what the pickle will run."""


def validate_name(name: object, *, kind: str = "model name") -> str:
    """Return ``name`` if it is a valid model or alias name, else raise InvalidModelName.

    A name is 1 to 128 characters from ``A-Z a-z 0-9 . _ -``, and is not ``.`` or ``..``;
    so it is always exactly one directory name inside the store.

    >>> validate_name("churn-v2")
    'churn-v2'
    >>> validate_name("..my_model")
    '..my_model'
    >>> validate_name("../etc")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    servekit.registry._artifact.InvalidModelName: invalid model name '../etc': ...
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidModelName(
            f"invalid {kind} {name!r}: use 1 to 128 characters from letters, digits, "
            "'.', '_' and '-', and not '.' or '..'"
        )
    return name


def sha256_of(data: bytes) -> str:
    """The lowercase hex sha256 of ``data``.

    >>> sha256_of(b"")[:16]
    'e3b0c44298fc1c14'
    """
    return hashlib.sha256(data).hexdigest()


def _normalise_sha256(sha256: str) -> str:
    value = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return value


def _read_bytes(path: Path) -> bytes:
    """Read a regular file whole, without following a symlink in its last component.

    This is the single read of an artifact: its result is hashed and then unpickled, so
    the bytes that are checked are the bytes that are loaded.
    """
    # O_NOFOLLOW: a symlink planted after the caller's realpath check is refused by the
    # kernel (ELOOP) instead of silently followed. Not every platform has it.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_symlink():
            raise UnsafeArtifactError(
                f"{path} is a symlink; servekit does not follow symlinks to artifacts. "
                "Copy the file itself into place"
            ) from None
        raise
    with os.fdopen(fd, "rb") as file:
        # A FIFO or device would block or never end; only regular files are artifacts.
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise UnsafeArtifactError(f"{path} is not a regular file; refusing to read it")
        return file.read()


def verify(data: bytes, expected_sha256: str, *, what: str) -> str:
    """Raise ArtifactIntegrityError unless ``data`` hashes to ``expected_sha256``.

    Returns the actual digest. ``what`` names the artifact in the message.
    """
    actual = sha256_of(data)
    # compare_digest: no timing signal about how many leading digits matched.
    if not hmac.compare_digest(actual, _normalise_sha256(expected_sha256)):
        raise ArtifactIntegrityError(
            f"{what} does not match its pinned sha256 (expected {expected_sha256}, got "
            f"{actual}); it was modified or corrupted after it was written, and was not "
            "loaded. Restore it from a trusted copy or save the model again"
        )
    return actual


def unpickle(data: bytes, *, what: str) -> Any:
    """Unpickle bytes that the caller has already verified or trusts."""
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        raise ArtifactLoadError(
            f"{what} passed its integrity check but could not be unpickled "
            f"({type(exc).__name__}: {exc}); install the packages the model needs, in "
            "versions compatible with the ones recorded in its manifest"
        ) from exc


def load_artifact(
    path: str | os.PathLike[str], *, trusted: bool = False, sha256: str | None = None
) -> Any:
    """Load a (cloud)pickle file from outside a :class:`~servekit.registry.ModelStore`.

    Unpickling runs code from the file, so this refuses with
    :class:`UnsafeArtifactError` -- before opening the file -- unless you vouch for it:
    pass the ``sha256`` you expect (the bytes are read once, hashed, and only those bytes
    are unpickled; a mismatch raises :class:`ArtifactIntegrityError`), or
    ``trusted=True`` if the file is yours. With both, the hash is still checked.
    A missing file raises :class:`FileNotFoundError`.

    Example::

        model = load_artifact("churn.pkl", sha256="9f86d081884c7d65...")
        model = load_artifact("my_own.pkl", trusted=True)
    """
    where = Path(path)
    if sha256 is None and trusted:
        # Allowed, but loud (RELIABILITY.md SEC-01): nothing pins what will run. Silence
        # it with warnings.filterwarnings("ignore", category=UnpinnedArtifactWarning).
        warnings.warn(
            f"loading {where} with trusted=True and no sha256: nothing pins its contents; "
            "pass sha256= to make sure the file is the one you trust",
            UnpinnedArtifactWarning,
            stacklevel=2,
        )
    if sha256 is None and not trusted:
        raise UnsafeArtifactError(
            f"refusing to unpickle {where}: loading a pickle runs code from the file. "
            "Pass sha256='<hex digest you expect>' to pin its contents, or trusted=True "
            "if you made the file yourself"
        )
    expected = _normalise_sha256(sha256) if sha256 is not None else None
    # Outside a store the caller chose the path, links included: resolve it once, then
    # read the resolved file without following further links.
    data = _read_bytes(Path(os.path.realpath(where)))
    if expected is not None:
        verify(data, expected, what=str(where))
    return unpickle(data, what=str(where))
