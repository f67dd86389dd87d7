"""Versioned model artifacts on disk, with aliases and safe loading.

A :class:`ModelStore` keeps each saved model as ``root/<name>/<version>/`` holding
``model.pkl`` (cloudpickle) and ``manifest.json`` (sha256, library versions, metadata,
signature). Loads verify the sha256 over the exact bytes they unpickle; a pickle from
elsewhere loads only through :func:`load_artifact` with a pinned hash or
``trusted=True``.

Example::

    from servekit.registry import ModelStore

    store = ModelStore("models/")
    info = store.save("churn", Churn(), metadata={"auc": 0.91})
    store.set_alias("churn", "champion", info.version)
    model = store.load("churn@champion")
"""

from ._artifact import ArtifactIntegrityError as ArtifactIntegrityError
from ._artifact import ArtifactLoadError as ArtifactLoadError
from ._artifact import InvalidMetadata as InvalidMetadata
from ._artifact import InvalidModelName as InvalidModelName
from ._artifact import ModelNotFound as ModelNotFound
from ._artifact import UnpinnedArtifactWarning as UnpinnedArtifactWarning
from ._artifact import UnsafeArtifactError as UnsafeArtifactError
from ._artifact import VersionInUse as VersionInUse
from ._artifact import load_artifact as load_artifact
from ._artifact import validate_name as validate_name
from ._store import ArtifactVersionWarning as ArtifactVersionWarning
from ._store import ModelInfo as ModelInfo
from ._store import ModelStore as ModelStore

__all__ = sorted(
    [
        "ArtifactIntegrityError",
        "ArtifactLoadError",
        "ArtifactVersionWarning",
        "InvalidMetadata",
        "InvalidModelName",
        "ModelInfo",
        "ModelNotFound",
        "ModelStore",
        "UnpinnedArtifactWarning",
        "UnsafeArtifactError",
        "VersionInUse",
        "load_artifact",
        "validate_name",
    ]
)
