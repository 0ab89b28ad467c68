"""Conversions between lcmserve.v1 protobuf messages and the SDK's dataclasses (``types``).

The only module of the SDK's public surface that touches message classes: requests are built
here from GenerateOptions, and responses become dataclasses here, so no protobuf type leaks
out of the SDK.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

from . import names
from .errors import ProtocolError
from .options import GenerateFields, GenerateOptions, merge_options
from .types import (
    AdapterInfo,
    AdapterList,
    Candidate,
    Decoder,
    GenerateEvent,
    Image,
    Latents,
    Limits,
    LoraInfo,
    ModelInfo,
    OutputFormat,
    Picture,
    PreviewMode,
    SavesImage,
    ScorerInfo,
    StepEvent,
    Summary,
    Timings,
)
from .v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Name <-> enum number, derived from the generated enums once (names.py, which the server uses
# too). The Literal types OutputFormat and PreviewMode list the same names (a test checks it).
OUTPUT_FORMATS = cast("dict[OutputFormat, pb.OutputFormat.ValueType]", names.OUTPUT_FORMAT_VALUES)
PREVIEW_MODES = cast("dict[PreviewMode, pb.PreviewMode.ValueType]", names.PREVIEW_MODE_VALUES)
DECODERS = cast("dict[Decoder, pb.Decoder.ValueType]",
                {names.DEFAULT_DECODER: pb.DECODER_UNSPECIFIED, **names.DECODER_VALUES})

_FORMAT_ALIASES = {"jpg": "jpeg"}
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


# ---- request ---------------------------------------------------------------------------------


def build_generate_request(
    prompt: str, options: GenerateOptions | None = None, **fields: Unpack[GenerateFields]
) -> pb.GenerateRequest:
    """Builds a GenerateRequest from ``options`` (default: all defaults) with ``fields`` changed.

    Only the options given (not None) are set, so the server's defaults apply to the others and
    the server validates ranges (INVALID_ARGUMENT names the field and its limit). Checked here:
    types, names of formats and preview modes (case-insensitive; "jpg" means "jpeg"), and values
    an unsigned field cannot hold. Raises TypeError or ValueError naming the option.
    """
    o = merge_options(options, fields)
    request = pb.GenerateRequest(
        prompt=_check_str("prompt", prompt),
        output_format=OUTPUT_FORMATS[parse_output_format(o.output_format)],
        preview_mode=PREVIEW_MODES[parse_preview_mode(o.preview_mode)],
        include_latents=_check_bool("include_latents", o.include_latents),
        decoder=DECODERS[parse_decoder(o.decoder)],
    )
    if o.negative_prompt is not None:
        request.negative_prompt = _check_str("negative_prompt", o.negative_prompt)
    if o.num_inference_steps is not None:
        request.num_inference_steps = _check_uint("num_inference_steps", o.num_inference_steps, _UINT32_MAX)
    if o.guidance_scale is not None:
        request.guidance_scale = _check_float("guidance_scale", o.guidance_scale)
    if o.seed is not None:
        request.seed = _check_uint("seed", o.seed, _UINT64_MAX)
    if o.width is not None:
        request.width = _check_uint("width", o.width, _UINT32_MAX)
    if o.height is not None:
        request.height = _check_uint("height", o.height, _UINT32_MAX)
    if o.num_images is not None:
        request.num_images = _check_uint("num_images", o.num_images, _UINT32_MAX)
    if o.quality is not None:
        request.quality = _check_uint("quality", o.quality, _UINT32_MAX)
    if o.init_image is not None:
        request.init_image = image_bytes("init_image", o.init_image)
    if o.strength is not None:
        request.strength = _check_float("strength", o.strength)
    if o.mask_image is not None:
        request.mask_image = image_bytes("mask_image", o.mask_image)
    if o.candidates is not None:
        request.candidates = _check_uint("candidates", o.candidates, _UINT32_MAX)
    for name, scale in adapter_weights(o.adapters):
        weight = request.adapters.add(name=name)
        if scale is not None:
            weight.scale = scale
    return request


def adapter_weights(value: object, argument: str = "adapters") -> tuple[tuple[str, float | None], ...]:
    """GenerateOptions.adapters -> (name, scale or None) pairs in request order: a mapping
    ``{"cracks": 0.8}``, or a list of ``(name, scale)`` pairs or bare names (the adapter's default
    scale). Checked here: types, empty names, non-finite scales and a name given twice; the server
    checks the rest (INVALID_ARGUMENT naming ``adapters[i]``: unknown name, range, how many)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{argument} must be a mapping of name to scale or a list of (name, scale) pairs, "
                        f"not a {type(value).__name__} (write {{{value!r}: 1.0}})")
    if isinstance(value, Mapping):
        items: list[object] = list(value.items())
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise TypeError(f"{argument} must be a mapping of name to scale or a list of (name, scale) pairs; "
                        f"got {type(value).__name__}")
    pairs: list[tuple[str, float | None]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            name, scale = item, None
        elif isinstance(item, tuple | list) and len(item) == 2:
            name, scale = item
        else:
            raise TypeError(f"{argument}[{i}] must be a (name, scale) pair or a name; got {item!r}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{argument}[{i}]: the name must be a non-empty str; got {name!r}")
        if scale is not None:
            scale = _check_float(f"{argument}[{i}] ({name}) scale", scale)
            if not math.isfinite(scale):
                raise ValueError(f"{argument}[{i}] ({name}): the scale {scale} is not a finite number")
        if any(name == seen for seen, _ in pairs):
            raise ValueError(f"{argument}[{i}]: {name!r} is named twice; give each adapter once")
        pairs.append((name, scale))
    return tuple(pairs)


def parse_adapter_spec(text: str) -> tuple[str, float | None]:
    """A command line's ``NAME[:SCALE]`` (``cracks:0.8``, ``cracks``) -> (name, scale or None).
    Raises ValueError saying the expected form. (Adapter names hold no ':'.)"""
    name, sep, scale = text.strip().rpartition(":")
    if not sep:
        name, scale = text.strip(), ""
    if not name:
        raise ValueError(f"expected NAME[:SCALE] (e.g. cracks:0.8), got {text!r}")
    if not sep:
        return name, None
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"expected NAME[:SCALE] with SCALE a number (e.g. cracks:0.8), got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r}: the scale must be a finite number")
    return name, value


