"""The sans-I/O request handling every HTTP adapter shares.

An adapter (ASGI, WSGI) turns its server's request into an :class:`HTTPRequest`, asks
:meth:`Service.prepare` what to do, and gets either a finished :class:`HTTPResponse`
(health, metadata, every error found while decoding) or a :class:`Call`: the model or
job-queue work to run, which the adapter runs its own way (``run_sync`` on a WSGI
thread, ``run_async`` on the event loop, where a client disconnect can cancel it) and
hands back to :meth:`Call.finish` for the response. The core never does I/O and never
calls a model itself, so both adapters answer byte for byte alike.

Decisions:

- **One table** maps error codes to statuses (:data:`STATUS`): a request the server
  cannot parse is 400, an input that fails the model's signature 422, unknown model
  or job 404, a full queue 429 with ``Retry-After``, a deadline 504, closed or not ready
  503, a body over the limit 413, a wrong method 405 with ``Allow``. Error bodies are
  ``{"error": {"code", "message"}}``.
- **Error hygiene (SEC-08).** A model's exception reaches clients as its class name
  only (``the model raised ValueError``), unless ``expose_model_errors=True``: model
  messages can hold paths, data or secrets. Unexpected errors are 500 with a generic
  message and are logged, never echoed.
- **Batch dimension (OIP infer).** The first dimension of every input tensor is the
  batch: row ``i`` of a one-input request is item ``i`` (a scalar or an array); with
  several inputs, item ``i`` is ``{name: row i}``. Outputs are stacked back into one
  tensor (``output``), or one per key when the model returns dicts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._predictor import Predictor
from ..backends import Inline
from ..errors import Closed, JobNotFound, ModelError, Overloaded, ServekitError
from . import _v2, _v2_errors, _v2_json, _v2_tensors
from ._metrics import HTTPStatistics

__all__ = [
    "STATUS",
    "Call",
    "HTTPRequest",
    "HTTPResponse",
    "Service",
    "error_body",
    "error_response",
]

_log = logging.getLogger("servekit.transports")

#: HTTP status for each error code; anything else is 500.
STATUS: dict[str, int] = {
    "invalid_v2_request": 400,
    "bad_request": 400,
    "invalid_input": 422,
    "invalid_job_payload": 422,
    "webhook_refused": 422,
    "not_found": 404,
    "model_not_found": 404,
    "job_not_found": 404,
    "method_not_allowed": 405,
    "idempotency_conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "overloaded": 429,
    "closed": 503,
    "not_ready": 503,
    "store_unavailable": 503,
    "deadline_exceeded": 504,
    "execution_timeout": 504,
}

_JSON = [("content-type", "application/json")]


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    """A request as the core sees it: already read, header names lower-case."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    query: str = ""


@dataclass(frozen=True, slots=True)
class HTTPResponse:
    """A response for the adapter to send."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(slots=True)
class Call:
    """Work for the adapter to run, then :meth:`finish` into a response."""

    #: Runs the work on the calling thread (WSGI).
    run_sync: Callable[[], Any]
    #: Runs the work on the event loop (ASGI); cancelling it cancels the request.
    run_async: Callable[[], Awaitable[Any]]
    #: The response for the work's result (an exception is passed as the result).
    finish: Callable[[Any], HTTPResponse]
    #: Whether a client disconnect can stop the work (it waits in a queue or awaits):
    #: adapters watch for disconnects only then, which costs a task per request.
    cancellable: bool = True


def json_response(
    status: int, payload: Any, headers: list[tuple[str, str]] | None = None
) -> HTTPResponse:
    """A JSON response (NaN and infinity refused: the body must be standard JSON)."""
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return HTTPResponse(status, [*_JSON, *(headers or [])], body)


def error_body(code: str, message: str, *, v2: bool = False) -> dict[str, Any]:
    """An error body: ``{"error": {"code", "message"}}``, or on the Open Inference
    Protocol routes the spec's ``{"error": message}`` with the code beside it."""
    if v2:
        return {"error": message, "code": code}
    return {"error": {"code": code, "message": message}}


