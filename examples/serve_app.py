"""The bundled example model for ``servekit serve``, and a self-contained demo of it.

Serve it (the README's main command), from the repository root::

    servekit serve examples.serve_app:predictor

then, in another terminal::

    curl -s localhost:8000/predict -H 'content-type: application/json' \
         -d '{"input": {"text": "servekit is great"}}'

Running this file starts the same app on a free port of 127.0.0.1, sends it a few
requests with the standard library's HTTP client, prints the answers, and stops.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

from pydantic import BaseModel

import servekit as sk

POSITIVE = {"good", "great", "love", "excellent", "fast"}
NEGATIVE = {"bad", "slow", "hate", "broken", "awful"}


class Review(BaseModel):
    """One input: a piece of text."""

    text: str


class Sentiment(BaseModel):
    """One output: a label and a score in [-1, 1]."""

    label: str
    score: float


@sk.model
def sentiment(batch: list[Review]) -> list[Sentiment]:
    """A word-list sentiment model: good enough to show the plumbing."""
    out = []
    for review in batch:
        words = review.text.lower().split()
        raw = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        score = max(-1.0, min(1.0, raw / 2))
        label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
        out.append(Sentiment(label=label, score=score))
    return out


#: What ``servekit serve examples.serve_app:predictor`` serves: concurrent requests are
#: batched together.
predictor = sk.Predictor(sentiment, batcher=sk.Batcher(max_batch_size=32))


def main() -> None:
    import uvicorn

    from servekit.transports import create_asgi_app

    server = uvicorn.Server(
        uvicorn.Config(create_asgi_app(predictor), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    try:
        for text in ("servekit is great", "the queue was slow and broken", "it is a model"):
            body = json.dumps({"input": {"text": text}}).encode()
            request = urllib.request.Request(
                f"{base}/predict",
                data=body,
                method="POST",
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request) as response:
                print(text, "->", json.load(response)["output"])
        with urllib.request.urlopen(f"{base}/v2/health/ready") as response:
            print("ready:", json.load(response))
    finally:
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    main()
