"""The FastAPI router: servekit's routes inside a host app, with typed OpenAPI."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import BaseModel

import servekit as sk

fastapi = pytest.importorskip("fastapi")

from servekit.jobs import JobQueue, MemoryJobStore  # noqa: E402
from servekit.transports.fastapi import create_router  # noqa: E402


class Review(BaseModel):
    text: str


class Score(BaseModel):
    label: str
    score: float


@sk.model
def sentiment(batch: list[Review]) -> list[Score]:
    return [Score(label="positive" if "good" in r.text else "neutral", score=0.5) for r in batch]


@pytest.mark.anyio
async def test_router_serves_under_a_prefix_with_typed_openapi() -> None:
    predictor = sk.Predictor(sentiment, name="sentiment")
    jobs = JobQueue(predictor, store=MemoryJobStore())
    app = fastapi.FastAPI()

    @app.get("/hello")
    def hello() -> dict[str, Any]:
        return {"host": "app"}

    app.include_router(create_router(predictor, jobs=jobs), prefix="/ml")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            assert (await client.get("/hello")).json() == {"host": "app"}
            answer = await client.post("/ml/predict", json={"input": {"text": "good stuff"}})
            assert answer.status_code == 200
            assert answer.json()["output"] == {"label": "positive", "score": 0.5}
            named = await client.post("/ml/models/sentiment/predict", json={"input": {"text": "x"}})
            assert named.json()["output"]["label"] == "neutral"
            invalid = await client.post("/ml/predict", json={"input": {"txt": 1}})
            assert invalid.status_code == 422
            assert invalid.json()["error"]["code"] == "invalid_input"
            assert (await client.get("/ml/v2/health/live")).json() == {"live": True}
            submitted = await client.post("/ml/jobs", json={"input": {"text": "good"}})
            assert submitted.status_code == 202
            job = await client.get(f"/ml/jobs/{submitted.json()['id']}")
            assert job.status_code == 200
            schema = (await client.get("/openapi.json")).json()
        route = schema["paths"]["/ml/models/sentiment/predict"]["post"]
        body = route["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["input"]["properties"]["text"]["type"] == "string"
        out = route["responses"]["200"]["content"]["application/json"]["schema"]
        assert set(out["properties"]["output"]["properties"]) == {"label", "score"}
        assert "429" in route["responses"]
        assert "$defs" not in str(body)
    finally:
        await jobs.aclose()
        await predictor.aclose()


@pytest.mark.anyio
async def test_router_refuses_a_body_over_the_limit() -> None:
    from servekit.transports import Limits

    predictor = sk.Predictor(sentiment, name="sentiment")
    app = fastapi.FastAPI()
    app.include_router(create_router(predictor, limits=Limits(max_body_bytes=100)))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            big = await client.post("/predict", json={"input": {"text": "x" * 500}})
            assert big.status_code == 413
            assert big.json()["error"]["code"] == "payload_too_large"
    finally:
        await predictor.aclose()
