"""servekit.transports.grpc: the Open Inference Protocol over gRPC (extra ``grpc``).

:func:`add_to_server` adds the protocol's ``inference.GRPCInferenceService``
(ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer) to a
``grpc.aio.Server`` the host already runs; :func:`create_server` builds one on its own
(``servekit serve --grpc-port`` runs one beside the HTTP app). Requests go through the
same core as the REST routes (:class:`~servekit.transports.Service`): the same model
lookup, limits, batch dimension, outputs and error codes.

- **Deadlines.** The RPC's deadline (``context.time_remaining()``) becomes the
  request's ``timeout_s`` (the smaller of it and a ``timeout`` parameter), so an item
  whose deadline passes in the queue is never sent to the model.
- **Cancellation.** A cancelled RPC cancels its handler, which takes its item out of
  the batcher's queue (or drops the result of a batch already running).
- **Errors** map to status codes through the transports' error table
  (:data:`~servekit.transports.STATUS`, see :func:`status_code`); the details start
  with the servekit error code, which is also sent in the trailing metadata
  ``servekit-error-code`` (and ``retry-after``, whole seconds, for ``overloaded``).
- **Clients** in Python can use the generated modules :data:`pb2` (messages) and
  :data:`pb2_grpc` (``GRPCInferenceServiceStub``); any other client generates its own
  from the protocol's ``.proto`` (shipped in ``servekit/transports/grpc/_proto``).
- **Message sizes.** gRPC's own limits are options of the server
  (:func:`server_options`); :func:`create_server` sets both from
  ``max_message_bytes``. :func:`add_to_server` cannot change the host's server, so it
  takes ``max_message_bytes`` as a check of its own on each request.

grpc.aio runs on asyncio only (not trio).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

try:
    import grpc
    import grpc.aio

    importlib.import_module("google.protobuf")  # the generated messages need it
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'servekit.transports.grpc needs grpcio and protobuf: pip install "servekit[grpc]"'
    ) from exc

from ..._predictor import Predictor
from ...errors import DeadlineExceeded, ModelError, Overloaded, ServekitError
from .. import _v2, _v2_errors
from .._core import STATUS, Service, _BadRequest, _is_object, _outputs, _rows, _tensor_specs
from ._codec import decode_infer_request, encode_infer_response
from ._proto import open_inference_grpc_pb2 as pb
from ._proto import open_inference_grpc_pb2_grpc as pb_grpc

#: The protocol's generated messages (``pb2.ModelInferRequest``, ...), for clients.
pb2 = pb
#: The protocol's generated service module (``pb2_grpc.GRPCInferenceServiceStub``).
pb2_grpc = pb_grpc

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GRPCServer",
    "InferenceServicer",
    "add_to_server",
    "create_server",
    "pb2",
    "pb2_grpc",
    "server_options",
    "status_code",
]

_log = logging.getLogger("servekit.transports")

#: The default gRPC message limit (both ways) of :func:`create_server`: the REST body
#: limit (``Limits.max_body_bytes``), where gRPC's own default receive limit is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = _v2_errors.Limits().max_body_bytes

# HTTP status -> gRPC status code, after Google's mapping between the two
# (google/rpc/code.proto): the transports' table (STATUS) decides the HTTP status of
# every servekit error code, and this table carries it over.
_BY_HTTP: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Codes with a gRPC meaning of their own (not in STATUS, or better said directly).
_DIRECT: dict[str, grpc.StatusCode] = {"cancelled": grpc.StatusCode.CANCELLED}


def status_code(code: str) -> grpc.StatusCode:
    """The gRPC status code for a servekit error code: through the HTTP status of
    :data:`~servekit.transports.STATUS` (400/422 ``INVALID_ARGUMENT``, 404
    ``NOT_FOUND``, 413/429 ``RESOURCE_EXHAUSTED``, 503 ``UNAVAILABLE``, 504
    ``DEADLINE_EXCEEDED``); a code not in the table is ``INTERNAL``.

    >>> status_code("overloaded")
    <StatusCode.RESOURCE_EXHAUSTED: (8, 'resource exhausted')>
    """
    direct = _DIRECT.get(code)
    if direct is not None:
        return direct
    return _BY_HTTP.get(STATUS.get(code, 500), grpc.StatusCode.INTERNAL)


def server_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    max_send_message_bytes: int | None = None,
) -> list[tuple[str, int]]:
    """Channel options for ``grpc.aio.server(options=...)``: the largest message the
    server receives (``grpc.max_receive_message_length``) and sends
    (``grpc.max_send_message_length``, default: the same).

    >>> server_options(8 * 2**20)
    [('grpc.max_receive_message_length', 8388608), ('grpc.max_send_message_length', 8388608)]
    """
    send = max_message_bytes if max_send_message_bytes is None else max_send_message_bytes
    return [
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", int(send)),
    ]


class _MessageTooLarge(ServekitError):
    code = "payload_too_large"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The ``inference.GRPCInferenceService`` over a :class:`~servekit.transports.Service`.

    Built by :func:`add_to_server`; ``service`` is shared with an HTTP app when both
    serve the same predictors (readiness and refusing work at shutdown follow its
    ``accepting`` flag). ``max_message_bytes``, when given, refuses larger infer
    requests with ``RESOURCE_EXHAUSTED`` (``payload_too_large``).
    """

    def __init__(self, service: Service, *, max_message_bytes: int | None = None) -> None:
        #: The sans-I/O core: predictors, limits, error settings, readiness.
        self.service = service
        #: The servicer's own bound on an infer request's size, or None.
        self.max_message_bytes = max_message_bytes

    # --- health and metadata ---------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        """True while the process serves RPCs."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        """True while accepting requests and every predictor is ready."""
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        """Whether one model (and version) is ready; ``NOT_FOUND`` if unknown."""
        try:
            predictor = self._predictor(request.name, request.version)
        except Exception as exc:
            await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=self.service.accepting and predictor.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        """The server's name and servekit's version (no protocol extensions)."""
        from ... import __version__

        return pb.ServerMetadataResponse(name=self.service.name, version=__version__)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        """A model's versions, platform and tensors (as ``GET /v2/models/NAME``)."""
        try:
            predictor = self._predictor(request.name, request.version)
            schema = predictor.signature.json_schema()
            metadata = _v2.model_metadata(
                predictor.name,
                [predictor.version or "1"],
                "servekit",
                _tensor_specs(schema.get("input"), "input"),
                _tensor_specs(schema.get("output"), "output"),
            )
        except Exception as exc:
            await self._abort(context, exc)
        response = pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"]
        )
        for target, tensors in (
            (response.inputs, metadata["inputs"]),
            (response.outputs, metadata["outputs"]),
        ):
            for t in tensors:
                target.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return response

    # --- inference -------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        """Run one inference request: the first dimension of the inputs is the batch,
        as on the REST route. Cancelling the RPC takes its items out of the queue."""
        try:
            return await self._infer(request, context)
        except Exception as exc:  # CancelledError is not caught: the RPC is gone
            await self._abort(context, exc)

    async def _infer(self, request: Any, context: Any) -> Any:
        service = self.service
        predictor = self._predictor(request.model_name, request.model_version)
        service._refuse_when_closing()
        if self.max_message_bytes is not None:
            size = request.ByteSize()
            if size > self.max_message_bytes:
                raise _MessageTooLarge(
                    f"the request has {size} bytes; at most {self.max_message_bytes} allowed"
                )
        infer = decode_infer_request(request, service.limits)
        items = _rows(infer, named=_is_object(predictor.signature.json_schema()["input"]))
        timeout_s = infer.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceeded("the RPC's deadline passed before it was queued")
            timeout_s = remaining if timeout_s is None else min(timeout_s, remaining)
        result = await predictor.apredict_many(
            items, timeout_s=timeout_s, priority=infer.priority or 0
        )
        tensors = _outputs(result)
        wanted = [o.name for o in infer.outputs]
        if wanted:
            names = [t.name for t in tensors]
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise _BadRequest(f"unknown output {unknown[0]!r}; outputs: {names}")
            tensors = [t for t in tensors if t.name in wanted]
        return encode_infer_response(
            model_name=predictor.name,
            model_version=predictor.version or "1",
            id=infer.id,
            outputs=tensors,
            raw=infer.binary_output_default,  # the request sent raw_input_contents
        )

    # --- helpers ---------------------------------------------------------------------

    def _predictor(self, name: str, version: str) -> Predictor[Any, Any]:
        params = {}
        if name:
            params["model"] = name
        if version:
            params["version"] = version
        return self.service._predictor(params)

    async def _abort(self, context: Any, exc: BaseException) -> NoReturn:
        code, message = self._describe(exc)
        metadata: list[tuple[str, str]] = [("servekit-error-code", code)]
        if isinstance(exc, Overloaded):
            metadata.append(("retry-after", str(max(1, math.ceil(exc.retry_after_s)))))
        await context.abort(status_code(code), f"{code}: {message}", tuple(metadata))
        raise AssertionError("context.abort returned")  # pragma: no cover - it raises

    def _describe(self, exc: BaseException) -> tuple[str, str]:
        # The same hygiene as the REST routes (SEC-08): a model's exception reaches
        # clients as its class name only, unexpected errors as a generic message.
        if isinstance(exc, ServekitError):
            if isinstance(exc, ModelError) and not self.service.expose_model_errors:
                kind = exc.error_type or "an error"
                return exc.code, f"the model raised {kind} for this input"
            return exc.code, exc.message
        _log.exception("unexpected error while handling a gRPC request", exc_info=exc)
        return "internal_error", "internal server error"


def add_to_server(
    server: Any,
    predictors: Predictor[Any, Any] | Mapping[str, Predictor[Any, Any]] | Service,
    *,
    limits: _v2_errors.Limits | None = None,
    expose_model_errors: bool = False,
    name: str = "servekit",
    max_message_bytes: int | None = None,
) -> InferenceServicer:
    """Add the Open Inference Protocol's gRPC service to ``server`` (a
    ``grpc.aio.Server``) for ``predictors``: one, a mapping of names to them, or the
    :class:`~servekit.transports.Service` of an HTTP app serving the same ones.

    The host owns the predictors (start them before serving, close them after the
    server stopped). ``limits`` bounds tensors as on the REST routes; the server's own
    message limits are set where it is created (:func:`server_options`);
    ``max_message_bytes`` adds a check of the servicer's own. Returns the servicer.

    Example::

        server = grpc.aio.server(options=server_options(16 * 2**20))
        add_to_server(server, predictor)
        server.add_insecure_port("127.0.0.1:8001")
        await server.start()
    """
    if isinstance(predictors, Service):
        service = predictors
    else:
        service = Service(
            predictors, limits=limits, expose_model_errors=expose_model_errors, name=name
        )
    servicer = InferenceServicer(service, max_message_bytes=max_message_bytes)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer


@dataclass(slots=True)
class GRPCServer:
    """A ``grpc.aio.Server`` serving the protocol, as :func:`create_server` builds it.

    It does not start or close the predictors: their owner does (an ASGI lifespan,
    ``async with predictor``).
    """

    #: The grpc.aio server.
    server: Any
    #: The port it is bound to (the one picked by the system when asked for 0).
    port: int
    #: The servicer serving the predictors.
    servicer: InferenceServicer

    async def start(self) -> None:
        """Start serving RPCs."""
        await self.server.start()

    async def stop(self, grace_s: float | None = 30.0) -> None:
        """Refuse new RPCs at once, let those in flight finish for ``grace_s``
        seconds, then cancel the rest (cancelled items leave the queue)."""
        await self.server.stop(grace_s)


def create_server(
    predictors: Predictor[Any, Any] | Mapping[str, Predictor[Any, Any]] | Service,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    limits: _v2_errors.Limits | None = None,
    expose_model_errors: bool = False,
    name: str = "servekit",
    options: list[tuple[str, Any]] | None = None,
) -> GRPCServer:
    """A ``grpc.aio.Server`` bound to ``host:port`` (insecure; 0 picks a free port)
    serving ``predictors``, with gRPC's message limits set to ``max_message_bytes``
    both ways and without ``SO_REUSEPORT`` (a taken port raises ``OSError``).
    ``options`` adds channel options. Call it on the event loop that will run the
    server, then ``await server.start()``.
    """
    # No SO_REUSEPORT (grpc's default): a second server on a taken port must fail, as
    # uvicorn does, rather than silently share the port's connections with the first.
    defaults = [*server_options(max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=[*defaults, *(options or [])])
    servicer = add_to_server(
        server, predictors, limits=limits, expose_model_errors=expose_model_errors, name=name
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind"
        bound = 0
    if not bound:
        raise OSError(f"cannot serve gRPC on {address}: the address is in use or invalid")
    return GRPCServer(server, int(bound), servicer)
