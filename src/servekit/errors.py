"""All servekit errors.

Every error servekit raises is a :class:`ServekitError`. Each class has a stable
``code`` string (transports map codes to protocol statuses) and a message that says
what to do. Where the meaning matches a builtin, the class derives from it too, so
``except TimeoutError`` and ``except ValueError`` keep working in host code.

::

    ServekitError
    ├── InvalidInput (ValueError)        the input failed the model's signature; nothing was queued
    ├── ModelError                       the model raised (or returned an exception) for this item
    │   └── BatchContractError           the model returned the wrong number of outputs
    ├── ModelLoadError                   Model.load() failed; the predictor did not start
    ├── DeadlineExceeded (TimeoutError)  the request's timeout passed before a result
    ├── Overloaded                       the queue is full; retry after ``retry_after_s``
    ├── Closed                           the predictor is closing or closed
    ├── Cancelled                        the request was cancelled before it finished
    ├── WorkerCrashed                    the worker process running the request died
    ├── ExecutionTimeout (TimeoutError)  the request's batch ran past batch_timeout_s
    ├── SerializationError               an input or output could not cross a process boundary
    │   the model store (servekit.registry):
    ├── UnsafeArtifactError              refused to unpickle: not trusted, or outside the store
    ├── ArtifactIntegrityError           bytes differ from their sha256, or a bad manifest
    ├── ArtifactLoadError                verified bytes that could not be unpickled
    ├── ModelNotFound (LookupError)      no such model, version or alias
    ├── InvalidModelName (ValueError)    a name, alias or reference breaks the naming rule
    ├── InvalidMetadata (ValueError)     metadata that cannot be stored as JSON
    ├── VersionInUse                     delete refused: aliases still point at the version
    │   the job store (servekit.jobs):
    ├── StoreUnavailable                 the job store cannot take writes; nothing was written
    ├── JobNotFound (LookupError)        no job has this id (never existed, or purged)
    ├── IdempotencyConflict              an idempotency key reused with a different input
    ├── InvalidJobPayload (ValueError)   a job input/result that is not storable JSON
    ├── WebhookRefused (ValueError)      a webhook URL refused (scheme, or a private address)
    ├── RetryableError                   raised by a model: the job may succeed if run again
    │   batch inference (servekit.batch):
    ├── SourceError (ValueError)         an input that cannot be read (format, schema, columns)
    ├── OutputExists (FileExistsError)   the output exists; pass overwrite=True or resume=True
    ├── UnsafePath (PermissionError)     a path outside the configured root
    ├── ResumeMismatch (ValueError)      resume=True with other settings or another input
    └── BatchFailed                      the run stopped: too many failed rows (max_error_rate)

All errors pickle with their attributes, so they cross process boundaries intact.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactLoadError",
    "BatchContractError",
    "BatchFailed",
    "Cancelled",
    "Closed",
    "DeadlineExceeded",
    "ExecutionTimeout",
    "IdempotencyConflict",
    "InvalidInput",
    "InvalidJobPayload",
    "InvalidMetadata",
    "InvalidModelName",
    "JobNotFound",
    "ModelError",
    "ModelLoadError",
    "ModelNotFound",
    "OutputExists",
    "Overloaded",
    "ResumeMismatch",
    "RetryableError",
    "SerializationError",
    "ServekitError",
    "SourceError",
    "StoreUnavailable",
    "UnsafeArtifactError",
    "UnsafePath",
    "VersionInUse",
    "WebhookRefused",
    "WorkerCrashed",
]


class ServekitError(Exception):
    """Base class of every error servekit raises.

    ``code`` is a stable, machine-readable name of the error class; ``message`` is the
    human-readable text (also ``str(error)``).
    """

    #: Stable machine-readable name of this error class.
    code: ClassVar[str] = "servekit_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _state(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this error (besides ``message``)."""
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default pickling passes only ``args`` to __init__, which loses
        # keyword-only attributes; rebuild through a helper that passes them all.
        return (_rebuild, (type(self), self.message, self._state()))


def _rebuild(cls: type[ServekitError], message: str, state: dict[str, Any]) -> ServekitError:
    return cls(message, **state)


