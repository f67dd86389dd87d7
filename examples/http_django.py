"""servekit in front of a Django project: one WSGI app that routes ``/ml`` to servekit.

A minimal single-file Django project (settings in code, one view) sits behind a small
WSGI dispatcher: requests under ``/ml`` go to servekit's WSGI app (with ``/ml`` moved
from ``PATH_INFO`` to ``SCRIPT_NAME``), everything else to Django. In a real project
the dispatcher goes in ``wsgi.py`` around ``get_wsgi_application()``.

Serve it for real, from the repository root, with any WSGI server::

    gunicorn examples.http_django:application

then, in another terminal::

    curl -s localhost:8000/ml/predict -H 'content-type: application/json' \\
         -d '{"input": [3, 1, 2]}'

Running this file calls the combined app in-process with httpx (no socket, no port)
and prints a few answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import django
import httpx
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path

import servekit as sk
from servekit.transports import create_wsgi_app

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only-not-secret",  # a real project reads it from the environment
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
)
django.setup()


def index(request: HttpRequest) -> JsonResponse:
    """The Django project's own view."""
    return JsonResponse({"service": "stats", "model": "POST /ml/predict"})


urlpatterns = [path("", index)]


@sk.model
def mean(batch: list[list[float]]) -> list[float]:
    """The model: the mean of each list of numbers."""
    return [sum(xs) / len(xs) if xs else 0.0 for xs in batch]


predictor = sk.Predictor(mean)

WSGI = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def mount(prefix: str, inner: WSGI, rest: WSGI) -> WSGI:
    """A WSGI app sending requests under ``prefix`` to ``inner``, the rest to ``rest``."""

    def dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Route one request by its path."""
        path_info = environ.get("PATH_INFO", "")
        if path_info == prefix or path_info.startswith(prefix + "/"):
            environ = {
                **environ,
                "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + prefix,
                "PATH_INFO": path_info[len(prefix) :] or "/",
            }
            return inner(environ, start_response)
        return rest(environ, start_response)

    return dispatch


#: What a WSGI server serves. Close the predictor when the server stops (gunicorn's
#: ``worker_exit`` hook, or ``atexit``); it starts on its first request.
application = mount("/ml", create_wsgi_app(predictor), get_wsgi_application())


def main() -> None:
    """Call the combined app with httpx and print the answers."""
    transport = httpx.WSGITransport(app=application)
    with httpx.Client(transport=transport, base_url="http://testserver") as client:
        print("GET / (Django) ->", client.get("/").json())

        response = client.post("/ml/predict", json={"input": [3, 1, 2]})
        print("POST /ml/predict ->", response.status_code, response.json())

        response = client.post("/ml/predict_many", json={"inputs": [[1, 2], [10, 20, 30], []]})
        print("POST /ml/predict_many ->", response.status_code, response.json())

        infer = {
            "inputs": [
                {"name": "input", "shape": [2, 3], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 9]}
            ]
        }
        path = f"/ml/v2/models/{predictor.name}/infer"
        response = client.post(path, json=infer)
        print(f"POST {path} ->", response.status_code, response.json())

        response = client.get(f"/ml/v2/models/{predictor.name}")
        print(f"GET /ml/v2/models/{predictor.name} ->", response.json())

        response = client.get("/nowhere")
        print("GET /nowhere (Django) ->", response.status_code)
    predictor.close()
    print("predictor after close:", predictor.state.value)


if __name__ == "__main__":
    main()
