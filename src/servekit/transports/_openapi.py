"""OpenAPI pieces built from model signatures, shared by ``GET /openapi.json`` and the
FastAPI router: self-contained JSON Schemas (local ``$defs`` inlined, since refs in an
OpenAPI document point to ``#/components``), the native request and response shapes,
and the error body."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._predictor import Predictor

__all__ = [
    "ERROR_SCHEMA",
    "model_schemas",
    "openapi_document",
    "predict_request_schema",
    "predict_response_schema",
]


def _inline(schema: Any, defs: Mapping[str, Any], depth: int = 0) -> Any:
    """``schema`` with local ``$ref``s to ``$defs`` replaced by their definitions, so it
    can sit inside an OpenAPI document (whose refs point elsewhere)."""
    if depth > 32:
        return {}  # a recursive model: stop expanding, accept anything below
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = defs.get(ref.removeprefix("#/$defs/"), {})
            return _inline(target, defs, depth + 1)
        return {k: _inline(v, defs, depth + 1) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs, depth + 1) for v in schema]
    return schema


def model_schemas(predictor: Predictor[Any, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON Schemas of one input and one output of ``predictor``, self-contained."""
    both = predictor.signature.json_schema()
    out = []
    for side in ("input", "output"):
        schema = both[side]
        out.append(_inline(schema, schema.get("$defs", {})) if isinstance(schema, dict) else {})
    return out[0], out[1]


def predict_request_schema(input_schema: dict[str, Any]) -> dict[str, Any]:
    """The body of ``POST .../predict`` for a model whose input is ``input_schema``."""
    return {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": input_schema,
            "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "priority": {"type": "integer"},
        },
    }


def predict_response_schema(output_schema: dict[str, Any]) -> dict[str, Any]:
    """The answer of ``POST .../predict`` for a model whose output is ``output_schema``."""
    return {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "version": {"type": ["string", "null"]},
            "output": output_schema,
        },
    }


def openapi_document(
    predictors: Mapping[str, Predictor[Any, Any]], *, title: str, version: str, jobs: bool
) -> dict[str, Any]:
    """An OpenAPI 3.1 document of the native routes, with each model's schemas, plus the
    health and metrics routes (the Open Inference Protocol routes follow its own spec)."""
    error = {"description": "an error", "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    paths: dict[str, Any] = {}
    for name, predictor in predictors.items():
        input_schema, output_schema = model_schemas(predictor)
        paths[f"/models/{name}/predict"] = {
            "post": {
                "summary": f"Predict one input with {name}",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": predict_request_schema(input_schema)}
                    },
                },
                "responses": {
                    "200": {
                        "description": "the output",
                        "content": {
                            "application/json": {"schema": predict_response_schema(output_schema)}
                        },
                    },
                    **dict.fromkeys(("400", "404", "422", "429", "500", "503", "504"), error),
                },
            }
        }
    for path, summary in (("/v2/health/live", "Liveness"), ("/v2/health/ready", "Readiness")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "ok"}}}}
    paths["/metrics"] = {
        "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}
    }
    if jobs:
        paths["/jobs"] = {
            "post": {"summary": "Submit a job", "responses": {"202": {"description": "queued"}}}
        }
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths}


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
