"""create_asgi_app: a pure ASGI 3 application over the sans-I/O core.

No framework: it runs under any ASGI server (uvicorn, hypercorn) and mounts in
FastAPI or Starlette (``app.mount("/ml", create_asgi_app(predictor))``).

- **Lifespan.** ``startup`` starts the predictors (and the job queue); ``shutdown``
  first turns readiness off and refuses new work (503), then closes the predictors,
  which drain what they accepted. A host that manages the predictors itself passes
  ``lifespan=False``.
- **Body limit before reading.** A ``content-length`` over ``limits.max_body_bytes``
  is answered 413 before a byte is read; a chunked body is counted as it arrives and
  refused as soon as it passes the limit (TR-02).
- **Overload before reading.** A ``/predict`` or infer request to a model whose
  batcher's queue is full is answered 429 from its route alone: no body read, no JSON
  decoded, no task started, so refusing the excess of an overload costs little more
  than a health probe (LD-02).
- **Disconnects.** While a request's work runs, the app listens for
  ``http.disconnect``; a client that goes away cancels the work, which takes its item
  out of the batcher's queue (BQ-10), and nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import anyio
import anyio.to_thread

from .._predictor import Predictor
from . import _v2_errors
from ._core import Call, HTTPRequest, HTTPResponse, Service, route_name

__all__ = ["ASGIApp", "create_asgi_app"]

_log = logging.getLogger("servekit.transports")
# The running asyncio loop, or None (trio): no exception to catch.
_get_running_loop = asyncio._get_running_loop

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ASGIApp:
    """The ASGI application :func:`create_asgi_app` returns; ``service`` is its core."""

    def __init__(self, service: Service, *, lifespan: bool = True, grace_s: float = 30.0) -> None:
        #: The sans-I/O core (routes, limits, the error table).
        self.service = service
        self._lifespan = lifespan
        #: How long lifespan shutdown lets predictors and jobs drain.
        self.grace_s = grace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point."""
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan_events(receive, send)
        # websockets are not served: the server closes them.

    async def startup(self) -> None:
        """Start every predictor and the job queue (what lifespan startup does)."""
        for predictor in self.service.predictors.values():
            await predictor.astart()
        for queue in self.service.distinct_job_queues():
            await queue.astart()
        self.service.accepting = True

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Turn readiness off, refuse new work, then drain and close the predictors
        and the job queue (what lifespan shutdown does)."""
        self.service.accepting = False
        closers = [q.close for q in self.service.distinct_job_queues()]
        closers += [p.close for p in self.service.predictors.values()]

        # Bounded (SD-02, SD-03): queued work fails with Closed after the grace, but a
        # batch stuck inside a model, or a slow model close(), cannot be interrupted
        # (threads). The closers run on a daemon thread of their own, so that after the
        # grace and a second shutdown returns and the process can still exit: the event
        # loop's worker threads are not daemons, and the interpreter would wait for one.
        def close_all() -> None:
            for close in closers:  # one failing close does not keep the others open
                try:
                    close(grace_s)
                except Exception:
                    _log.exception("servekit: an error while closing at shutdown")

        closing = threading.Thread(target=close_all, name="servekit-shutdown", daemon=True)
        closing.start()
        with anyio.move_on_after(grace_s + 1.0) as scope:
            await anyio.to_thread.run_sync(closing.join, grace_s + 1.0, abandon_on_cancel=True)
        if scope.cancelled_caught or closing.is_alive():
            _log.warning(
                "servekit: shutdown did not finish within grace_s=%s (a model is still "
                "running); leaving it behind",
                grace_s,
            )

    async def _lifespan_events(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._lifespan:
                        await self.startup()
                except Exception as exc:  # a model that cannot load: the server stops
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._lifespan:
                    await self.shutdown(self.grace_s)
                else:
                    self.service.accepting = False
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        service = self.service
        method, path = scope["method"], scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            # Mounted (Starlette's Mount, uvicorn --root-path): route on the path
            # below the mount point.
            path = path[len(root) :] or "/"
        matched = service.match(method, path)
        response: HTTPResponse | None
        if isinstance(matched, HTTPResponse):
            response = matched
        else:
            # The excess of an overload is refused from the route alone, before its
            # body is read or decoded (LD-02); the body left unread is the server's.
            response = service.refuse_if_full(matched, path)
            if response is None:
                response = await self._answer(scope, receive, method, path, matched)
        # A client that went away before its answer is counted as nginx logs it: 499.
        status = 499 if response is None else response.status
        service.http.record(route_name(matched, path), method, status, time.perf_counter() - start)
        if response is not None:
            await _send(send, response, method)

    async def _answer(
        self, scope: Scope, receive: Receive, method: str, path: str, matched: Any
    ) -> HTTPResponse | None:
        """The response to a routed request; None if the client disconnected."""
        service = self.service
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = service.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            return service.reject(path, 400, "bad_request", "content-length is not a number")
        if declared is not None and int(declared) > limit:
            return _too_large(service, path, limit)
        body = await _read_body(receive, limit, service, path)
        if body is None or isinstance(body, HTTPResponse):  # disconnected, or too large
            return body
        request = HTTPRequest(method, path, headers, body, scope.get("query_string", b"").decode())
        prepared = service.prepare(request, matched)
        if isinstance(prepared, HTTPResponse):
            return prepared
        return await _run(prepared, receive)


async def _read_body(
    receive: Receive, limit: int, service: Service, path: str
) -> bytes | HTTPResponse | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _too_large(service, path, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _run(call: Call, receive: Receive) -> HTTPResponse | None:
    """Run the call; None if the client disconnected (the work was cancelled)."""
    if not call.cancellable:
        try:
            return call.finish(await call.run_async())
        except Exception as exc:
            return call.finish(exc)
    if _get_running_loop() is not None:
        return await _run_on_asyncio(call, receive)
    result: Any = None
    disconnected = False
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    group.cancel_scope.cancel()
                    return

        group.start_soon(watch)
        try:
            result = await call.run_async()
        except Exception as exc:
            result = exc
        finally:
            group.cancel_scope.cancel()
    if disconnected:
        return None
    return call.finish(result)


async def _run_on_asyncio(call: Call, receive: Receive) -> HTTPResponse | None:
    """:func:`_run` on asyncio: the watcher is a bare task, cancelled when the call ends.

    A task group costs about 120 µs of loop time per request (starting its task,
    cancelling its scope and waiting for the watcher to finish take several loop
    passes), twice the rest of a batched request's work. Here the call runs in a
    cancel scope that only a disconnect cancels; the watcher is cancelled without
    waiting for it, and ends on the loop's next pass.
    """
    result: Any = None
    disconnected = False
    with anyio.CancelScope() as scope:

        async def watch() -> None:
            nonlocal disconnected
            while True:
                try:
                    message = await receive()
                except Exception:  # the server's receive failed: nothing more to watch
                    _log.debug("receive() raised while watching for a disconnect", exc_info=True)
                    return
                if message["type"] == "http.disconnect":
                    disconnected = True
                    scope.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            result = await call.run_async()
        except Exception as exc:
            result = exc
        finally:
            watcher.cancel()
    if disconnected:
        return None
    return call.finish(result)


async def _send(send: Send, response: HTTPResponse, method: str) -> None:
    body = b"" if method == "HEAD" else response.body
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(service: Service, path: str, limit: int) -> HTTPResponse:
    message = f"the request body is over the limit of {limit} bytes"
    return service.reject(path, 413, "payload_too_large", message)


def create_asgi_app(
    predictors: Predictor[Any, Any] | Mapping[str, Predictor[Any, Any]],
    *,
    jobs: Any = None,
    limits: _v2_errors.Limits | None = None,
    expose_model_errors: bool = False,
    lifespan: bool = True,
    name: str = "servekit",
    grace_s: float = 30.0,
) -> ASGIApp:
    """A pure ASGI 3 app serving ``predictors`` (one, or a mapping of names to them).

    Routes: the Open Inference Protocol V2 REST API under ``/v2`` (health, server and
    model metadata, model readiness, infer with JSON tensors and the binary tensor
    extension); ``POST /predict`` and ``/predict_many`` (``/models/NAME/...`` with
    several models) with native JSON; and with ``jobs`` (a
    :class:`~servekit.jobs.JobQueue`), ``POST /jobs`` (202 and a ``Location``),
    ``GET /jobs/ID`` and ``DELETE /jobs/ID``; ``jobs`` may also map model names to
    queues, one per model, under ``/models/NAME/jobs``. See :class:`Service` for the options;
    ``grace_s`` bounds the drain at lifespan shutdown.
    """
    service = Service(
        predictors,
        jobs=jobs,
        limits=limits,
        expose_model_errors=expose_model_errors,
        name=name,
    )
    return ASGIApp(service, lifespan=lifespan, grace_s=grace_s)
