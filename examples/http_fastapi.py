"""servekit inside a FastAPI app: as a typed router, or as a mounted ASGI sub-app.

The host app has its own route (``/``) and serves one model two ways:

- ``app.include_router(create_router(predictor), prefix="/ml")``: servekit's routes
  become FastAPI routes, so ``/openapi.json`` (and ``/docs``) shows the model's input
  and output JSON Schema on ``POST /ml/models/NAME/predict``;
- ``app.mount("/raw", create_asgi_app(predictor, lifespan=False))``: the plain ASGI app,
  the same routes and answers, but invisible to FastAPI's OpenAPI document.

The host's lifespan starts the predictor and closes it. Serve it for real, from the
repository root (needs ``pip install "servekit[fastapi]" uvicorn``)::

    uvicorn examples.http_fastapi:app --port 8000

then, in another terminal::

    curl -s localhost:8000/ml/predict -H 'content-type: application/json' \\
         -d '{"input": {"height_m": 1.8, "weight_kg": 72}}'

Running this file calls the app in-process with httpx (no socket, no port) and prints
a few answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

import servekit as sk
from servekit.transports import create_asgi_app
from servekit.transports.fastapi import create_router


class Person(BaseModel):
    """One input: a height and a weight."""

    height_m: float
    weight_kg: float


@sk.model
def bmi(batch: list[Person]) -> list[float]:
    """The model: body-mass index, one output per input."""
    return [round(p.weight_kg / p.height_m**2, 1) for p in batch]


predictor = sk.Predictor(bmi)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the predictor before the first request; drain and close it at shutdown.

    The host owns the predictor's lifecycle in both set-ups: the router has no
    lifespan of its own, and Starlette does not run the lifespan of mounted sub-apps,
    which is why the mounted app below is created with ``lifespan=False``.
    """
    await predictor.astart()
    try:
        yield
    finally:
        await predictor.aclose()


app = FastAPI(title="health service", lifespan=lifespan)


@app.get("/")
async def index() -> dict[str, str]:
    """The host's own route."""
    return {"service": "health", "model": "POST /ml/predict"}


# Typed: part of the OpenAPI document, routed by FastAPI.
app.include_router(create_router(predictor), prefix="/ml")
# The alternative: the pure ASGI app, mounted as it is.
app.mount("/raw", create_asgi_app(predictor, lifespan=False))


async def demo() -> None:
    """Call the app in-process, inside its lifespan, and print the answers."""
    # httpx's ASGITransport does not send lifespan events, so enter the lifespan
    # ourselves; a real server (uvicorn) does this on start-up and shutdown.
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/")
            print("GET / ->", response.json())

            body = {"input": {"height_m": 1.8, "weight_kg": 72}}
            response = await client.post("/ml/predict", json=body)
            print("POST /ml/predict ->", response.status_code, response.json())

            response = await client.post("/raw/predict", json=body)
            print("POST /raw/predict ->", response.status_code, response.json())

            # OIP V2: one tensor per field; the first dimension is the batch.
            infer = {
                "inputs": [
                    {"name": "height_m", "shape": [2], "datatype": "FP64", "data": [1.8, 1.6]},
                    {"name": "weight_kg", "shape": [2], "datatype": "FP64", "data": [72, 64]},
                ]
            }
            path = f"/ml/v2/models/{predictor.name}/infer"
            response = await client.post(path, json=infer)
            print(f"POST {path} ->", response.status_code, response.json())

            response = await client.post("/ml/predict", json={"input": {"height_m": "tall"}})
            print("POST /ml/predict (bad input) ->", response.status_code, response.json())

            spec = (await client.get("/openapi.json")).json()
            operation = spec["paths"][f"/ml/models/{predictor.name}/predict"]["post"]
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            print("request schema from /openapi.json:")
            print(json.dumps(schema, indent=2))
            print("documented paths:", sorted(p for p in spec["paths"] if "predict" in p))
    print("predictor after the lifespan:", predictor.state.value)


def main() -> None:
    """Run the demo."""
    asyncio.run(demo())


if __name__ == "__main__":
    main()
