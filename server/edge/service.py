"""The gRPC transport of the edge: parse, call the edge core (core.py), render. No model work here.

  TokenAuth          a grpc.aio.ServerInterceptor around auth.TokenCheck: every RPC but
                     grpc.health.v1.Health needs `authorization: Bearer <token>`; otherwise
                     UNAUTHENTICATED and no handler runs.
  GenerationService  the handlers, registered without a request deserializer (`handler()`): bytes
                     that do not decode are INVALID_ARGUMENT with a plain message, not UNKNOWN.
                     Generate's events become GenerateResponses and a Refusal becomes the gRPC
                     status with its google.rpc details (convert.py).
Every Generate call is counted once, by the core, under the status its client saw (metrics.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from lcmserve.v1 import generation_pb2 as pb

from . import convert
from .auth import HEADER, TokenCheck, unauthenticated
from .core import EdgeCore
from .metrics import Metrics
from .status import Refusal, Refused, Status
from .tracing import CallInfo
from .validation import UndecodableRequest, parse

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
GENERATE_METHOD = f"/{SERVICE_NAME}/Generate"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes must not need secrets


async def _abort(context: grpc.aio.ServicerContext[Any, Any], refusal: Refusal) -> NoReturn:
    status = convert.status(refusal)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # (it raises)


def _undecodable(exc: UndecodableRequest) -> Refusal:
    return Refusal(Status.INVALID_ARGUMENT, f"invalid request: {exc}")


class GenerationService:
    def __init__(self, core: EdgeCore) -> None:
        self.core = core

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers; requests arrive as bytes and are parsed in the handler."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, response_serializer=pb.GenerateResponse.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, response_serializer=pb.GetModelInfoResponse.SerializeToString),
        })

    async def Generate(self, raw: bytes,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.GenerateResponse]:
        try:
            request = parse(raw, pb.GenerateRequest)
        except UndecodableRequest as exc:
            self.core.count(Status.INVALID_ARGUMENT, "grpc", CallInfo(GENERATE_METHOD[1:], context.peer()))
            await _abort(context, _undecodable(exc))
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            call = CallInfo(GENERATE_METHOD[1:], context.peer(), context.invocation_metadata() or ())
            async with contextlib.aclosing(self.core.generate(request, deadline, "grpc", call)) as events:
                async for event in events:  # (closed at once on every way out: the core then cancels)
                    yield convert.response(event)
        except Refused as exc:
            await _abort(context, exc.refusal)

    async def GetModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> pb.GetModelInfoResponse:
        try:
            parse(raw, pb.GetModelInfoRequest)
            return convert.model_info(self.core.model())
        except UndecodableRequest as exc:
            await _abort(context, _undecodable(exc))
        except Refused as exc:
            await _abort(context, exc.refusal)


# ---- authentication ----------------------------------------------------------------------------------


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio's base class is untyped
    """auth.TokenCheck on every RPC except grpc.health.v1.Health (reflection goes behind it too).

    A refused call gets UNAUTHENTICATED from a stand-in handler of the same kind that never parses
    the request: the real handler never runs.
    """

    def __init__(self, tokens: Sequence[str], metrics: Metrics | None = None) -> None:
        self._check = TokenCheck(tokens)
        self._metrics = metrics

    def allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        return self._check.allows(next((value for key, value in metadata or () if key == HEADER), None))

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        if method.startswith(OPEN_PREFIXES) or self.allowed(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED either way
        if self._metrics is not None:
            self._metrics.unauthenticated.labels(method=method).inc()
            if method == GENERATE_METHOD:
                self._metrics.request_done(Status.UNAUTHENTICATED)
        return _refusal(handler)


async def _refuse(_request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await _abort(context, unauthenticated("metadata"))


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading the request."""
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse, response_serializer=serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, response_serializer=serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse, response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(_refuse, response_serializer=serializer)