def error_response(
    error: BaseException, *, expose_model_errors: bool = False, v2: bool = False
) -> HTTPResponse:
    """The response for an error: status from :data:`STATUS`, a JSON body with the
    code and a message fit for clients (:func:`error_body`)."""
    if isinstance(error, ServekitError):
        code = error.code
        message = error.message
        if isinstance(error, ModelError) and not expose_model_errors:
            kind = error.error_type or "an error"
            message = f"the model raised {kind} for this input"
    else:
        _log.exception("unexpected error while handling a request", exc_info=error)
        code, message = "internal_error", "internal server error"
    status = STATUS.get(code, 500)
    headers = []
    if isinstance(error, Overloaded):
        headers.append(("retry-after", str(max(1, math.ceil(error.retry_after_s)))))
    return json_response(status, error_body(code, message, v2=v2), headers)


def _plain_error(
    status: int,
    code: str,
    message: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    v2: bool = False,
) -> HTTPResponse:
    return json_response(status, error_body(code, message, v2=v2), headers)


class _BadRequest(ServekitError):
    code = "bad_request"


class _NotFound(ServekitError):
    code = "not_found"


# Routes: (method set, pattern). Patterns name their groups; a path matching a pattern
# with another method gets 405 with Allow.
_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_ROUTES: list[tuple[str, tuple[str, ...], re.Pattern[str]]] = [
    ("live", ("GET",), re.compile(r"/v2/health/live")),
    ("ready", ("GET",), re.compile(r"/v2/health/ready")),
    ("server_metadata", ("GET",), re.compile(r"/v2")),
    ("model_ready", ("GET",), re.compile(_MODEL + r"/ready")),
    ("model_metadata", ("GET",), re.compile(_MODEL)),
    ("infer", ("POST",), re.compile(_MODEL + r"/infer")),
    ("predict", ("POST",), re.compile(r"(?:/models/(?P<model>[^/]+))?/predict")),
    ("predict_many", ("POST",), re.compile(r"(?:/models/(?P<model>[^/]+))?/predict_many")),
    ("jobs", ("POST", "GET"), re.compile(r"(?:/models/(?P<model>[^/]+))?/jobs")),
    ("metrics", ("GET",), re.compile(r"/metrics")),
    ("openapi", ("GET",), re.compile(r"/openapi\.json")),
    ("job", ("GET", "DELETE"), re.compile(r"(?:/models/(?P<model>[^/]+))?/jobs/(?P<job>[^/]+)")),
]


# Paths without parameters, looked up before the patterns (the common requests).
_STATIC: dict[str, tuple[str, tuple[str, ...]]] = {
    "/predict": ("predict", ("POST",)),
    "/predict_many": ("predict_many", ("POST",)),
    "/v2/health/live": ("live", ("GET", "HEAD")),
    "/v2/health/ready": ("ready", ("GET", "HEAD")),
    "/metrics": ("metrics", ("GET", "HEAD")),
}


def route_name(matched: tuple[str, dict[str, str]] | HTTPResponse, path: str) -> str:
    """The ``route`` label of a request, from :meth:`Service.match`'s answer: its route's
    name (also for a 405), or ``unmatched`` for a path no route has (never the path,
    so the label set stays small)."""
    if isinstance(matched, tuple):
        return matched[0]
    if matched.status == 405:
        trimmed = path.rstrip("/") or "/"
        for route, _, pattern in _ROUTES:
            if pattern.fullmatch(trimmed):
                return route
    return "unmatched"


