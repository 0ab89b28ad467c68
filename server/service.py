"""The gRPC edge: check serving, validate, submit, stream the engine's events. No model work here."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc

from . import convert
from .engine_process import EngineProcess
from .metrics import Metrics
from .protocol import Failure, ImageEvent, StepEvent, Summary
from .config import Limits
from .validation import InvalidRequest, validate
from .work import EngineStopped

log = logging.getLogger("lcmserve.service")


@dataclass
class ServingState:
    """What the servicer needs of the server: the engine once it is ready, and whether to take work."""

    limits: Limits
    version: str
    metrics: Metrics | None = None
    engine: EngineProcess | None = None  # set once the model is ready
    serving: bool = False
    draining: bool = False
    inflight: int = 0  # Generate calls between submit and their end

    def not_serving_reason(self) -> str | None:
        """Why Generate must answer UNAVAILABLE now, or None when it may take the request."""
        if self.engine is not None and self.serving:
            return None
        if self.draining:
            return "the server is draining"
        if self.engine is not None and self.engine.dead is not None:
            return f"the server is not serving: {self.engine.dead}"
        return "the model is still loading"


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        state = self.state
        reason = state.not_serving_reason()
        if reason is not None or state.engine is None or state.engine.info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason or "the model is still loading")
            return
        engine, info = state.engine, state.engine.info
        try:
            params = validate(request, info.tokenizer, state.limits)
        except InvalidRequest as exc:
            await _abort(context, convert.bad_request(exc))
            return
        remaining = context.time_remaining()
        try:
            ticket = engine.submit(params, None if remaining is None else time.monotonic() + remaining)
        except EngineStopped:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not running")
            return

        state.inflight += 1
        ended = False  # the engine has ended the request: nothing to cancel
        first_step = True
        try:
            async for event in ticket.events():  # in order, pictures encoded
                match event:
                    case Failure(code=code, message=message):
                        ended = True
                        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # never queued
                            if state.metrics:
                                state.metrics.request_done(code)
                            await _abort(context, convert.queue_full(message))
                        await context.abort(code, message)
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

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        engine = self.state.engine
        if engine is None or engine.info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert engine is not None and engine.info is not None  # (abort raised otherwise)
        return convert.model_info(engine.info.spec, self.state.limits, engine.config, self.state.version)


async def _abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)
