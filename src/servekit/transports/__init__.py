"""servekit.transports: HTTP adapters over one sans-I/O core.

:func:`create_asgi_app` (any ASGI server, mountable in FastAPI or Starlette) and
:func:`create_wsgi_app` (Flask, Django, any WSGI server) serve the same routes with the
same answers: the Open Inference Protocol V2 REST API under ``/v2``, native JSON
``/predict`` and ``/predict_many``, and job routes when given a job queue. The core
(:class:`Service`) decodes requests and maps errors to statuses (:data:`STATUS`); it
does no I/O, so the adapters stay thin.
"""

from __future__ import annotations

from ._asgi import ASGIApp, create_asgi_app
from ._core import STATUS, Call, HTTPRequest, HTTPResponse, Service, error_response
from ._v2_errors import Limits, V2Error
from ._wsgi import WSGIApp, create_wsgi_app

__all__ = [
    "STATUS",
    "ASGIApp",
    "Call",
    "HTTPRequest",
    "HTTPResponse",
    "Limits",
    "Service",
    "V2Error",
    "WSGIApp",
    "create_asgi_app",
    "create_wsgi_app",
    "error_response",
]
