"""Job records and the JSON codec for job inputs and results (errors: servekit.errors).

Nothing here touches storage: these are the values both stores hand out and the rules
for turning a job's input and result into text and back.

Payload format (JB-14): inputs and results are stored as JSON text, never pickle. Loading
a pickle runs code, and a job store is a file other processes (and people) can write, so
a row that does not decode as this JSON format is refused with :class:`InvalidJobPayload`
instead of being interpreted. numpy arrays are stored as::

    {"__ndarray__": {"dtype": "<f4", "shape": [2, 3], "data": "<base64 of C-order bytes>"}}

Object arrays are refused (their elements could only be stored as pickles). numpy scalars
become Python numbers, tuples become lists, and mapping keys must be strings. NaN and
infinity are refused outside arrays, so the text stays standard JSON any transport can
return as is.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IdempotencyConflict, InvalidJobPayload, JobNotFound, StoreUnavailable

__all__ = [
    "CallbackState",
    "IdempotencyConflict",
    "InvalidJobPayload",
    "Job",
    "JobNotFound",
    "JobStatus",
    "StoreUnavailable",
    "decode_payload",
    "encode_payload",
    "job_dict",
]

# The single key of the object that stands for a numpy array in stored JSON.
_NDARRAY_KEY = "__ndarray__"


class JobStatus(str, enum.Enum):
    """Where a job is in its life: ``queued → running → succeeded | failed | cancelled``,
    or ``expired`` when it waited longer than its queue TTL.

    >>> JobStatus.SUCCEEDED.terminal
    True
    """

    #: Stored, waiting for a worker (new, or re-queued for a retry or after a lost worker).
    QUEUED = "queued"
    #: Claimed by a worker that holds a lease on it.
    RUNNING = "running"
    #: Finished with a result.
    SUCCEEDED = "succeeded"
    #: Finished with an error after its last attempt (or its worker was lost too often).
    FAILED = "failed"
    #: Cancelled before it finished.
    CANCELLED = "cancelled"
    #: Not claimed before its queue TTL passed; never ran.
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        """True for the states a job never leaves (everything but queued and running)."""
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class CallbackState(str, enum.Enum):
    """Where the webhook of a finished job is in its delivery (None on a job without a
    webhook, or one not finished yet).

    >>> CallbackState.DELIVERED.value
    'delivered'
    """

    #: The job finished; the webhook is to be sent (again, after a failed attempt).
    PENDING = "pending"
    #: The receiver answered 2xx.
    DELIVERED = "delivered"
    #: Every attempt failed, or the receiver refused it for good; the job's outcome is
    #: still there to poll.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job, as the store held it when it was read.

    Times are float seconds since the epoch (``time.time()``). Invariants every store
    keeps (JB-06): a terminal status never changes; ``attempts`` never decreases;
    ``result`` is not None only when ``status`` is succeeded; and
    ``finished_at >= started_at >= created_at`` wherever they are set.
    """

    #: Unguessable id (128 random bits, URL-safe): holding it is the capability to read
    #: the job (SEC-10).
    id: str
    #: Current state.
    status: JobStatus
    #: The submitted input (a JSON value, numpy arrays allowed).
    input: Any
    #: The result; not None only when ``status`` is succeeded.
    result: Any
    #: The last error, ``{"code": ..., "message": ...}``; kept on a re-queued job so the
    #: reason for the retry stays visible.
    error: dict[str, str] | None
    #: Attempts so far: claims by a worker (the current or last attempt's number); a
    #: claim handed back unstarted (:meth:`JobStore.release`) is counted once, by the
    #: claim that follows it.
    attempts: int
    #: Claims allowed before the job finally fails.
    max_attempts: int
    #: When the job was submitted.
    created_at: float
    #: When the current (or last) attempt started; None before the first claim.
    started_at: float | None
    #: When the job reached a terminal status; None before.
    finished_at: float | None
    #: When the running worker's lease runs out unless it heartbeats; None unless running.
    lease_expires_at: float | None
    #: Progress the worker reported, 0.0 to 1.0; None if it reported none.
    progress: float | None
    #: The caller's idempotency key, if it gave one.
    idempotency_key: str | None
    #: Hex sha256 of the input's canonical JSON (compared on idempotent resubmits).
    payload_hash: str
    #: The worker holding the lease; None unless running.
    worker_id: str | None = None
    #: ``cancel()`` was called while the job was running; the next ``complete``/``fail``
    #: (or the loss of its worker) makes it cancelled.
    cancel_requested: bool = False
    #: Not claimed before this time (set by a retry's backoff).
    available_at: float = 0.0
    #: A queued job still unclaimed at this time expires; None = no queue TTL.
    expires_at: float | None = None
    #: Seconds one attempt may run before it fails with ``timeout``; None = no limit.
    timeout_s: float | None = None
    #: The URL the job's outcome is posted to when it finishes; None = no webhook.
    webhook_url: str | None = None
    #: Delivery of the webhook; None until a job with a webhook finishes.
    callback_state: CallbackState | None = None
    #: Delivery attempts made so far.
    callback_attempts: int = 0
    #: When the next delivery attempt is due (while pending).
    callback_next_at: float | None = None
    #: Why the last delivery attempt failed, if it did.
    callback_error: str | None = None
    #: The last claim was handed back unstarted; the next claim reuses its attempt.
    handed_back: bool = False


