"""GenerateRequest -> GenerationParams, or every problem with it, each naming field, value and limit."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from lcmserve.names import decoder_name, output_format_name, preview_mode_name
from lcmserve.v1 import generation_pb2 as pb

from ..config import MAX_ADAPTER_SCALE, AdapterConfig, Limits
from .images import PreparedImages
from ..protocol import GenerationParams, ModelFacts

# The request's `optional` scalar fields: unset means the default.
OptionalField = Literal["num_inference_steps", "guidance_scale", "width", "height", "num_images", "seed", "quality",
                        "strength"]
MAX_SEED = 2**63 - 1
MessageT = TypeVar("MessageT", bound=Message)


@dataclass(frozen=True)
class Defaults:
    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    width: int = 512
    height: int = 512
    num_images: int = 1
    quality: int = 90
    strength: float = 0.8  # with init_image (diffusers' img2img default)


class UndecodableRequest(ValueError):
    """The request bytes are not a message of the expected type (truncated, corrupted, or a string
    field that is not UTF-8). The message is plain text for the client: no Python class names."""


def parse(raw: bytes, message_type: type[MessageT]) -> MessageT:
    """Request bytes -> message; the edge registers its handlers without a deserializer so that a
    decode failure is an INVALID_ARGUMENT it answers, not gRPC's UNKNOWN naming a Python class."""
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        name = message_type.DESCRIPTOR.full_name
        if "UTF-8" in str(exc):
            raise UndecodableRequest(f"a string field of the {name} is not valid UTF-8 (prompt and "
                                     "negative_prompt must be UTF-8 text)") from None
        raise UndecodableRequest(f"the request's {len(raw)} bytes are not a valid {name} message "
                                 "(truncated or corrupted protobuf)") from None


