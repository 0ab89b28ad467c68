"""The gRPC edge: validate, enqueue, stream. No model work happens here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc

from .work import EngineStopped, Failure, ImageOut, Request, StepOut, SummaryOut
from .validation import FORMAT_ENUMS, InvalidRequest, validate

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("lcmserve.service")


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        app = self.app
        if app.engine is None or not app.serving:
            if app.draining:
                reason = "the server is draining"
            elif app.engine is not None and app.engine.dead is not None:
                reason = f"the server is not serving: {app.engine.dead}"
            else:
                reason = "the model is still loading"
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        engine = app.engine
        assert engine is not None
        try:
            params = validate(request, engine.runtime.tokenizer, app.limits)
        except InvalidRequest as exc:
            await _abort_bad_request(context, exc)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        remaining = context.time_remaining()
        engine_request = Request(
            params=params,
            sink=lambda item: loop.call_soon_threadsafe(events.put_nowait, item),
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        try:
            engine.submit(engine_request)  # a full queue answers with a RESOURCE_EXHAUSTED Failure event
        except EngineStopped:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not running")

        app.inflight += 1
        done = False
        first_step = True
        try:
            while True:
                item = await events.get()  # in order, pictures encoded (server/engine_process.py)
                if isinstance(item, Failure):
                    if item.code == "RESOURCE_EXHAUSTED":
                        done = True  # never queued: nothing to cancel
                        if app.metrics:
                            app.metrics.request_done("RESOURCE_EXHAUSTED")
                        await _abort_queue_full(context, item.message)
                    await context.abort(getattr(grpc.StatusCode, item.code), item.message)
                elif isinstance(item, StepOut):
                    if first_step and app.metrics:
                        app.metrics.first_step.observe(time.perf_counter() - engine_request.arrival)
                    first_step = False
                    yield pb.GenerateResponse(step=pb.StepEvent(
                        image_index=item.image_index, step=item.step, num_steps=item.num_steps,
                        timestep=item.timestep,
                        preview=_picture(item.preview) if item.preview else None,
                        latents=_tensor(item.latents) if item.latents is not None else None))
                elif isinstance(item, ImageOut):
                    if app.metrics:
                        app.metrics.images.inc()
                    yield pb.GenerateResponse(image=pb.Image(
                        index=item.index, picture=_picture(item.picture), seed=item.seed,
                        latents=_tensor(item.latents) if item.latents is not None else None))
                elif isinstance(item, SummaryOut):
                    total = time.perf_counter() - engine_request.arrival
                    if app.metrics:
                        app.metrics.request_time.observe(total)
                    timings = dict(item.timings, total_ms=total * 1e3)
                    done = True
                    yield pb.GenerateResponse(summary=pb.Summary(
                        seed=item.seed, num_images=item.num_images, prompt_truncated=item.prompt_truncated,
                        prompt_tokens=item.prompt_tokens, timings=pb.Timings(**timings)))
                    return
        finally:
            app.inflight -= 1
            if not done:
                engine_request.cancel()  # its samples leave the batch at the next step

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        app = self.app
        if app.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert app.engine is not None
        spec = app.engine.runtime.spec
        limits = app.limits
        engine_config = app.engine.config
        return pb.GetModelInfoResponse(
            base=spec.base,
            loras=[pb.LoraInfo(source=str(lo.get("source", "")), sha256=str(lo.get("sha256", "")),
                               scale=float(lo.get("scale", 1.0))) for lo in spec.loras],
            dtype=str(spec.dtype).removeprefix("torch."),
            device=str(spec.device),
            backend=spec.backend,
            limits=pb.Limits(
                max_steps=limits.max_steps, min_side=limits.min_side, max_side=limits.max_side,
                side_multiple=limits.side_multiple, max_images=limits.max_images,
                max_prompt_chars=limits.max_prompt_chars, min_guidance_scale=limits.min_guidance_scale,
                max_guidance_scale=limits.max_guidance_scale, max_batch_size=engine_config.max_batch_size,
                max_queued_requests=engine_config.max_queued_requests),
            server_version=app.version,
        )


def _picture(picture: Any) -> pb.Picture:
    return pb.Picture(data=picture.data, format=FORMAT_ENUMS[picture.format], width=picture.width,
                      height=picture.height)


def _tensor(array: Any) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype="<f4")  # (from the engine process as numpy)
    return pb.Tensor(shape=list(array.shape), dtype="float32", data=array.tobytes())


async def _abort_bad_request(context: grpc.aio.ServicerContext, exc: InvalidRequest) -> None:
    detail = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=f"{field} {description}")
        for field, description in exc.violations])
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"invalid request: {exc}")
    status.details.add().Pack(detail)
    await _abort_with(context, status)


async def _abort_queue_full(context: grpc.aio.ServicerContext, message: str) -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=100_000_000))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED,
                               message=f"server overloaded: {message}; retry after 0.1 s")
    status.details.add().Pack(retry)
    await _abort_with(context, status)


async def _abort_with(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    rich = rpc_status.to_status(status)
    await context.abort(rich.code, rich.details, rich.trailing_metadata)
