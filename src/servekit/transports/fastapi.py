"""create_router: servekit's routes as a FastAPI ``APIRouter`` (extra ``fastapi``).

Unlike mounting :func:`~servekit.transports.create_asgi_app`, the router's routes are
part of the host app's OpenAPI document, with each model's input and output JSON
Schema (from its signature) on its ``predict`` route. The work is still done by the
same sans-I/O :class:`~servekit.transports.Service`, so answers, limits and errors are
those of the other adapters. The host owns the predictors' lifecycle: start and close
them in its lifespan (they also start on first use).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .._predictor import Predictor
from . import _v2_errors
from ._asgi import _run
from ._core import HTTPRequest, HTTPResponse, Service, route_name
from ._openapi import ERROR_SCHEMA, model_schemas, predict_request_schema, predict_response_schema

__all__ = ["create_router"]


def create_router(
    predictors: Predictor[Any, Any] | Mapping[str, Predictor[Any, Any]],
    *,
    jobs: Any = None,
    limits: _v2_errors.Limits | None = None,
    expose_model_errors: bool = False,
    name: str = "servekit",
) -> Any:
    """An ``APIRouter`` with servekit's routes for ``predictors`` (see
    :func:`~servekit.transports.create_asgi_app` for the routes and options); include
    it with ``app.include_router(create_router(predictor), prefix="/ml")``."""
    try:
        from fastapi import APIRouter, Request
        from fastapi.responses import Response
    except ImportError:
        raise ImportError(
            'servekit.transports.fastapi needs FastAPI: pip install "servekit[fastapi]"'
        ) from None

    service = Service(
        predictors, jobs=jobs, limits=limits, expose_model_errors=expose_model_errors, name=name
    )
    router = APIRouter()

    async def handle(request: Request, path: str) -> Response:
        start = time.perf_counter()
        matched = service.match(request.method, path)
        if isinstance(matched, HTTPResponse):
            answer: HTTPResponse | None = matched
        else:
            answer = await respond(request, path, matched)
        status = 499 if answer is None else answer.status  # 499: the client went away
        elapsed = time.perf_counter() - start
        service.http.record(route_name(matched, path), request.method, status, elapsed)
        if answer is None:  # nothing to send
            return Response(status_code=499)
        return _response(answer)

    async def respond(
        request: Request, path: str, matched: tuple[str, dict[str, str]]
    ) -> HTTPResponse | None:
        limit = service.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = service.reject(
            path, 413, "payload_too_large", f"the request body is over the limit of {limit} bytes"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return too_large
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return too_large
        headers = {k.lower(): v for k, v in request.headers.items()}
        query = request.url.query
        request_ = HTTPRequest(request.method, path, headers, body, query)
        prepared = service.prepare(request_, matched)
        if isinstance(prepared, HTTPResponse):
            return prepared
        return await _run(prepared, request.receive)

    def _response(answer: HTTPResponse) -> Response:
        headers = {k: v for k, v in answer.headers if k != "content-type"}
        media = dict(answer.headers).get("content-type", "application/json")
        return Response(answer.body, answer.status, headers=headers, media_type=media)

    def add(path: str, methods: list[str], summary: str, **openapi: Any) -> None:
        async def endpoint(request: Request) -> Response:
            # The core routes on servekit's own paths, whatever prefix the host used.
            return await handle(request, path.format(**request.path_params))

        # Real classes, not the strings postponed annotations leave: FastAPI resolves
        # names in the module's globals, where these imports (kept lazy) are not.
        endpoint.__annotations__ = {"request": Request, "return": Response}
        endpoint.__name__ = "servekit"  # operation ids: servekit_<path>_<method>
        router.add_api_route(path, endpoint, methods=methods, summary=summary, **openapi)

    error = {"description": "an error", "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for key, predictor in service.predictors.items():
        input_schema, output_schema = model_schemas(predictor)
        request_schema = predict_request_schema(input_schema)
        response_schema = predict_response_schema(output_schema)
        add(
            f"/models/{key}/predict",
            ["POST"],
            f"Predict one input with {key}",
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": request_schema}},
                }
            },
            responses={
                200: {"content": {"application/json": {"schema": response_schema}}},
                422: error,
                429: error,
                503: error,
                504: error,
            },
        )
        add(f"/models/{key}/predict_many", ["POST"], f"Predict many inputs with {key}")
        add(f"/v2/models/{key}/infer", ["POST"], f"Open Inference Protocol infer ({key})")
        add(f"/v2/models/{key}", ["GET"], f"Model metadata ({key})")
        add(f"/v2/models/{key}/ready", ["GET"], f"Model readiness ({key})")
    if service.default is not None:
        add("/predict", ["POST"], "Predict one input")
        add("/predict_many", ["POST"], "Predict many inputs")
    add("/v2/health/live", ["GET"], "Liveness")
    add("/v2/health/ready", ["GET"], "Readiness")
    add("/v2", ["GET"], "Server metadata")
    add("/metrics", ["GET"], "Metrics (Prometheus text format)")
    if jobs is not None:
        add("/jobs", ["POST"], "Submit a job")
        add("/jobs/{job_id}", ["GET"], "Get a job")
        add("/jobs/{job_id}", ["DELETE"], "Cancel a job")
    return router
