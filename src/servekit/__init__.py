"""servekit: embeddable model serving.

Put a trained model behind your own code: ``Predictor`` validates inputs and runs the
model on a back end (``Inline``, ``Threads`` or ``Processes``), from threads or event
loops, with typed errors. The guides are in docs/.
"""

import logging as _logging

from ._batcher import Batcher as Batcher
from ._batcher import BatcherStatistics as BatcherStatistics
from ._batcher import is_cancelled as is_cancelled
from ._collate import Collate as Collate
from ._collate import DictOfArrays as DictOfArrays
from ._collate import ListBatch as ListBatch
from ._collate import Pad as Pad
from ._collate import PaddedBatch as PaddedBatch
from ._collate import Stack as Stack
from ._model import FunctionModel as FunctionModel
from ._model import Model as Model
from ._model import model as model
from ._predictor import Predictor as Predictor
from ._predictor import PredictorState as PredictorState
from ._predictor import PredictorStatistics as PredictorStatistics
from ._signature import Array as Array
from ._signature import Signature as Signature
from .backends import Backend as Backend
from .backends import Inline as Inline
from .backends import Processes as Processes
from .backends import Threads as Threads
from .errors import ArtifactIntegrityError as ArtifactIntegrityError
from .errors import ArtifactLoadError as ArtifactLoadError
from .errors import BatchContractError as BatchContractError
from .errors import BatchFailed as BatchFailed
from .errors import Cancelled as Cancelled
from .errors import Closed as Closed
from .errors import DeadlineExceeded as DeadlineExceeded
from .errors import ExecutionTimeout as ExecutionTimeout
from .errors import IdempotencyConflict as IdempotencyConflict
from .errors import InvalidInput as InvalidInput
from .errors import InvalidJobPayload as InvalidJobPayload
from .errors import InvalidMetadata as InvalidMetadata
from .errors import InvalidModelName as InvalidModelName
from .errors import JobNotFound as JobNotFound
from .errors import ModelError as ModelError
from .errors import ModelLoadError as ModelLoadError
from .errors import ModelNotFound as ModelNotFound
from .errors import OutputExists as OutputExists
from .errors import Overloaded as Overloaded
from .errors import ResumeMismatch as ResumeMismatch
from .errors import RetryableError as RetryableError
from .errors import SerializationError as SerializationError
from .errors import ServekitError as ServekitError
from .errors import SourceError as SourceError
from .errors import StoreUnavailable as StoreUnavailable
from .errors import UnsafeArtifactError as UnsafeArtifactError
from .errors import UnsafePath as UnsafePath
from .errors import VersionInUse as VersionInUse
from .errors import WebhookRefused as WebhookRefused
from .errors import WorkerCrashed as WorkerCrashed
from .metrics import LatencySummary as LatencySummary

__version__ = "0.1.0.dev0"

# The library convention: servekit logs, and the host decides where the records go.
_logging.getLogger("servekit").addHandler(_logging.NullHandler())

__all__ = sorted(
    [
        "IdempotencyConflict",
        "InvalidJobPayload",
        "JobNotFound",
        "StoreUnavailable",
        "RetryableError",
        "WebhookRefused",
        "UnsafePath",
        "SourceError",
        "ResumeMismatch",
        "OutputExists",
        "BatchFailed",
        "ArtifactIntegrityError",
        "ArtifactLoadError",
        "InvalidMetadata",
        "InvalidModelName",
        "ModelNotFound",
        "UnsafeArtifactError",
        "VersionInUse",
        "Array",
        "Backend",
        "BatchContractError",
        "Batcher",
        "BatcherStatistics",
        "Cancelled",
        "Closed",
        "Collate",
        "DeadlineExceeded",
        "ExecutionTimeout",
        "DictOfArrays",
        "FunctionModel",
        "Inline",
        "InvalidInput",
        "LatencySummary",
        "ListBatch",
        "Model",
        "ModelError",
        "ModelLoadError",
        "Overloaded",
        "Pad",
        "PaddedBatch",
        "Predictor",
        "PredictorState",
        "PredictorStatistics",
        "Processes",
        "SerializationError",
        "Stack",
        "ServekitError",
        "Signature",
        "Threads",
        "WorkerCrashed",
        "is_cancelled",
        "model",
    ]
)
