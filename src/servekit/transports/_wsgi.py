"""create_wsgi_app: a PEP 3333 application over the sans-I/O core (Flask, Django, any
WSGI server). The work runs on the server's request thread with the predictor's sync
API; the body limit is checked on ``CONTENT_LENGTH`` before reading, and a body of
unknown length is read only up to the limit."""

from __future__ import annotations

import http
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._predictor import Predictor
from . import _v2
from ._core import HTTPRequest, HTTPResponse, Service, json_response

__all__ = ["WSGIApp", "create_wsgi_app"]

StartResponse = Callable[..., Any]


class WSGIApp:
    """The WSGI application :func:`create_wsgi_app` returns; ``service`` is its core."""

    def __init__(self, service: Service) -> None:
        #: The sans-I/O core (routes, limits, the error table).
        self.service = service

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The PEP 3333 entry point."""
        response = self._handle(environ)
        reason = http.HTTPStatus(response.status).phrase
        headers = [*response.headers, ("content-length", str(len(response.body)))]
        start_response(f"{response.status} {reason}", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else response.body]

    def _handle(self, environ: dict[str, Any]) -> HTTPResponse:
        service = self.service
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        matched = service.match(method, path)
        if isinstance(matched, HTTPResponse):
            return matched
        limit = service.limits.max_body_bytes
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared and not declared.isdigit():
            return _error(400, "bad_request", "content-length is not a number")
        if declared and int(declared) > limit:
            return _error(413, "payload_too_large", f"the body is over {limit} bytes")
        stream = environ["wsgi.input"]
        if declared:
            body = stream.read(int(declared))
        else:
            # Unknown length (chunked): read at most one byte past the limit.
            body = stream.read(limit + 1) if environ.get("wsgi.input_terminated") else b""
            if len(body) > limit:
                return _error(413, "payload_too_large", f"the body is over {limit} bytes")
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        request = HTTPRequest(method, path, headers, body, environ.get("QUERY_STRING", ""))
        prepared = service.prepare(request)
        if isinstance(prepared, HTTPResponse):
            return prepared
        try:
            result = prepared.run_sync()
        except Exception as exc:
            result = exc
        return prepared.finish(result)


def _error(status: int, code: str, message: str) -> HTTPResponse:
    return json_response(status, {"error": {"code": code, "message": message}})


def create_wsgi_app(
    predictors: Predictor[Any, Any] | Mapping[str, Predictor[Any, Any]],
    *,
    jobs: Any = None,
    limits: _v2.Limits | None = None,
    expose_model_errors: bool = False,
    name: str = "servekit",
) -> WSGIApp:
    """A PEP 3333 app serving ``predictors``, with the same routes and answers as
    :func:`create_asgi_app`. Predictors start on their first request; close them (and
    the job queue) when the host shuts down."""
    return WSGIApp(
        Service(
            predictors,
            jobs=jobs,
            limits=limits,
            expose_model_errors=expose_model_errors,
            name=name,
        )
    )