class Service:
    """The routes over one predictor or a mapping of names to predictors.

    ``jobs`` (a :class:`~servekit.jobs.JobQueue`, or a mapping of model names to
    queues: one per model, under ``/models/NAME/jobs``) enables the job routes; ``limits``
    (:class:`~servekit.transports.Limits`) bounds bodies and tensors;
    ``expose_model_errors`` puts model exception messages in responses (off: only the
    exception's class name).
    """

    def __init__(
        self,
        predictors: Predictor[Any, Any] | Mapping[str, Predictor[Any, Any]],
        *,
        jobs: Any = None,
        limits: _v2_errors.Limits | None = None,
        expose_model_errors: bool = False,
        name: str = "servekit",
    ) -> None:
        if isinstance(predictors, Predictor):
            self.default: str | None = predictors.name
            self.predictors: dict[str, Predictor[Any, Any]] = {predictors.name: predictors}
        else:
            self.predictors = dict(predictors)
            self.default = next(iter(self.predictors)) if len(self.predictors) == 1 else None
            if not self.predictors:
                raise ValueError("a Service needs at least one predictor")
            for key, value in self.predictors.items():
                if not isinstance(value, Predictor):
                    raise TypeError(f"predictors[{key!r}] is not a servekit.Predictor")
        #: The job queues by model name; the key None is a queue for ``/jobs`` that is
        #: not tied to a model of the path (a single :class:`~servekit.jobs.JobQueue`).
        self.job_queues: dict[str | None, Any] = {}
        if isinstance(jobs, Mapping):
            for key in jobs:
                if key not in self.predictors:
                    raise ValueError(
                        f"jobs[{key!r}] names no model; models: {sorted(self.predictors)}"
                    )
            self.job_queues = {str(key): queue for key, queue in jobs.items()}
        elif jobs is not None:
            self.job_queues = {None: jobs}
        #: The job queue when there is exactly one, else None.
        self.jobs = next(iter(self.job_queues.values())) if len(self.job_queues) == 1 else None
        self.limits = limits or _v2_errors.Limits()
        self.expose_model_errors = expose_model_errors
        self.name = name
        #: False once shutdown began: readiness answers 503 and new work is refused.
        self.accepting = True
        #: Requests answered by the adapters, for the ``servekit_http_*`` families.
        self.http = HTTPStatistics()

    # --- routing -------------------------------------------------------------------

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]] | HTTPResponse:
        """The route for ``method path`` and its parameters, or the 404/405 response.
        Adapters call it before reading the body."""
        static = _STATIC.get(path)
        if static is not None and method in static[1]:
            return static[0], {}
        allowed: list[str] = []
        for route, methods, pattern in _ROUTES:
            found = pattern.fullmatch(path.rstrip("/") or "/")
            if found is None:
                continue
            if method in methods or (method == "HEAD" and "GET" in methods):
                params = {k: v for k, v in found.groupdict().items() if v is not None}
                return route, params
            allowed.extend(methods)
        v2 = _is_v2(path)
        if allowed:
            allow = ", ".join(sorted(set(allowed)))
            return _plain_error(
                405,
                "method_not_allowed",
                f"{method} is not allowed here; use {allow}",
                [("allow", allow)],
                v2=v2,
            )
        return _plain_error(404, "not_found", f"no route for {path!r}", v2=v2)

    def distinct_job_queues(self) -> list[Any]:
        """Every job queue once (for the adapters to start and close)."""
        return list({id(q): q for q in self.job_queues.values()}.values())

    def reject(self, path: str, status: int, code: str, message: str) -> HTTPResponse:
        """An error response the adapters build themselves (a body over the limit, a
        bad content-length), shaped for ``path``'s protocol."""
        return _plain_error(status, code, message, v2=_is_v2(path))

    def ready(self) -> bool:
        """True while accepting requests and every predictor is ready."""
        return self.accepting and all(p.ready for p in self.predictors.values())

    def _predictor(self, params: Mapping[str, str]) -> Predictor[Any, Any]:
        name = params.get("model", self.default)
        if name is None:
            raise _NotFound(
                f"name the model in the path (/models/NAME/...); models: {sorted(self.predictors)}"
            )
        predictor = self.predictors.get(name)
        if predictor is None:
            raise _NotFound(f"no model named {name!r}")
        version = params.get("version")
        if version is not None and version != (predictor.version or "1"):
            raise _NotFound(f"model {name!r} has no version {version!r}")
        return predictor

    # --- handling ------------------------------------------------------------------

    def prepare(
        self,
        request: HTTPRequest,
        matched: tuple[str, dict[str, str]] | HTTPResponse | None = None,
    ) -> HTTPResponse | Call:
        """What to do with ``request``: a response now, or a :class:`Call` to run.
        ``matched`` is :meth:`match`'s answer when the adapter has it already."""
        if matched is None:
            matched = self.match(request.method, request.path)
        if isinstance(matched, HTTPResponse):
            return matched
        route, params = matched
        try:
            return getattr(self, f"_route_{route}")(request, params)  # type: ignore[no-any-return]
        except Exception as exc:  # a ServekitError, or never a traceback to the client
            return self.error(exc, v2=_is_v2(request.path))

    def error(self, exc: BaseException, *, v2: bool = False) -> HTTPResponse:
        """The response for ``exc`` under this service's settings."""
        return error_response(exc, expose_model_errors=self.expose_model_errors, v2=v2)

    def refuse_if_full(
        self, matched: tuple[str, dict[str, str]] | HTTPResponse, path: str
    ) -> HTTPResponse | None:
        """The 429 for a ``/predict`` or OIP infer request whose model's batcher has a
        full queue, from :meth:`match`'s answer alone, or None. Adapters call it before
        reading the body: the excess of an overload is refused without reading,
        decoding or queueing anything (LD-02). :meth:`prepare` checks again."""
        if type(matched) is not tuple or matched[0] not in _QUEUED_ONE_BY_ONE:
            return None
        try:
            predictor = self._predictor(matched[1])
        except _NotFound:
            return None  # prepare answers the 404
        refused = predictor.refuse_if_full() if self.accepting else None
        return None if refused is None else self.error(refused, v2=_is_v2(path))

    def _refuse_when_closing(self) -> None:
        if not self.accepting:
            raise Closed("the server is shutting down; retry on another instance")

    def _json(self, request: HTTPRequest) -> Any:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind not in ("application/json", "application/octet-stream", ""):
            raise _BadRequest(f"send JSON (content-type application/json), not {kind!r}")
        if not request.body:
            raise _BadRequest("the request body is empty; send a JSON object")
        return _v2_json.parse_json_bounded(request.body, self.limits.max_json_depth)

    def _route_live(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        return json_response(200, {"live": True})

    def _route_ready(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        ready = self.ready()
        return json_response(200 if ready else 503, {"ready": ready})

    def _route_openapi(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        from .. import __version__
        from ._openapi import openapi_document

        document = openapi_document(
            self.predictors, title=self.name, version=__version__, jobs=bool(self.job_queues)
        )
        return json_response(200, document)

    def _route_metrics(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        from ._metrics import CONTENT_TYPE, render

        text = render(self, ready=self.ready())
        return HTTPResponse(200, [("content-type", CONTENT_TYPE)], text.encode())

    def _route_server_metadata(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        from .. import __version__

        extensions = ["binary_tensor_data"]  # the binary tensor data extension
        return json_response(200, _v2.server_metadata(self.name, __version__, extensions))

    def _route_model_ready(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        predictor = self._predictor(params)
        ready = self.accepting and predictor.ready
        return json_response(200 if ready else 503, {"name": predictor.name, "ready": ready})

    def _route_model_metadata(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        predictor = self._predictor(params)
        schema = predictor.signature.json_schema()
        return json_response(
            200,
            _v2.model_metadata(
                predictor.name,
                [predictor.version or "1"],
                "servekit",
                _tensor_specs(schema.get("input"), "input"),
                _tensor_specs(schema.get("output"), "output"),
            ),
        )

    @staticmethod
    def _cancellable(predictor: Predictor[Any, Any]) -> bool:
        # A sync model on Inline without a batcher runs on the event loop in one go:
        # there is nothing a disconnect could take back.
        return (
            predictor.batcher is not None
            or not isinstance(predictor.backend, Inline)
            or predictor.model.is_async
        )

    def _route_predict(self, request: HTTPRequest, params: dict[str, str]) -> Call:
        predictor = self._predictor(params)
        self._refuse_when_closing()
        _refuse_if_full(predictor)
        body = self._json(request)
        if not isinstance(body, dict) or "input" not in body:
            raise _BadRequest('send {"input": ...} (and optionally "timeout_s", "priority")')
        timeout_s, priority = _options(body)
        x = body["input"]  # lists stay lists: the signature converts them
        return Call(
            run_sync=lambda: predictor.predict_with_version(
                x, timeout_s=timeout_s, priority=priority
            ),
            run_async=lambda: predictor.apredict_with_version(
                x, timeout_s=timeout_s, priority=priority
            ),
            finish=lambda result: self._finish_predict(predictor, result),
            cancellable=self._cancellable(predictor),
        )

    def _finish_predict(self, predictor: Predictor[Any, Any], result: Any) -> HTTPResponse:
        if isinstance(result, BaseException):
            return self.error(result)
        output, version = result
        payload = {"model": predictor.name, "version": version, "output": _to_json(output)}
        return json_response(200, payload)

    def _route_predict_many(self, request: HTTPRequest, params: dict[str, str]) -> Call:
        predictor = self._predictor(params)
        self._refuse_when_closing()
        body = self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise _BadRequest('send {"inputs": [...]} (and optionally "timeout_s", "priority")')
        timeout_s, priority = _options(body)
        xs = list(body["inputs"])
        return Call(
            run_sync=lambda: predictor.predict_many(
                xs, timeout_s=timeout_s, priority=priority, return_exceptions=True
            ),
            run_async=lambda: predictor.apredict_many(
                xs, timeout_s=timeout_s, priority=priority, return_exceptions=True
            ),
            finish=lambda result: self._finish_many(predictor, result),
            cancellable=self._cancellable(predictor),
        )

    def _finish_many(self, predictor: Predictor[Any, Any], result: Any) -> HTTPResponse:
        if isinstance(result, BaseException):
            return self.error(result)
        outputs: list[Any] = []
        errors: list[Any] = []
        for value in result:
            if isinstance(value, BaseException):
                body = json.loads(self.error(value).body)
                outputs.append(None)
                errors.append(body["error"])
            else:
                outputs.append(_to_json(value))
                errors.append(None)
        return json_response(200, {"model": predictor.name, "outputs": outputs, "errors": errors})

    def _route_infer(self, request: HTTPRequest, params: dict[str, str]) -> Call:
        predictor = self._predictor(params)
        self._refuse_when_closing()
        _refuse_if_full(predictor)
        header = request.headers.get("inference-header-content-length")
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if header is None and kind not in ("application/json", ""):
            raise _BadRequest(f"send JSON (content-type application/json), not {kind!r}")
        if not request.body:
            raise _BadRequest("the request body is empty; send an inference request")
        infer = _v2.decode_infer_request(request.body, header_length=header, limits=self.limits)
        schema = predictor.signature.json_schema()["input"]
        items = _rows(infer, named=_is_object(schema))
        timeout_s, priority = infer.timeout_s, infer.priority or 0

        async def run_async() -> Any:
            return await predictor.apredict_many(items, timeout_s=timeout_s, priority=priority)

        return Call(
            run_sync=lambda: predictor.predict_many(items, timeout_s=timeout_s, priority=priority),
            run_async=run_async,
            finish=lambda result: self._finish_infer(predictor, infer, result),
            cancellable=self._cancellable(predictor),
        )

    def _finish_infer(
        self, predictor: Predictor[Any, Any], infer: Any, result: Any
    ) -> HTTPResponse:
        if isinstance(result, BaseException):
            return self.error(result)
        try:
            # Inputs without a batch dimension (0-d tensors) are one item, and the
            # outputs lose the batch dimension again: a scalar in, no batch axis out.
            tensors = _outputs(result, scalar=all(not t.shape for t in infer.inputs))
            wanted = [o.name for o in infer.outputs]
            if wanted:
                unknown = [n for n in wanted if n not in {t.name for t in tensors}]
                if unknown:
                    raise _BadRequest(
                        f"unknown output {unknown[0]!r}; outputs: {[t.name for t in tensors]}"
                    )
                tensors = [t for t in tensors if t.name in wanted]
            binary: set[str] | bool = {o.name for o in infer.outputs if o.binary}
            if infer.binary_output_default:
                binary = True
            body, header_length = _v2.encode_infer_response(
                model_name=predictor.name,
                model_version=predictor.version or "1",
                id=infer.id,
                outputs=tensors,
                binary=binary,
            )
        except Exception as exc:  # an output that is no tensor: an error body, not a crash
            return self.error(exc, v2=True)
        headers = list(_JSON)
        if header_length is not None:
            headers = [
                ("content-type", "application/octet-stream"),
                ("inference-header-content-length", str(header_length)),
            ]
        return HTTPResponse(200, headers, body)

    # --- jobs ----------------------------------------------------------------------

    def _queue(self, model: str | None) -> tuple[str | None, Any]:
        """The (key, queue) for a job route's model (None: the path names none)."""
        if not self.job_queues:
            raise _NotFound("this server has no job queue")
        if model is None:
            if len(self.job_queues) == 1:
                return next(iter(self.job_queues.items()))
            raise _NotFound(
                "name the model in the path (/models/NAME/jobs); models with jobs: "
                f"{sorted(k for k in self.job_queues if k is not None)}"
            )
        if model in self.job_queues:
            return model, self.job_queues[model]
        shared = self.job_queues.get(None)
        if shared is not None and getattr(shared.predictor, "name", None) == model:
            return None, shared
        if model not in self.predictors:
            raise _NotFound(f"no model named {model!r}")
        raise _NotFound(f"model {model!r} has no job queue")

    def _route_jobs(self, request: HTTPRequest, params: dict[str, str]) -> Call | HTTPResponse:
        model, queue = self._queue(params.get("model"))
        if request.method == "GET":
            raise _NotFound("jobs are not listed over HTTP; keep the ids you were given")
        self._refuse_when_closing()
        body = self._json(request)
        if not isinstance(body, dict) or "input" not in body:
            raise _BadRequest('send {"input": ...} (and optionally "webhook", "timeout_s")')
        webhook = body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            raise _BadRequest("webhook must be a URL string")
        key = request.headers.get("idempotency-key") or body.get("idempotency_key")
        timeout_s, _ = _options(body)
        x = body["input"]

        def submit() -> Any:
            return queue.submit(x, webhook=webhook, idempotency_key=key, timeout_s=timeout_s)

        async def asubmit() -> Any:
            return await queue.asubmit(x, webhook=webhook, idempotency_key=key, timeout_s=timeout_s)

        return Call(
            run_sync=submit,
            run_async=asubmit,
            finish=lambda result: self._finish_submitted(model, result),
        )

    def _finish_submitted(self, model: str | None, result: Any) -> HTTPResponse:
        if isinstance(result, BaseException):
            return self.error(result)
        from ..jobs import job_dict

        location = f"/jobs/{result.id}" if model is None else f"/models/{model}/jobs/{result.id}"
        return json_response(202, _to_json(job_dict(result)), [("location", location)])

    def _route_job(self, request: HTTPRequest, params: dict[str, str]) -> Call:
        job_id = params["job"]
        if "model" in params:
            queues = [self._queue(params["model"])[1]]
        elif self.job_queues:  # job ids are unique across queues: look in each in turn
            queues = self.distinct_job_queues()
        else:
            raise _NotFound("this server has no job queue")
        method = "cancel" if request.method == "DELETE" else "get"

        def run_sync() -> Any:
            for queue in queues[:-1]:
                try:
                    return getattr(queue, method)(job_id)
                except JobNotFound:
                    continue
            return getattr(queues[-1], method)(job_id)

        async def run_async() -> Any:
            for queue in queues[:-1]:
                try:
                    return await getattr(queue, "a" + method)(job_id)
                except JobNotFound:
                    continue
            return await getattr(queues[-1], "a" + method)(job_id)

        return Call(run_sync=run_sync, run_async=run_async, finish=self._finish_job)

    def _finish_job(self, result: Any) -> HTTPResponse:
        if isinstance(result, BaseException):
            if isinstance(result, JobNotFound):
                return _plain_error(404, "job_not_found", "no such job")  # SEC-10
            return self.error(result)
        from ..jobs import job_dict

        return json_response(200, _to_json(job_dict(result)))


# Routes whose request is refused whole (429) when the queue is full: predict_many
# answers 200 with an error per item that found no room, and stays so.
_QUEUED_ONE_BY_ONE = frozenset({"predict", "infer"})


def _refuse_if_full(predictor: Predictor[Any, Any]) -> None:
    refused = predictor.refuse_if_full()
    if refused is not None:
        raise refused


def _is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _options(body: dict[str, Any]) -> tuple[float | None, int]:
    timeout_s = body.get("timeout_s")
    if timeout_s is not None and (
        isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0
    ):
        raise _BadRequest("timeout_s must be a number of seconds > 0")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise _BadRequest("priority must be an integer")
    try:
        return (None if timeout_s is None else float(timeout_s)), priority
    except OverflowError:  # an integer past a float's range (found by TR-12's fuzz)
        raise _BadRequest("timeout_s is too large for a number of seconds") from None


def _to_json(value: Any) -> Any:
    """A model output made JSON-ready: numpy arrays and scalars to lists and numbers,
    pydantic models to dicts; NaN and infinity to None (JSON has neither)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return _to_json(value.astype(object).tolist())
        return value.tolist()
    if isinstance(value, np.generic):
        return _to_json(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if hasattr(value, "model_dump"):
        return _to_json(value.model_dump(mode="json"))
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _is_object(schema: Any) -> bool:
    """True if a model's input schema is an object with named fields (a pydantic model,
    a TypedDict, a dataclass), whose items must be dicts even with one tensor."""
    if not isinstance(schema, dict):
        return False
    if "$ref" in schema and isinstance(schema.get("$defs"), dict):
        schema = schema["$defs"].get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
    return schema.get("type") == "object" and bool(schema.get("properties"))


def _rows(infer: Any, *, named: bool = False) -> list[Any]:
    """The items of an infer request: the first dimension of every input is the batch.
    One tensor gives its rows as they are, unless the model takes named fields
    (``named``): then, as with several tensors, each item is ``{name: row}``."""
    tensors = infer.inputs
    sizes = {t.shape[0] if t.shape else 1 for t in tensors}
    if len(sizes) != 1:
        raise _v2_errors.V2Error(
            "every input must have the same first (batch) dimension; got "
            + ", ".join(f"{t.name}: {list(t.shape)}" for t in tensors)
        )
    (n,) = sizes
    if n == 0:
        # No item, so the model never runs and nothing says what its outputs would be
        # (their datatype, their other dimensions): refused rather than guessed.
        raise _v2_errors.V2Error(
            "the batch (first) dimension of the inputs is 0: send at least one item"
        )
    if len(tensors) == 1 and not named:
        data = tensors[0].data
        return [data[i] for i in range(n)] if data.ndim else [data.item()]
    return [
        {t.name: t.data[i] if t.data.ndim else t.data.item() for t in tensors} for i in range(n)
    ]


def _outputs(values: list[Any], *, scalar: bool = False) -> list[Any]:
    """Output tensors from a list of per-item outputs (pydantic models count as dicts);
    with ``scalar``, the one item's outputs without a batch dimension."""
    values = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in values]

    def tensor(name: str, items: list[Any]) -> Any:
        array = _stack(items)
        if scalar and len(array) == 1:
            array = array.reshape(array.shape[1:])
        return _v2_tensors.tensor_from_array(name, array)

    if values and all(isinstance(v, dict) for v in values):
        names = list(dict.fromkeys(k for v in values for k in v))
        return [tensor(str(n), [v.get(n) for v in values]) for n in names]
    return [tensor("output", values)]


def _stack(values: list[Any]) -> np.ndarray[Any, Any]:
    if values and all(isinstance(v, str | bytes) for v in values):
        return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)
    try:
        return np.asarray(values)
    except ValueError as exc:
        raise ModelError(
            f"the model's outputs cannot form one tensor ({exc}); return one shape per item",
            error_type="ValueError",
        ) from exc


def _tensor_specs(schema: Any, default: str) -> list[dict[str, Any]]:
    """Tensor metadata from a signature's JSON Schema (best effort: shape -1 where
    unknown)."""
    if not isinstance(schema, dict):
        return [{"name": default, "datatype": "BYTES", "shape": [-1]}]
    dtype = schema.get("x-dtype")
    if dtype is not None:
        shape = [-1, *[(-1 if d is None else d) for d in schema.get("x-shape", [])]]
        try:
            datatype = _v2_tensors.datatype_of(np.empty(0, dtype=dtype))
        except (TypeError, ServekitError):
            datatype = "BYTES"
        return [{"name": default, "datatype": datatype, "shape": shape}]
    kinds = {"number": "FP64", "integer": "INT64", "boolean": "BOOL", "string": "BYTES"}
    if schema.get("type") in kinds:
        return [{"name": default, "datatype": kinds[schema["type"]], "shape": [-1]}]
    if schema.get("type") == "array":  # nested lists of numbers: one more variable dim
        inner = _tensor_specs(schema.get("items"), default)[0]
        return [{**inner, "shape": [-1, *inner["shape"]]}]
    properties = schema.get("properties")
    if isinstance(properties, dict) and properties:
        return [
            _tensor_specs(sub, str(name))[0]
            if isinstance(sub, dict)
            else {"name": str(name), "datatype": "BYTES", "shape": [-1]}
            for name, sub in properties.items()
        ]
    return [{"name": default, "datatype": "BYTES", "shape": [-1]}]