class InvalidRequest(Exception):
    """One or more fields are out of range: (field, description) pairs for google.rpc.BadRequest."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))


def validate(request: pb.GenerateRequest, tokenizer: Any, limits: Limits = Limits(),
             defaults: Defaults = Defaults(), images: PreparedImages | None = None,
             decoders: tuple[str, ...] | None = None, default_decoder: str = "vae",
             adapters: Mapping[str, float] | None = None,
             max_adapters_per_request: int = AdapterConfig.max_adapters_per_request,
             adapters_off: str | None = None,
             has_scorer: bool = False) -> GenerationParams:
    """Check every field (collecting all problems), tokenize the prompts, fill defaults.

    `decoders`: those the model has (ModelSpec.decoders) and `default_decoder` what DECODER_UNSPECIFIED
    means; with None the decoder is left "unspecified" and the engine resolves and checks it.

    `images`: the request's init/mask images as images.prepare_images made them (off the event
    loop); required when the request has either (they are then reported missing otherwise).

    `adapters`: the loaded adapters' default scales by name (None: none loaded); a request naming
    another is refused, listing these names. `adapters_off`: why this server serves no adapters at all
    (`adapters_off_reason`), None when it does. `has_scorer`: the model has a candidate scorer
    (candidates > 1 needs one)."""
    bad: list[tuple[str, str]] = []

    def value(name: OptionalField, default: Any) -> Any:
        return getattr(request, name) if request.HasField(name) else default

    prompt = request.prompt
    if not prompt.strip():
        bad.append(("prompt", ("is empty; give the text to generate from (1 to "
                              f"{limits.max_prompt_chars} characters)")))
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if len(text) > limits.max_prompt_chars:
            bad.append((name, f"has {len(text)} characters; the limit is {limits.max_prompt_chars}"))

    steps = value("num_inference_steps", defaults.num_inference_steps)
    if not 1 <= steps <= limits.max_steps:
        bad.append(("num_inference_steps", f"is {steps}; LCM takes 1 to {limits.max_steps} steps"))

    guidance = value("guidance_scale", defaults.guidance_scale)
    if not math.isfinite(guidance) or not limits.min_guidance_scale <= guidance <= limits.max_guidance_scale:
        bad.append(("guidance_scale", (f"is {guidance:g}; the range is {limits.min_guidance_scale:g} to "
                                      f"{limits.max_guidance_scale:g} (1.0 means no guidance)")))

    sides = {}
    if images is None and (request.init_image or request.mask_image):
        images = PreparedImages(None, None, None, None, (("init_image", "was not decoded by the server"),))
    width_default = images.default_width if images and images.default_width is not None else defaults.width
    height_default = images.default_height if images and images.default_height is not None else defaults.height
    side_fields: tuple[tuple[Literal["width", "height"], int], ...] = (("width", width_default),
                                                                       ("height", height_default))
    for name, default in side_fields:
        side = value(name, default)
        sides[name] = side
        if not limits.min_side <= side <= limits.max_side or side % limits.side_multiple:
            bad.append((name, (f"is {side}; it must be {limits.min_side} to {limits.max_side} pixels, "
                              f"a multiple of {limits.side_multiple}")))

    num_images = value("num_images", defaults.num_images)
    if not 1 <= num_images <= limits.max_images:
        bad.append(("num_images", f"is {num_images}; the range is 1 to {limits.max_images}"))

    seed = value("seed", None)
    if seed is not None and seed > MAX_SEED:
        bad.append(("seed", f"is {seed}; the range is 0 to 2^63 - 1"))

    quality = value("quality", defaults.quality)
    if not 1 <= quality <= 100:
        bad.append(("quality", f"is {quality}; the range is 1 to 100"))

    output_format = output_format_name(request.output_format)
    if output_format is None:
        bad.append(("output_format", (f"is {request.output_format}, not a known OutputFormat value "
                                     f"({', '.join(pb.OutputFormat.keys())})")))
    preview_mode = preview_mode_name(request.preview_mode)
    if preview_mode is None:
        bad.append(("preview_mode", (f"is {request.preview_mode}, not a known PreviewMode value "
                                    f"({', '.join(pb.PreviewMode.keys())})")))
    decoder = decoder_name(request.decoder)
    if decoder is None:
        bad.append(("decoder", f"is {request.decoder}, not a known Decoder value ({', '.join(pb.Decoder.keys())})"))
    elif decoders is not None:
        decoder = default_decoder if decoder == "unspecified" else decoder
        for name, wanted in (("decoder", decoder), ("preview_mode", preview_mode)):
            if wanted == "tiny_vae" and "tiny_vae" not in decoders:
                bad.append((name, f"is tiny_vae, but the model has no tiny autoencoder (decoders: {', '.join(decoders)})"))
    # float32 on the wire: back to the decimal the client wrote (0.6, not 0.6000000238), so that
    # int(num_inference_steps * strength) counts the steps as diffusers does with that number.
    strength = float(str(np.float32(request.strength))) if request.HasField("strength") else defaults.strength
    if request.HasField("strength") and not request.init_image:
        bad.append(("strength", f"is {strength:g} without init_image; strength says how far an init_image is noised"))
    elif request.init_image and (not math.isfinite(strength) or not 0 < strength <= 1):
        bad.append(("strength", f"is {strength:g}; the range is above 0 to 1 (1 repaints the whole image)"))
    elif request.init_image and 1 <= steps <= limits.max_steps and int(steps * strength) < 1:
        bad.append(("strength", (f"is {strength:g}, which runs int({steps} * {strength:g}) = 0 of the {steps} "
                                 f"steps; it must be at least 1/num_inference_steps = {1 / steps:.4g}")))
    if images is not None:
        bad.extend(images.violations)
    if adapters_off is not None and request.adapters:
        bad.append(("adapters", f"names {len(request.adapters)} adapter(s), but {adapters_off}"))
        weights: tuple[tuple[str, float], ...] = ()
    else:
        weights = check_adapters(request.adapters, adapters or {}, max_adapters_per_request, bad)
    candidates = request.candidates if request.HasField("candidates") else 1
    if not 1 <= candidates <= limits.max_candidates:
        bad.append(("candidates", f"is {candidates}; the range is 1 to {limits.max_candidates}"))
    elif candidates > 1 and not has_scorer:
        bad.append(("candidates", f"is {candidates}, but the server has no scorer to pick the best: serve with "
                                  "--scorer SRC (or an artifact exported with --scorer), or send candidates 1"))
    if bad or output_format is None or preview_mode is None or decoder is None:
        raise InvalidRequest(bad)

    prompt_ids, prompt_tokens, truncated = tokenize(tokenizer, prompt)
    negative_ids, _, negative_truncated = tokenize(tokenizer, request.negative_prompt)
    return GenerationParams(
        prompt_ids=prompt_ids,
        negative_ids=negative_ids,
        num_steps=steps,
        guidance_scale=float(guidance),
        seed=secrets.randbelow(2**31) if seed is None else seed,
        width=sides["width"],
        height=sides["height"],
        num_images=num_images,
        output_format=output_format,
        quality=quality,
        preview_mode=preview_mode,
        include_latents=request.include_latents,
        prompt_truncated=truncated or (guidance > 1 and negative_truncated),
        prompt_tokens=prompt_tokens,
        decoder=decoder,
        init_image=images.init_image if images else None,
        mask_image=images.mask_image if images else None,
        strength=float(strength) if request.init_image else 1.0,
        adapters=weights,
        candidates=candidates,
        prompt=prompt,
    )


def adapters_off_reason(model: ModelFacts) -> str | None:
    """Why a server serves no per-request adapters (no adapter slots), or None when it does."""
    if model.adapters_supported:
        return None
    if model.backend != "eager":
        return (f"the {model.backend} backend serves no per-request adapters (its UNet is compiled without "
                "adapter slots; serve with --backend eager, or fuse the LoRA at export)")
    return "this server was started without adapters (serve --adapter NAME=SRC, or --allow-adapter-loading)"


def check_adapters(requested: Sequence[pb.AdapterWeight], loaded: Mapping[str, float], most: int,
                   bad: list[tuple[str, str]]) -> tuple[tuple[str, float], ...]:
    """GenerateRequest.adapters -> (name, scale) in request order, each scale given or the adapter's
    default; each problem appended to `bad`, naming adapters[i].name or adapters[i].scale."""
    if len(requested) > most:
        bad.append(("adapters", f"names {len(requested)} adapters; at most {most} per request"))
    known = ", ".join(sorted(loaded)) or "none"
    weights: list[tuple[str, float]] = []
    first: dict[str, int] = {}
    for i, weight in enumerate(requested):
        name = weight.name
        if name in first:
            bad.append((f"adapters[{i}].name", f"is {name!r}, named already as adapters[{first[name]}].name; "
                                               "give each adapter once (scales of one adapter do not add up)"))
            continue
        first[name] = i
        if name not in loaded:
            bad.append((f"adapters[{i}].name", f"is {name!r}, which is not loaded; loaded adapters: {known}"))
            continue
        scale = weight.scale if weight.HasField("scale") else loaded[name]
        if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
            bad.append((f"adapters[{i}].scale", f"is {scale:g}; the range is -{MAX_ADAPTER_SCALE:g} to "
                                                f"{MAX_ADAPTER_SCALE:g} (1.0 is full strength, 0 turns it off)"))
            continue
        weights.append((name, float(scale)))
    return tuple(weights)


def tokenize(tokenizer: Any, text: str) -> tuple[tuple[int, ...], int, bool]:
    """Text -> (77 CLIP ids as diffusers' encode_prompt makes them, tokens before truncation, truncated?)."""
    max_length = tokenizer.model_max_length
    ids = tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids
    full = len(tokenizer(text, truncation=False).input_ids)
    return tuple(ids), full, full > max_length