class InvalidInput(ServekitError, ValueError):
    """The input does not match the model's signature; it was not queued.

    ``errors`` lists each problem as ``{"loc": "field.path", "msg": "...", "type": "..."}``.

    >>> str(InvalidInput("age: Input should be a valid integer"))
    'age: Input should be a valid integer'
    """

    code = "invalid_input"

    def __init__(self, message: str, *, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors: list[dict[str, str]] = list(errors or [])

    def _state(self) -> dict[str, Any]:
        return {"errors": self.errors}


class ModelError(ServekitError):
    """The model failed for this item. The model's own exception is ``__cause__``.

    ``error_type`` names the original exception's class, which survives even where the
    original exception could not be pickled.
    """

    code = "model_error"

    def __init__(self, message: str, *, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type

    def _state(self) -> dict[str, Any]:
        return {"error_type": self.error_type}


class BatchContractError(ModelError):
    """The model returned a number of outputs different from the number of inputs.

    No output is handed to any caller of that batch, so no caller can get another's result.
    """

    code = "batch_contract"


class ModelLoadError(ServekitError):
    """``Model.load()`` raised; the predictor (or worker) could not start."""

    code = "model_load_failed"


class DeadlineExceeded(ServekitError, TimeoutError):
    """The request's ``timeout_s`` passed before its result was ready."""

    code = "deadline_exceeded"


class Overloaded(ServekitError):
    """The queue is full; the request was rejected at once. Retry after ``retry_after_s``."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def _state(self) -> dict[str, Any]:
        return {"retry_after_s": self.retry_after_s}


class Closed(ServekitError):
    """The predictor is closing or closed and takes no new requests."""

    code = "closed"


class Cancelled(ServekitError):
    """The request was cancelled before its result was ready."""

    code = "cancelled"


class WorkerCrashed(ServekitError):
    """The worker process running this request died; the request was not retried.

    ``exitcode`` is the process's exit code, or minus the signal number that killed it
    (as :attr:`multiprocessing.Process.exitcode` reports it).
    """

    code = "worker_crashed"

    def __init__(self, message: str, *, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def _state(self) -> dict[str, Any]:
        return {"exitcode": self.exitcode}


class ExecutionTimeout(ServekitError, TimeoutError):
    """This request's batch ran longer than the back end's ``batch_timeout_s``.

    The model hung, or is far slower than expected on this input. On ``Processes``
    the worker running it was killed and is being replaced (``exitcode`` is its exit
    status, ``-9``); on ``Threads`` the thread cannot be stopped, so it is left to
    finish, its result is dropped, and the back end reports itself unhealthy until it
    returns (``exitcode`` is None). It is not retried by the job queue: an input that
    made the model hang once will likely do it again.
    """

    code = "execution_timeout"

    def __init__(self, message: str, *, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def _state(self) -> dict[str, Any]:
        return {"exitcode": self.exitcode}


class SerializationError(ServekitError):
    """An input or output of this item could not be pickled to cross a process boundary."""

    code = "serialization_error"


class UnsafeArtifactError(ServekitError):
    """servekit refused to unpickle an artifact, before reading a byte of it.

    Unpickling runs arbitrary code, so an artifact is only loaded when its sha256 is
    pinned or the caller passed ``trusted=True``; a path that leaves the store's root
    (through ``..`` or a symlink) is refused too.

    >>> UnsafeArtifactError("refused").code
    'unsafe_artifact'
    """

    code = "unsafe_artifact"


class ArtifactIntegrityError(ServekitError):
    """The artifact's bytes do not match the sha256 they were pinned to, or its manifest
    is unreadable. Nothing was unpickled.

    >>> ArtifactIntegrityError("sha256 mismatch").code
    'artifact_integrity'
    """

    code = "artifact_integrity"


class ArtifactLoadError(ServekitError):
    """The artifact's bytes were verified, but unpickling them failed (a module it needs is
    missing, or it was written by an incompatible library version). ``__cause__`` holds
    the original exception.

    >>> ArtifactLoadError("No module named 'sklearn'").code
    'artifact_load_failed'
    """

    code = "artifact_load_failed"


class ModelNotFound(ServekitError, LookupError):
    """No model, version or alias matches the reference.

    >>> isinstance(ModelNotFound("churn:9"), LookupError)
    True
    """

    code = "model_not_found"


class InvalidModelName(ServekitError, ValueError):
    """A model name, alias or reference does not follow the naming rule (see
    :func:`validate_name`).

    >>> isinstance(InvalidModelName("bad name"), ValueError)
    True
    """

    code = "invalid_model_name"


class InvalidMetadata(ServekitError, ValueError):
    """Metadata given to ``save`` cannot be stored as JSON (a set, an object, a NaN,
    a non-string key).

    >>> InvalidMetadata("metadata['x']: set is not JSON").code
    'invalid_metadata'
    """

    code = "invalid_metadata"


class VersionInUse(ServekitError):
    """``delete`` refused to remove a version that aliases point at.

    ``aliases`` names them; move or remove them first, or pass ``force=True``.

    >>> VersionInUse("in use", aliases=("champion",)).aliases
    ('champion',)
    """

    code = "version_in_use"

    def __init__(self, message: str, *, aliases: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.aliases = tuple(aliases)

    def _state(self) -> dict[str, Any]:
        return {"aliases": self.aliases}


class StoreUnavailable(ServekitError):
    """The job store cannot take writes (disk full, read-only, locked, closed).

    Nothing was written: the operation's transaction was rolled back. Transports map
    this to HTTP 503; retry once the cause (named in the message) is fixed.
    """

    code = "store_unavailable"


class JobNotFound(ServekitError, LookupError):
    """No job has this id (it never existed, or was purged after its retention).

    The message never says which: an unknown id and a purged one look the same (SEC-10).
    """

    code = "job_not_found"


class IdempotencyConflict(ServekitError):
    """An idempotency key was reused with a different input (transports: HTTP 409).

    ``idempotency_key`` is the key the caller sent. The existing job's id is not
    revealed: holding a key is not holding the job id (SEC-10).
    """

    code = "idempotency_conflict"

    def __init__(self, message: str, *, idempotency_key: str) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key

    def _state(self) -> dict[str, Any]:
        return {"idempotency_key": self.idempotency_key}


class InvalidJobPayload(ServekitError, ValueError):
    """A job input or result cannot be stored as JSON, or a stored one is not valid JSON
    of the job payload format (for example a row tampered to hold a pickle: JB-14)."""

    code = "invalid_job_payload"


class WebhookRefused(ServekitError, ValueError):
    """A webhook URL was refused: not http(s), no host, or it names or resolves to an
    address that is not public (loopback, private, link-local, metadata, ...: CB-05).

    Checked when the job is submitted and again on the resolved address before each
    delivery connects. To deliver to such an address on purpose (a test receiver on
    127.0.0.1, a service in your own network), allow its network explicitly with
    ``Webhooks(allow_networks=[...])``.
    """

    code = "webhook_refused"


class RetryableError(ServekitError):
    """Raise it (or a subclass) from a model to say the failure is transient: a job
    whose model raised it is re-queued with exponential backoff while it has attempts
    left, instead of failing at once. Other model errors fail the job on the spot.
    """

    code = "retryable"


class SourceError(ServekitError, ValueError):
    """A batch input cannot be read as a whole: an unknown format, a missing file, a
    missing column, a schema the run cannot use. (A single bad row is not an error of
    the run: it goes to the error output.)"""

    code = "source_error"


class OutputExists(ServekitError, FileExistsError):
    """The batch output (or its part files) already exists; nothing was written. Pass
    ``overwrite=True`` to replace it, or ``resume=True`` to finish an interrupted run."""

    code = "output_exists"


class UnsafePath(ServekitError, PermissionError):
    """A batch input or output path resolves outside the configured ``root``; refused
    before any work."""

    code = "unsafe_path"


class ResumeMismatch(ServekitError, ValueError):
    """``resume=True`` found a checkpoint written by a run with other settings (chunk
    size, key, input): resuming would mix two runs. Start over with ``overwrite=True``."""

    code = "resume_mismatch"


class BatchFailed(ServekitError):
    """A batch run stopped early because too many rows failed (``max_error_rate``).

    ``report`` is the :class:`~servekit.batch.BatchReport` at the stop. Finished chunks
    are kept: fix the cause and run again with ``resume=True``.
    """

    code = "batch_failed"

    def __init__(self, message: str, *, report: Any = None) -> None:
        super().__init__(message)
        self.report = report

    def _state(self) -> dict[str, Any]:
        return {"report": self.report}
