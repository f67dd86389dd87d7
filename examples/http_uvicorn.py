"""Two models behind plain uvicorn: servekit's ASGI app with no framework around it.

With several predictors, each model has its routes under ``/models/NAME/`` (native
JSON) and ``/v2/models/NAME/`` (Open Inference Protocol V2); ``/metrics`` covers them
all. The app's lifespan starts the predictors when the server starts and drains and
closes them when it stops.

Serve it for real, from the repository root::

    uvicorn examples.http_uvicorn:app --port 8000

then, in another terminal::

    curl -s localhost:8000/models/double/predict -H 'content-type: application/json' \\
         -d '{"input": 21}'

Running this file starts the app on a free port of 127.0.0.1 in a background thread,
sends it a few requests with the standard library's HTTP client, prints the answers,
and stops the server.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

import uvicorn

import servekit as sk
from servekit.transports import create_asgi_app


def double(batch: list[float]) -> list[float]:
    """The first model: twice each input."""
    return [2 * x for x in batch]


def square(batch: list[float]) -> list[float]:
    """The second model: each input squared."""
    return [x * x for x in batch]


predictors = {
    "double": sk.Predictor(double),
    "square": sk.Predictor(square, batcher=sk.Batcher(max_batch_size=16)),
}
app = create_asgi_app(predictors)


def call(url: str, body: Any = None) -> Any:
    """GET ``url``, or POST ``body`` as JSON; the decoded JSON answer (or the text)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method="GET" if body is None else "POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
        if response.headers.get_content_type() == "application/json":
            return json.loads(text)
        return text


def main() -> None:
    """Start uvicorn on a free port, call both models, stop, and show the drained state."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    print(f"serving on {base}")
    print("states while serving:", {name: p.state.value for name, p in predictors.items()})
    try:
        print("double/predict ->", call(f"{base}/models/double/predict", {"input": 21}))
        answer = call(f"{base}/models/square/predict_many", {"inputs": [1, 2, 3, 4]})
        print("square/predict_many ->", answer)
        infer = {"inputs": [{"name": "input", "shape": [3], "datatype": "FP64", "data": [5, 6, 7]}]}
        print("v2 square/infer ->", call(f"{base}/v2/models/square/infer", infer))
        print("v2 health/ready ->", call(f"{base}/v2/health/ready"))
        metrics = call(f"{base}/metrics").splitlines()
        print(f"/metrics ({len(metrics)} lines), the first few:")
        for line in metrics[:6]:
            print("   ", line)
    finally:
        server.should_exit = True
        thread.join(10)
    print("states after shutdown:", {name: p.state.value for name, p in predictors.items()})


if __name__ == "__main__":
    main()
