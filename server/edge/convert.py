"""Engine events and model facts -> protobuf messages and gRPC statuses: the edge's only converter."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from lcmserve.names import DECODER_VALUES, OUTPUT_FORMAT_VALUES
from lcmserve.v1 import generation_pb2 as pb

from ..config import EngineConfig
from ..protocol import HostTensor, ImageEvent, Picture, StepEvent, Summary
from ..model.runtime import ModelSpec
from ..config import Limits
from .images import image_limits
from .validation import InvalidRequest

QUEUE_FULL_RETRY_S = 0.1  # the RetryInfo a RESOURCE_EXHAUSTED answer carries


def picture(p: Picture) -> pb.Picture:
    return pb.Picture(data=p.data, format=OUTPUT_FORMAT_VALUES[p.format], width=p.width,  # type: ignore[arg-type]
                      height=p.height)


def tensor(t: HostTensor) -> pb.Tensor:
    return pb.Tensor(shape=list(t.shape), dtype="float32", data=t.data)


def step(event: StepEvent) -> pb.GenerateResponse:
    return pb.GenerateResponse(step=pb.StepEvent(
        image_index=event.image_index, step=event.step, num_steps=event.num_steps, timestep=event.timestep,
        preview=picture(event.preview) if event.preview is not None else None,
        latents=tensor(event.latents) if event.latents is not None else None))


def image(event: ImageEvent) -> pb.GenerateResponse:
    return pb.GenerateResponse(image=pb.Image(
        index=event.index, picture=picture(event.picture), seed=event.seed,
        latents=tensor(event.latents) if event.latents is not None else None))


def summary(event: Summary, total_ms: float) -> pb.GenerateResponse:
    timings = dataclasses.replace(event.timings, total_ms=total_ms)
    return pb.GenerateResponse(summary=pb.Summary(
        seed=event.seed, num_images=event.num_images, prompt_truncated=event.prompt_truncated,
        prompt_tokens=event.prompt_tokens, timings=pb.Timings(**dataclasses.asdict(timings)),
        num_steps=event.num_steps))


def model_info(spec: ModelSpec, limits: Limits, engine: EngineConfig, version: str,
               devices: Sequence[str] = ()) -> pb.GetModelInfoResponse:
    """`devices`: every engine's device in --devices order (default: spec's alone); `device` is the first."""
    return pb.GetModelInfoResponse(
        base=spec.base,
        loras=[pb.LoraInfo(source=str(lo.get("source", "")), sha256=str(lo.get("sha256", "")),
                           scale=float(lo.get("scale", 1.0))) for lo in spec.loras],
        dtype=str(spec.dtype).removeprefix("torch."),
        device=str(spec.device),
        devices=list(devices) or [str(spec.device)],
        backend=spec.backend,
        limits=pb.Limits(
            max_steps=limits.max_steps, min_side=limits.min_side, max_side=limits.max_side,
            side_multiple=limits.side_multiple, max_images=limits.max_images,
            max_prompt_chars=limits.max_prompt_chars, min_guidance_scale=limits.min_guidance_scale,
            max_guidance_scale=limits.max_guidance_scale, max_batch_size=engine.max_batch_size,
            max_queued_requests=engine.max_queued_requests,
            max_image_bytes=image_limits(limits).max_bytes, max_image_pixels=image_limits(limits).max_pixels),
        server_version=version,
        decoders=[DECODER_VALUES[d] for d in spec.decoders],  # type: ignore[misc]  # ints of the Decoder enum
        default_decoder=DECODER_VALUES[spec.default_decoder],  # type: ignore[arg-type]
        jpeg_encoder=str(spec.extra.get("jpeg_encoder", "host")),
    )


# ---- statuses -----------------------------------------------------------------------------------------


def bad_request(exc: InvalidRequest) -> grpc.Status:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming each field, its value and the limit."""
    detail = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=f"{field} {description}")
        for field, description in exc.violations])
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"invalid request: {exc}")
    status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def queue_full(message: str) -> grpc.Status:
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo: the client may retry after a short wait."""
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(QUEUE_FULL_RETRY_S * 1e9)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED,
                               message=f"server overloaded: {message}; retry after {QUEUE_FULL_RETRY_S:g} s")
    status.details.add().Pack(retry)
    return rpc_status.to_status(status)
