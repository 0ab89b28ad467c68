"""The gRPC edge: authenticate, check serving, validate, submit, stream the engine's events, count.

No model work here. Two pieces:
  TokenAuth          a grpc.aio.ServerInterceptor: every RPC but grpc.health.v1.Health needs
                     `authorization: Bearer <token>`; otherwise UNAUTHENTICATED and no handler runs.
  GenerationService  the handlers, registered without a request deserializer (`handler()`): bytes
                     that do not decode are INVALID_ARGUMENT with a plain message, not UNKNOWN.
Every Generate call is counted once, here, under the status its client saw (metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from lcmserve.v1 import generation_pb2 as pb

from . import convert
from ..config import Limits
from .images import prepare_images
from .pool import EnginePool
from .metrics import Metrics
from ..protocol import Failure, ImageEvent, StepEvent, Summary
from .validation import InvalidRequest, UndecodableRequest, parse, validate
from ..engine.work import EngineStopped

log = logging.getLogger("lcmserve.service")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
GENERATE_METHOD = f"/{SERVICE_NAME}/Generate"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes must not need secrets


@dataclass
class ServingState:
    """What the servicer needs of the server: the engine once it is ready, and whether to take work."""

    limits: Limits
    version: str
    metrics: Metrics | None = None
    engine: EnginePool | None = None  # set once every engine is ready (one per device)
    serving: bool = False
    draining: bool = False
    inflight: int = 0  # Generate calls between submit and their end

    def not_serving_reason(self) -> str | None:
        """Why Generate must answer UNAVAILABLE now, or None when it may take the request."""
        if self.engine is not None and self.engine.dead is not None:
            return f"the server is not serving: {self.engine.dead}"
        if self.engine is not None and self.serving:
            return None
        if self.draining:
            return "the server is draining"
        return "the model is still loading"


class _Outcome:
    """The status a call ends with, set before each abort (an abort raises)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str,
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        self.code = code
        await context.abort(code, details, tuple(trailing_metadata))


class GenerationService:
    def __init__(self, state: ServingState) -> None:
        self.state = state

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
        outcome = _Outcome()
        try:
            async with contextlib.aclosing(self._generate(raw, context, outcome)) as responses:
                async for response in responses:  # (closed at once on every way out: its finally cancels)
                    yield response
            outcome.code = grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, or its deadline passed
            if outcome.code is None:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0.001
                outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise  # (re-raise: a handler that swallows its cancellation leaks, grpc/grpc#43360)
        except Exception:
            if outcome.code is None:  # not an abort of ours: gRPC answers UNKNOWN
                log.exception("Generate failed")
                outcome.code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            if self.state.metrics is not None:
                self.state.metrics.request_done(outcome.code or grpc.StatusCode.UNKNOWN)

    async def _generate(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any],
                        outcome: _Outcome) -> AsyncGenerator[pb.GenerateResponse, None]:
        state = self.state
        try:
            request = parse(raw, pb.GenerateRequest)
        except UndecodableRequest as exc:
            await outcome.abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {exc}")
            return
        reason = state.not_serving_reason()
        if reason is not None or state.engine is None or state.engine.info is None:
            await outcome.abort(context, grpc.StatusCode.UNAVAILABLE, reason or "the model is still loading")
            return
        engine, info = state.engine, state.engine.info
        # Init/mask images decode and resize in a worker thread, never on this loop (tokenizing stays
        # here: a fast tokenizer is not safe to call from several threads at once).
        images = (await asyncio.to_thread(prepare_images, request, state.limits)
                  if request.init_image or request.mask_image else None)
        try:
            params = validate(request, info.tokenizer, state.limits, images=images, decoders=info.spec.decoders,
                              default_decoder=info.spec.default_decoder)
        except InvalidRequest as exc:
            status = convert.bad_request(exc)
            await outcome.abort(context, status.code, status.details, status.trailing_metadata)
            return
        remaining = context.time_remaining()
        try:
            ticket = engine.submit(params, None if remaining is None else time.monotonic() + remaining)
        except EngineStopped:
            await outcome.abort(context, grpc.StatusCode.UNAVAILABLE, "the engine is not running")
            return

        state.inflight += 1
        ended = False  # the engine has ended the request: nothing to cancel
        first_step = True
        try:
            async for event in ticket.events():  # in order, pictures encoded
                match event:
                    case Failure(code=code, message=message):
                        ended = True
                        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # queue full, or out of memory
                            status = convert.queue_full(message)
                            await outcome.abort(context, status.code, status.details, status.trailing_metadata)
                        await outcome.abort(context, code, message)
                    case StepEvent():
                        if first_step and state.metrics:
                            state.metrics.first_step.observe(time.perf_counter() - ticket.arrival)
                        first_step = False
                        yield convert.step(event)
                    case ImageEvent():
                        if state.metrics:
                            state.metrics.images.inc()
                        yield convert.image(event)
                    case Summary():
                        ended = True
                        total = time.perf_counter() - ticket.arrival
                        if state.metrics:
                            state.metrics.request_time.observe(total)
                        yield convert.summary(event, total * 1e3)
        finally:
            state.inflight -= 1
            if not ended:
                ticket.cancel()  # its samples leave the batch at the next step

    async def GetModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> pb.GetModelInfoResponse:
        try:
            parse(raw, pb.GetModelInfoRequest)
        except UndecodableRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {exc}")
        engine = self.state.engine
        if engine is not None and engine.dead is not None:  # a dead engine answers nothing as if healthy
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the server is not serving: {engine.dead}")
        if engine is None or engine.info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert engine is not None and engine.info is not None  # (abort raised otherwise)
        return convert.model_info(engine.info.spec, self.state.limits, engine.config, self.state.version,
                                  devices=engine.devices)


# ---- authentication ----------------------------------------------------------------------------------


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio's base class is untyped
    """Bearer-token check of every RPC except grpc.health.v1.Health (and reflection goes behind it too).

    Tokens are compared in constant time (hmac.compare_digest against every accepted token, without
    stopping at the first match). A refused call gets UNAUTHENTICATED from a stand-in handler of
    the same kind that never parses the request: the real handler never runs.
    """

    def __init__(self, tokens: Sequence[str], metrics: Metrics | None = None) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("TokenAuth needs at least one non-empty token")
        self._tokens = tuple(t.encode() for t in tokens)
        self._metrics = metrics

    def allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            return False
        given = header.encode() if isinstance(header, str) else header
        scheme, _, token = given.partition(b" ")
        matched = False
        for accepted in self._tokens:  # every token compared: the time does not tell which matched
            matched |= hmac.compare_digest(token.strip(), accepted)
        return scheme.lower() == b"bearer" and matched

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
                self._metrics.request_done(grpc.StatusCode.UNAUTHENTICATED)
        return _refusal(handler)


_UNAUTHENTICATED = "missing or wrong token: send the metadata 'authorization: Bearer <token>'"


async def _refuse(_request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)


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
