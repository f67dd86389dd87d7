"""servekit inside a Flask app: the WSGI app mounted under ``/ml``.

The Flask app keeps its own routes; Werkzeug's ``DispatcherMiddleware`` sends every
request under ``/ml`` to servekit's WSGI app (``/ml/predict``, ``/ml/v2/...``,
``/ml/metrics``). The predictor starts on its first request; close it when the host
shuts down (here, with ``atexit``).

Serve it for real, from the repository root (Flask's development server, or any WSGI
server such as ``gunicorn examples.http_flask:app``)::

    flask --app examples.http_flask run --port 8000

then, in another terminal::

    curl -s localhost:8000/ml/predict -H 'content-type: application/json' \\
         -d '{"input": "servekit in flask"}'

Running this file calls the app with Flask's test client (no socket, no port) and
prints a few answers.
"""

from __future__ import annotations

import atexit

from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import servekit as sk
from servekit.transports import create_wsgi_app


@sk.model
def word_count(batch: list[str]) -> list[int]:
    """The model: how many words each text has."""
    return [len(text.split()) for text in batch]


predictor = sk.Predictor(word_count)

app = Flask(__name__)


@app.get("/")
def index() -> dict[str, str]:
    """The host's own route."""
    return {"service": "text tools", "model": "POST /ml/predict"}


# Everything under /ml goes to servekit (PATH_INFO without /ml, SCRIPT_NAME with it);
# the rest stays with Flask.
app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
    app.wsgi_app, {"/ml": create_wsgi_app(predictor)}
)

# A WSGI server has no shutdown hook of its own: close the predictor (which drains what
# it accepted) when the process exits. Servers with hooks (gunicorn's worker_exit) can
# call predictor.close() there instead.
atexit.register(predictor.close)


def main() -> None:
    """Call the app with Flask's test client and print the answers."""
    client = app.test_client()

    print("GET / ->", client.get("/").get_json())

    response = client.post("/ml/predict", json={"input": "servekit in flask"})
    print("POST /ml/predict ->", response.status_code, response.get_json())

    texts = ["one", "two words", "and now three"]
    response = client.post("/ml/predict_many", json={"inputs": texts})
    print("POST /ml/predict_many ->", response.status_code, response.get_json())

    infer = {"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": texts[1:]}]}
    path = f"/ml/v2/models/{predictor.name}/infer"
    response = client.post(path, json=infer)
    print(f"POST {path} ->", response.status_code, response.get_json())

    response = client.post("/ml/predict", json={"input": 42})
    print("POST /ml/predict (bad input) ->", response.status_code, response.get_json())

    print("GET /ml/v2/health/ready ->", client.get("/ml/v2/health/ready").get_json())

    predictor.close()  # what the atexit hook would do; closing twice is harmless
    print("predictor after close:", predictor.state.value)
    response = client.post("/ml/predict", json={"input": "too late"})
    print("POST /ml/predict after close ->", response.status_code, response.get_json())


if __name__ == "__main__":
    main()
