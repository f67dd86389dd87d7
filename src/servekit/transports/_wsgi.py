"""create_wsgi_app: a PEP 3333 application over the sans-I/O core (Flask, Django, any
WSGI server). The work runs on the server's request thread with the predictor's sync
API; the body limit is checked on ``CONTENT_LENGTH`` before reading, and a body of
unknown length is read only up to the limit."""

from __future__ import annotations

import http
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._predictor import Predictor
from . import _v2_errors
from ._core import HTTPRequest, HTTPResponse, Service, route_name

__all__ = ["WSGIApp", "create_wsgi_app"]

StartResponse = Callable[..., Any]


class WSGIApp:
    """The WSGI application :func:`create_wsgi_app` returns; ``service`` is its core."""

    def __init__(self, service: Service) -> None:
        #: The sans-I/O core (routes, limits, the error table).
        self.service = service

    def start(self) -> None:
        """Start every predictor (and the job queue) now, so readiness is true before
        the first request: call it when the host process starts."""
        for predictor in self.service.predictors.values():
            predictor.start()
        for queue in self.service.distinct_job_queues():
            queue.start()
        self.service.accepting = True

    def close(self, grace_s: float = 30.0) -> None:
        """Turn readiness off, refuse new work, then drain and close the predictors and
        the job queue: call it from the host's shutdown hook."""
        self.service.accepting = False
        for queue in self.service.distinct_job_queues():
            queue.close(grace_s)
        for predictor in self.service.predictors.values():
            predictor.close(grace_s)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The PEP 3333 entry point."""
        start = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        matched = self.service.match(method, path)
        if isinstance(matched, HTTPResponse):
            response = matched
        else:
            response = self._handle(environ, method, path, matched)
        elapsed = time.perf_counter() - start
        counts = self.service.http
        counts.record_locked(route_name(matched, path), method, response.status, elapsed)
        reason = http.HTTPStatus(response.status).phrase
        headers = [*response.headers, ("content-length", str(len(response.body)))]
        start_response(f"{response.status} {reason}", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else response.body]

    def _handle(
        self, environ: dict[str, Any], method: str, path: str, matched: tuple[str, dict[str, str]]
    ) -> HTTPResponse:
        service = self.service
        limit = service.limits.max_body_bytes
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared and not declared.isdigit():
            return service.reject(path, 400, "bad_request", "content-length is not a number")
        too_large = f"the request body is over the limit of {limit} bytes"
        if declared and int(declared) > limit:
            return service.reject(path, 413, "payload_too_large", too_large)
        stream = environ["wsgi.input"]
        if declared:
            body = stream.read(int(declared))
        else:
            # Unknown length (chunked): read at most one byte past the limit.
            body = stream.read(limit + 1) if environ.get("wsgi.input_terminated") else b""
            if len(body) > limit:
                return service.reject(path, 413, "payload_too_large", too_large)
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        request = HTTPRequest(method, path, headers, body, environ.get("QUERY_STRING", ""))
        prepared = service.prepare(request, matched)
        if isinstance(prepared, HTTPResponse):
            return prepared
        try:
            result = prepared.run_sync()
        except Exception as exc:
            result = exc
        return prepared.finish(result)


def create_wsgi_app(
    predictors: Predictor[Any, Any] | Mapping[str, Predictor[Any, Any]],
    *,
    jobs: Any = None,
    limits: _v2_errors.Limits | None = None,
    expose_model_errors: bool = False,
    name: str = "servekit",
) -> WSGIApp:
    """A PEP 3333 app serving ``predictors``, with the same routes and answers as
    :func:`create_asgi_app`. Predictors start on their first request, or with
    :meth:`WSGIApp.start` (do that at start-up, so readiness probes pass on an idle
    process); :meth:`WSGIApp.close` drains them at shutdown."""
    return WSGIApp(
        Service(
            predictors,
            jobs=jobs,
            limits=limits,
            expose_model_errors=expose_model_errors,
            name=name,
        )
    )