def _default(value: object) -> object:
    # json.dumps calls this only for values it cannot encode itself.
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise InvalidJobPayload(
                "numpy arrays of dtype object cannot be stored (only as pickles, which job "
                "stores refuse); convert them to lists or a numeric dtype"
            )
        array = np.ascontiguousarray(value)
        return {
            _NDARRAY_KEY: {
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "data": base64.b64encode(array.tobytes()).decode("ascii"),
            }
        }
    if isinstance(value, np.generic):
        return value.item()
    raise InvalidJobPayload(
        f"a job input or result holds a {type(value).__name__}, which is not JSON; "
        "use dicts, lists, strings, numbers, booleans, None and numpy arrays"
    )


def _check_keys(value: object) -> None:
    # json.dumps would silently turn 1, 1.5, True and None keys into strings, so the
    # value read back would differ from the one stored; refuse them instead.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidJobPayload(
                    f"job inputs and results need string mapping keys, got {key!r}"
                )
            _check_keys(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_keys(item)


def encode_payload(value: object) -> str:
    """Encode a job input or result as canonical JSON text (sorted keys, no spaces).

    The same value always gives the same text, so its sha256 identifies the payload.

    >>> encode_payload({"b": 1, "a": [1.5, None]})
    '{"a":[1.5,null],"b":1}'
    """
    try:
        _check_keys(value)
        return json.dumps(
            value, default=_default, sort_keys=True, separators=(",", ":"), allow_nan=False
        )
    except InvalidJobPayload:
        raise
    except (TypeError, ValueError, RecursionError) as exc:
        # ValueError: NaN or infinity, or a circular reference.
        raise InvalidJobPayload(f"a job input or result cannot be stored as JSON: {exc}") from exc


def payload_hash(text: str) -> str:
    """Hex sha256 of an encoded payload (see :func:`encode_payload`)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _decode_object(obj: dict[str, Any]) -> Any:
    spec = obj.get(_NDARRAY_KEY)
    if spec is None or len(obj) != 1:
        return obj
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise InvalidJobPayload("a stored array must have exactly dtype, shape and data")
    dtype_str, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if not isinstance(dtype_str, str) or not isinstance(data, str):
        raise InvalidJobPayload("a stored array's dtype and data must be strings")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise InvalidJobPayload("a stored array's shape must be a list of sizes")
    try:
        dtype = np.dtype(dtype_str)
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (TypeError, ValueError) as exc:
        raise InvalidJobPayload(f"a stored array is malformed: {exc}") from exc
    # An object dtype would make numpy unpickle elements; refuse it before reading data.
    if dtype.hasobject:
        raise InvalidJobPayload("a stored array has dtype object, which would need pickle")
    count = 1
    for n in shape:
        count *= n
    if count * dtype.itemsize != len(raw):
        raise InvalidJobPayload("a stored array's data does not match its dtype and shape")
    # frombuffer gives a read-only view of ``raw``; copy so callers get a normal array.
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()


def _refuse_constant(name: str) -> Any:
    raise InvalidJobPayload(f"stored JSON holds {name}, which job payloads never contain")


def decode_payload(text: object) -> Any:
    """Decode text written by :func:`encode_payload`; refuse anything else.

    Raises :class:`InvalidJobPayload` for bytes (such as a pickle), text that is not
    JSON, or a malformed array object; nothing in a stored payload is ever unpickled.

    >>> decode_payload('{"a":[1.5,null],"b":1}')
    {'a': [1.5, None], 'b': 1}
    """
    if not isinstance(text, str):
        raise InvalidJobPayload(
            f"a stored job payload is {type(text).__name__}, not JSON text; the row was "
            "written by something other than servekit (pickles are never loaded)"
        )
    try:
        return json.loads(text, object_hook=_decode_object, parse_constant=_refuse_constant)
    except InvalidJobPayload:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidJobPayload(f"a stored job payload is not valid JSON: {exc}") from exc


def job_dict(job: Job) -> dict[str, Any]:
    """The public fields of a job as a JSON-ready dict (numpy arrays left as arrays;
    :func:`encode_payload` encodes them)."""
    return {
        "id": job.id,
        "status": job.status.value,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "progress": job.progress,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