def image_bytes(argument: str, value: object) -> bytes:
    """An init/mask image as the request carries it: bytes as they are, a file's bytes, a PIL image
    as PNG. The server decodes and checks them (INVALID_ARGUMENT naming the field)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        try:
            return Path(value).read_bytes()
        except OSError as exc:
            raise ValueError(f"{argument}: cannot read {os.fspath(value)!r}: {exc.strerror or exc}") from exc
    if callable(getattr(value, "save", None)):
        buffer = io.BytesIO()
        cast("SavesImage", value).save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"{argument} must be bytes (an encoded PNG, JPEG or WEBP), a path or a PIL image; "
                    f"got {type(value).__name__}")


def parse_output_format(value: object, argument: str = "output_format") -> OutputFormat:
    """Checks an output format name (case-insensitive; "jpg" means "jpeg")."""
    return cast(OutputFormat, _choice(argument, value, tuple(OUTPUT_FORMATS)))


def parse_preview_mode(value: object, argument: str = "preview_mode") -> PreviewMode:
    """Checks a preview mode name (case-insensitive)."""
    return cast(PreviewMode, _choice(argument, value, tuple(PREVIEW_MODES)))


def parse_decoder(value: object, argument: str = "decoder") -> Decoder:
    """Checks a decoder name (case-insensitive; "tiny-vae" means "tiny_vae")."""
    return cast(Decoder, _choice(argument, value, tuple(DECODERS)))


def _choice(argument: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, one of {', '.join(allowed)}; got {type(value).__name__}")
    name = names.canonical_name(value)
    name = _FORMAT_ALIASES.get(name, name)
    if name not in allowed:
        raise ValueError(f"{argument}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    return name


def _check_str(argument: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, got {type(value).__name__}")
    return value


def _check_bool(argument: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be a bool, got {type(value).__name__}")
    return value


def _check_uint(argument: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{argument}={value} is out of range: 0 to {maximum}")
    return value


def _check_float(argument: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


# ---- responses -> dataclasses ----------------------------------------------------------------


def picture_from_proto(message: pb.Picture) -> Picture:
    """Picture message -> Picture (an unset format means JPEG, as the proto says)."""
    fmt = cast("OutputFormat | None", names.output_format_name(message.format))
    if fmt is None:
        raise ProtocolError(f"picture has unknown OutputFormat value {message.format}")
    return Picture(data=message.data, format=fmt, width=message.width, height=message.height)


def latents_from_proto(message: pb.Tensor) -> Latents:
    """Tensor message -> Latents."""
    return Latents(shape=tuple(message.shape), dtype=message.dtype, data=message.data)


def step_event_from_proto(message: pb.StepEvent) -> StepEvent:
    """StepEvent message -> StepEvent (preview and latents None when not sent)."""
    return StepEvent(
        image_index=message.image_index,
        step=message.step,
        num_steps=message.num_steps,
        timestep=message.timestep,
        preview=picture_from_proto(message.preview) if message.HasField("preview") else None,
        latents=latents_from_proto(message.latents) if message.HasField("latents") else None,
        candidate=message.candidate,
    )


def image_from_proto(message: pb.Image) -> Image:
    """Image message -> Image."""
    return Image(
        index=message.index,
        picture=picture_from_proto(message.picture),
        seed=message.seed,
        latents=latents_from_proto(message.latents) if message.HasField("latents") else None,
        score=message.score if message.HasField("score") else None,
    )


def timings_from_proto(message: pb.Timings) -> Timings:
    """Timings message -> Timings (milliseconds)."""
    return Timings(
        queue_ms=message.queue_ms,
        text_ms=message.text_ms,
        unet_ms=message.unet_ms,
        vae_ms=message.vae_ms,
        encode_ms=message.encode_ms,
        total_ms=message.total_ms,
    )


def summary_from_proto(message: pb.Summary) -> Summary:
    """Summary message -> Summary."""
    return Summary(
        seed=message.seed,
        num_images=message.num_images,
        prompt_truncated=message.prompt_truncated,
        prompt_tokens=message.prompt_tokens,
        timings=timings_from_proto(message.timings),
        num_steps=message.num_steps,
        candidates=tuple(Candidate(seed=c.seed, score=c.score, returned=c.returned) for c in message.candidates),
    )


def event_from_proto(message: pb.GenerateResponse) -> GenerateEvent:
    """One GenerateResponse -> StepEvent, Image or Summary."""
    kind = message.WhichOneof("event")
    if kind == "step":
        return step_event_from_proto(message.step)
    if kind == "image":
        return image_from_proto(message.image)
    if kind == "summary":
        return summary_from_proto(message.summary)
    raise ProtocolError("GenerateResponse with no event set (step, image or summary)")


def model_info_from_proto(message: pb.GetModelInfoResponse) -> ModelInfo:
    """GetModelInfoResponse -> ModelInfo."""
    limits = message.limits
    return ModelInfo(
        base=message.base,
        loras=[LoraInfo(source=lo.source, sha256=lo.sha256, scale=lo.scale) for lo in message.loras],
        dtype=message.dtype,
        device=message.device,
        backend=message.backend,
        limits=Limits(
            max_steps=limits.max_steps,
            min_side=limits.min_side,
            max_side=limits.max_side,
            side_multiple=limits.side_multiple,
            max_images=limits.max_images,
            max_prompt_chars=limits.max_prompt_chars,
            min_guidance_scale=limits.min_guidance_scale,
            max_guidance_scale=limits.max_guidance_scale,
            max_batch_size=limits.max_batch_size,
            max_queued_requests=limits.max_queued_requests,
            max_image_bytes=limits.max_image_bytes,
            max_image_pixels=limits.max_image_pixels,
            max_adapters_per_request=limits.max_adapters_per_request,
            max_adapters=limits.max_adapters,
            max_adapter_rank=limits.max_adapter_rank,
            max_candidates=limits.max_candidates,
        ),
        server_version=message.server_version,
        devices=list(message.devices),
        decoders=[names.DECODER_NAMES.get(d, str(d)) for d in message.decoders],
        default_decoder=names.DECODER_NAMES.get(message.default_decoder, ""),
        jpeg_encoder=message.jpeg_encoder,
        backend_details=dict(message.backend_details),
        adapters=[adapter_info_from_proto(a) for a in message.adapters],
        scorer=ScorerInfo(source=message.scorer.source, sha256=message.scorer.sha256,
                          projection_dim=message.scorer.projection_dim, image_size=message.scorer.image_size)
        if message.HasField("scorer") else None,
    )


def adapter_info_from_proto(message: pb.AdapterInfo) -> AdapterInfo:
    """AdapterInfo message -> AdapterInfo."""
    return AdapterInfo(
        name=message.name,
        source=message.source,
        sha256=message.sha256,
        rank=message.rank,
        targets=list(message.targets),
        default_scale=message.default_scale,
        format=message.format,
        modules=message.modules,
    )


def adapter_list_from_proto(message: pb.ListAdaptersResponse) -> AdapterList:
    """ListAdaptersResponse -> AdapterList."""
    return AdapterList(
        adapters=[adapter_info_from_proto(a) for a in message.adapters],
        free_slots=message.free_slots,
        loading_allowed=message.loading_allowed,
    )


def load_adapter_request(name: str, source: str, scale: float | None) -> pb.LoadAdapterRequest:
    """Client.load_adapter's arguments -> LoadAdapterRequest (types checked here, the rest by the server)."""
    request = pb.LoadAdapterRequest(name=_check_str("name", name), source=_check_str("source", source))
    if scale is not None:
        request.scale = _check_float("scale", scale)
    return request


