"""Engine events, the served model and refusals -> protobuf messages and gRPC statuses: the gRPC
edge's only converter (core.py hands it transport-neutral values)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from lcmserve.names import DECODER_VALUES, OUTPUT_FORMAT_VALUES
from lcmserve.export.records import ScorerRecord
from lcmserve.v1 import generation_pb2 as pb

from ..protocol import AdapterRecord, HostTensor, ImageEvent, Picture, StepEvent, Summary
from .core import Response, ServedModel
from .status import Refusal


def picture(p: Picture) -> pb.Picture:
    return pb.Picture(data=p.data, format=OUTPUT_FORMAT_VALUES[p.format], width=p.width,  # type: ignore[arg-type]
                      height=p.height)


def tensor(t: HostTensor) -> pb.Tensor:
    return pb.Tensor(shape=list(t.shape), dtype="float32", data=t.data)


def step(event: StepEvent) -> pb.GenerateResponse:
    return pb.GenerateResponse(step=pb.StepEvent(
        image_index=event.image_index, step=event.step, num_steps=event.num_steps, timestep=event.timestep,
        preview=picture(event.preview) if event.preview is not None else None,
        latents=tensor(event.latents) if event.latents is not None else None, candidate=event.candidate))


def image(event: ImageEvent) -> pb.GenerateResponse:
    return pb.GenerateResponse(image=pb.Image(
        index=event.index, picture=picture(event.picture), seed=event.seed,
        latents=tensor(event.latents) if event.latents is not None else None, score=event.score))


def summary(event: Summary) -> pb.GenerateResponse:
    return pb.GenerateResponse(summary=pb.Summary(
        seed=event.seed, num_images=event.num_images, prompt_truncated=event.prompt_truncated,
        prompt_tokens=event.prompt_tokens, timings=pb.Timings(**dataclasses.asdict(event.timings)),
        num_steps=event.num_steps,
        candidates=[pb.Candidate(seed=c.seed, score=c.score, returned=c.returned) for c in event.candidates]))


def response(event: Response) -> pb.GenerateResponse:
    """One streamed event of a Generate call (core.py's)."""
    match event:
        case StepEvent():
            return step(event)
        case ImageEvent():
            return image(event)
        case Summary():
            return summary(event)


def model_info(served: ServedModel) -> pb.GetModelInfoResponse:
    """`devices`: every engine's device in --devices order; `device` is the first."""
    model, limits, engine = served.info.model, served.limits, served.engine
    return pb.GetModelInfoResponse(
        base=model.base,
        loras=[pb.LoraInfo(source=lo.source, sha256=lo.sha256, scale=lo.scale) for lo in model.loras],
        dtype=model.dtype,
        device=model.device,
        devices=list(served.devices) or [model.device],
        backend=model.backend,
        limits=pb.Limits(
            max_steps=limits.max_steps, min_side=limits.min_side, max_side=limits.max_side,
            side_multiple=limits.side_multiple, max_images=limits.max_images,
            max_prompt_chars=limits.max_prompt_chars, min_guidance_scale=limits.min_guidance_scale,
            max_guidance_scale=limits.max_guidance_scale, max_batch_size=engine.max_batch_size,
            max_queued_requests=engine.max_queued_requests,
            max_image_bytes=limits.max_image_bytes, max_image_pixels=limits.max_image_pixels,
            max_adapters_per_request=engine.adapters.max_adapters_per_request,
            max_adapters=engine.adapters.max_adapters, max_adapter_rank=engine.adapters.max_adapter_rank,
            max_candidates=limits.max_candidates),
        server_version=served.version,
        decoders=[DECODER_VALUES[d] for d in model.decoders],  # type: ignore[misc]  # ints of the Decoder enum
        default_decoder=DECODER_VALUES[model.default_decoder],  # type: ignore[arg-type]
        jpeg_encoder=served.info.jpeg_encoder,
        backend_details={**{f"graphs.{name}": state for name, state in served.backend.graphs},
                         **{f"fallbacks.{part}": str(calls) for part, calls in served.backend.fallbacks}},
        adapters=[adapter_info(record) for record in served.adapters],
        scorer=scorer_info(model.scorer) if model.scorer is not None else None,
    )


def adapter_info(record: AdapterRecord) -> pb.AdapterInfo:
    """A loaded per-request adapter (GetModelInfo, ListAdapters, LoadAdapter's answer)."""
    return pb.AdapterInfo(name=record.name, source=record.source, sha256=record.sha256, rank=record.rank,
                          targets=list(record.targets), default_scale=record.default_scale, format=record.format,
                          modules=record.modules)


def scorer_info(record: ScorerRecord) -> pb.ScorerInfo:
    """The candidate scorer (GetModelInfo.scorer)."""
    return pb.ScorerInfo(source=record.source, sha256=record.sha256, projection_dim=record.projection_dim,
                         image_size=record.image_size)


# ---- statuses -----------------------------------------------------------------------------------------


class GrpcStatus(NamedTuple):
    """What `context.abort(code, details, trailing_metadata)` sends."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


def status(refusal: Refusal) -> GrpcStatus:
    """A refusal as gRPC sends it: the code of its status's name and its message, with google.rpc
    details when it has any: a BadRequest naming each field, its value and the limit; a RetryInfo
    saying when to retry. A refusal without either is a plain status (no details trailer)."""
    code = grpc.StatusCode[refusal.status.name]
    if not refusal.violations and refusal.retry_after_s is None:
        return GrpcStatus(code, refusal.message)
    rich = status_pb2.Status(code=code_pb2.Code.Value(refusal.status.name), message=refusal.message)
    if refusal.violations:
        rich.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=f"{field} {description}")
            for field, description in refusal.violations]))
    if refusal.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(refusal.retry_after_s * 1e9))
        rich.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    converted = rpc_status.to_status(rich)
    return GrpcStatus(converted.code, converted.details, tuple(converted.trailing_metadata))