# ---- dataclasses -> messages (for servers and tests speaking the SDK's types) ----------------


def picture_to_proto(picture: Picture) -> pb.Picture:
    """Picture -> Picture message."""
    return pb.Picture(
        data=picture.data,
        format=OUTPUT_FORMATS[picture.format],
        width=picture.width,
        height=picture.height,
    )


def latents_to_proto(latents: Latents) -> pb.Tensor:
    """Latents -> Tensor message."""
    return pb.Tensor(shape=list(latents.shape), dtype=latents.dtype, data=latents.data)


def event_to_proto(event: GenerateEvent) -> pb.GenerateResponse:
    """StepEvent, Image or Summary -> GenerateResponse."""
    if isinstance(event, StepEvent):
        step = pb.StepEvent(
            image_index=event.image_index,
            step=event.step,
            num_steps=event.num_steps,
            timestep=event.timestep,
            candidate=event.candidate,
        )
        if event.preview is not None:
            step.preview.CopyFrom(picture_to_proto(event.preview))
        if event.latents is not None:
            step.latents.CopyFrom(latents_to_proto(event.latents))
        return pb.GenerateResponse(step=step)
    if isinstance(event, Image):
        image = pb.Image(index=event.index, picture=picture_to_proto(event.picture), seed=event.seed,
                         score=event.score)
        if event.latents is not None:
            image.latents.CopyFrom(latents_to_proto(event.latents))
        return pb.GenerateResponse(image=image)
    timings = event.timings
    return pb.GenerateResponse(
        summary=pb.Summary(
            seed=event.seed,
            num_images=event.num_images,
            prompt_truncated=event.prompt_truncated,
            prompt_tokens=event.prompt_tokens,
            num_steps=event.num_steps,
            candidates=[pb.Candidate(seed=c.seed, score=c.score, returned=c.returned) for c in event.candidates],
            timings=pb.Timings(
                queue_ms=timings.queue_ms,
                text_ms=timings.text_ms,
                unet_ms=timings.unet_ms,
                vae_ms=timings.vae_ms,
                encode_ms=timings.encode_ms,
                total_ms=timings.total_ms,
            ),
        )
    )


def model_info_to_proto(info: ModelInfo) -> pb.GetModelInfoResponse:
    """ModelInfo -> GetModelInfoResponse."""
    limits = info.limits
    return pb.GetModelInfoResponse(
        base=info.base,
        loras=[pb.LoraInfo(source=lo.source, sha256=lo.sha256, scale=lo.scale) for lo in info.loras],
        dtype=info.dtype,
        device=info.device,
        backend=info.backend,
        limits=pb.Limits(
            max_steps=limits.max_steps,
            min_side=limits.min_side,
            max_side=limits.max_side,
            side_multiple=limits.side_multiple,
            max_images=limits.max_images,
            max_prompt_chars=limits.max_prompt_chars,
            min_guidance_scale=limits.min_guidance_scale,
            max_guidance_scale=limits.max_guidance_scale,
            max_batch_size=limits.max_batch_size,
            max_queued_requests=limits.max_queued_requests,
            max_image_bytes=limits.max_image_bytes,
            max_image_pixels=limits.max_image_pixels,
            max_adapters_per_request=limits.max_adapters_per_request,
            max_adapters=limits.max_adapters,
            max_adapter_rank=limits.max_adapter_rank,
            max_candidates=limits.max_candidates,
        ),
        server_version=info.server_version,
        devices=list(info.devices),
        decoders=[DECODERS[d] for d in info.decoders if d in DECODERS],
        default_decoder=DECODERS.get(cast(Decoder, info.default_decoder), pb.DECODER_UNSPECIFIED),
        jpeg_encoder=info.jpeg_encoder,
        backend_details=info.backend_details,
        adapters=[
            pb.AdapterInfo(name=a.name, source=a.source, sha256=a.sha256, rank=a.rank, targets=a.targets,
                           default_scale=a.default_scale, format=a.format, modules=a.modules)
            for a in info.adapters
        ],
        scorer=pb.ScorerInfo(source=info.scorer.source, sha256=info.scorer.sha256,
                             projection_dim=info.scorer.projection_dim, image_size=info.scorer.image_size)
        if info.scorer is not None else None,
    )
