"""The OpenAI Images API over the edge core: POST /v1/images/generations (JSON) and /v1/images/edits
(multipart). docs/http.md has the field mapping; in short:

  prompt, negative_prompt, seed, num_inference_steps, guidance_scale, decoder, adapters, candidates
                        -> the GenerateRequest fields of those names (lcmserve's own fields top-level, as
                           vLLM-Omni takes them; the OpenAI SDKs send them with extra_body)
  n -> num_images;  size "WxH" -> width, height ("auto" or absent: 512x512; edits: the image's size)
  output_format png|jpeg|webp (default png);  output_compression -> quality
  response_format       b64_json only (url: 400, lcmserve keeps no files to link to)
  model, quality, background, moderation, style, user, input_fidelity: accepted and ignored
  image, mask, strength (edits) -> init_image, mask_image, strength. A mask with an alpha channel
                           follows OpenAI (fully transparent = repaint) and is turned into the
                           server's grey mask (white = repaint); one without alpha is passed as it is
                           (diffusers' convention: white = repaint).
  stream + partial_images 0-3 -> previews (the tiny VAE's when the model has one, else full decodes)
                           sent as `*.partial_image` events for the last partial_images steps before
                           the final one, then one `*.completed` event per image.

Each image carries its `seed` (and `index`) as extension fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from lcmserve.v1 import generation_pb2 as pb
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...protocol import ImageEvent, StepEvent, Summary
from ..core import Response as CoreEvent
from ..status import Refused
from .common import TRANSPORT, ClientGone, HttpContext, b64, call_info, json_object, read_body, until_disconnect
from .errors import ApiError, bad_request, refusal_error
from .fields import Fields, adapters, size

# GenerateRequest's fields by the names the OpenAI routes give them (an error's `param`).
RENAME = {"width": "size", "height": "size", "num_images": "n", "quality": "output_compression",
          "init_image": "image", "mask_image": "mask", "preview_mode": "partial_images"}
IGNORED = frozenset({"model", "quality", "background", "moderation", "style", "user", "input_fidelity"})
COMMON = frozenset({"prompt", "n", "size", "response_format", "output_format", "output_compression", "stream",
                    "partial_images", "seed", "num_inference_steps", "guidance_scale", "negative_prompt", "decoder",
                    "adapters", "candidates"}) | IGNORED
GENERATION_FIELDS = COMMON
EDIT_FIELDS = COMMON | {"image", "image[]", "mask", "strength"}
FORMATS = {"png": pb.OUTPUT_FORMAT_PNG, "jpeg": pb.OUTPUT_FORMAT_JPEG, "webp": pb.OUTPUT_FORMAT_WEBP}
DECODERS = {"vae": pb.DECODER_VAE, "tiny_vae": pb.DECODER_TINY_VAE, "tiny-vae": pb.DECODER_TINY_VAE}
DEFAULT_SIZE = (512, 512)  # "auto" and absent, for generations


@dataclass(frozen=True)
class ImagesCall:
    """One OpenAI images request, parsed: the GenerateRequest and how to answer it."""

    request: pb.GenerateRequest
    kind: str  # "image_generation" | "image_edit": the streamed events' type prefix
    output_format: str
    stream: bool
    partial_images: int


# ---- routes -----------------------------------------------------------------------------------------


async def generations(ctx: HttpContext, request: Request) -> Response:
    try:
        body = await read_body(request, ctx.generation_limit, "/v1/images/generations")
        fields = Fields(json_object(request, body))
        fields.check_known(GENERATION_FIELDS, "/v1/images/generations")
        call = _call(ctx, fields, "image_generation", DEFAULT_SIZE)
    except ApiError as exc:
        ctx.core.count(exc.status, TRANSPORT, call_info(request))
        return exc.response()
    return await answer(ctx, request, call)


async def edits(ctx: HttpContext, request: Request) -> Response:
    try:
        values = await _form(ctx, request)
        fields = Fields(values, form=True)
        fields.check_known(EDIT_FIELDS, "/v1/images/edits")
        images = [v for name in ("image", "image[]") for v in _as_list(values.get(name))]
        if not images:
            raise bad_request("image", "image is missing; send the image to edit as a file part named 'image'")
        if len(images) > 1:
            raise bad_request("image", f"image has {len(images)} files; lcmserve edits one image per request")
        call = _call(ctx, fields, "image_edit", None)
        call.request.init_image = _file(images[0], "image")
        strength = fields.number("strength")
        if strength is not None:
            call.request.strength = strength
        mask = values.get("mask")
        if mask is not None:
            call.request.mask_image = await asyncio.to_thread(server_mask, _file(mask, "mask"),
                                                              ctx.core.limits.max_image_pixels)
    except ApiError as exc:
        ctx.core.count(exc.status, TRANSPORT, call_info(request))
        return exc.response()
    return await answer(ctx, request, call)


async def answer(ctx: HttpContext, request: Request, call: ImagesCall) -> Response:
    """Run the call on the edge core: one JSON document, or Server-Sent Events when `stream`."""
    events = ctx.core.generate(call.request, None, TRANSPORT, call_info(request))
    try:
        if not call.stream:
            async with contextlib.aclosing(events):
                collected = await until_disconnect(request, _collect(events))
            return JSONResponse(_result(call, collected))
        first = await until_disconnect(request, anext(events))
    except Refused as exc:
        return refusal_error(exc.refusal, RENAME).response()
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    return EventSourceResponse(_sse(call, first, events), ping=15)


# ---- requests -----------------------------------------------------------------------------------------


def _call(ctx: HttpContext, fields: Fields, kind: str, default_size: tuple[int, int] | None) -> ImagesCall:
    prompt = fields.text("prompt")
    if prompt is None:
        raise bad_request("prompt", "prompt is missing; give the text to generate from")
    if fields.choice("response_format", ("b64_json", "url")) == "url":
        raise bad_request("response_format", "response_format is 'url', but lcmserve keeps no files to link to; "
                                             "use b64_json (the default)")
    output_format = fields.choice("output_format", tuple(FORMATS)) or "png"
    request = pb.GenerateRequest(prompt=prompt, output_format=FORMATS[output_format])
    request.negative_prompt = fields.text("negative_prompt") or ""
    sides = size(fields.text("size")) or default_size
    if sides is not None:
        request.width, request.height = sides
    for name, proto_name in (("n", "num_images"), ("output_compression", "quality"),
                             ("num_inference_steps", "num_inference_steps"), ("candidates", "candidates")):
        value = fields.integer(name)
        if value is not None:
            setattr(request, proto_name, value)
    seed = fields.integer("seed", maximum=2**64 - 1)
    if seed is not None:
        request.seed = seed
    guidance = fields.number("guidance_scale")
    if guidance is not None:
        request.guidance_scale = guidance
    decoder = fields.choice("decoder", tuple(DECODERS))
    if decoder is not None:
        request.decoder = DECODERS[decoder]
    raw_adapters = fields.values.get("adapters")
    if isinstance(raw_adapters, str):  # a multipart form carries it as JSON text
        try:
            raw_adapters = json.loads(raw_adapters)
        except ValueError:
            raise bad_request("adapters", "adapters is not JSON; send [{\"name\": ..., \"scale\": ...}]") from None
    for name, scale in adapters(raw_adapters):
        weight = request.adapters.add(name=name)
        if scale is not None:
            weight.scale = scale
    stream = fields.flag("stream")
    partial_images = fields.integer("partial_images") or 0
    if partial_images > 3:
        raise bad_request("partial_images", f"partial_images is {partial_images}; the range is 0 to 3")
    if stream and partial_images:
        request.preview_mode = _preview_mode(ctx)
    else:
        request.preview_mode = pb.PREVIEW_MODE_NONE
    return ImagesCall(request, kind, output_format, stream, partial_images)


def _preview_mode(ctx: HttpContext) -> pb.PreviewMode.ValueType:
    """The tiny VAE's previews when the model has one (cheap), else full decodes."""
    try:
        decoders = ctx.core.model().info.model.decoders
    except Refused:
        return pb.PREVIEW_MODE_FULL  # (the core refuses the call anyway)
    return pb.PREVIEW_MODE_TINY_VAE if "tiny_vae" in decoders else pb.PREVIEW_MODE_FULL


async def _form(ctx: HttpContext, request: Request) -> dict[str, Any]:
    """The multipart form (413 past form_limit): text values, or UploadFiles; a repeated name: a list."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise ApiError(415, f"the content type is {kind or 'missing'!r}; /v1/images/edits takes "
                            "multipart/form-data (image, mask and the other fields as parts)",
                       code="unsupported_media_type")
    body = await read_body(request, ctx.form_limit, "/v1/images/edits")
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=64, max_part_size=ctx.form_limit)
    except Exception as exc:  # noqa: BLE001 - python-multipart's and Starlette's errors: one 400
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise bad_request(None, f"the multipart form does not parse: {str(detail)[:200]}") from None
    values: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in values:
            previous = values[name]
            values[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            values[name] = value
    for name, value in values.items():
        if name not in ("image", "image[]", "mask") and not isinstance(value, str):
            raise bad_request(name, f"{name} is a file or repeated; expected one text value")
    return values


def _as_list(value: object) -> list[object]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _file(value: object, name: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise bad_request(name, f"{name} is text or repeated; send one image file (PNG, JPEG or WEBP) as the part")
    data = value.file.read()
    if not data:
        raise bad_request(name, f"{name} is an empty file")
    return data


def server_mask(data: bytes, max_pixels: int) -> bytes:
    """An OpenAI mask (alpha channel: fully transparent = repaint) -> a grey PNG, white = repaint.
    A mask without alpha, or one that does not open, passes unchanged (the core reports what is wrong)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels or not image.has_transparency_data:
            return data
        alpha = image.convert("RGBA").getchannel("A")
    except Exception:  # noqa: BLE001 - any decode failure: validation says it with the field's name
        return data
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    out = io.BytesIO()
    repaint.save(out, format="PNG")
    return out.getvalue()


# ---- answers ------------------------------------------------------------------------------------------


async def _collect(events: AsyncIterator[CoreEvent]) -> list[CoreEvent]:
    return [event async for event in events]


def _usage(summary: Summary | None) -> dict[str, object]:
    tokens = summary.prompt_tokens if summary is not None else 0
    return {"input_tokens": tokens, "output_tokens": 0, "total_tokens": tokens,
            "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0}}


def _result(call: ImagesCall, events: list[CoreEvent]) -> dict[str, object]:
    images = sorted((e for e in events if isinstance(e, ImageEvent)), key=lambda e: e.index)
    summary = next((e for e in events if isinstance(e, Summary)), None)
    first = images[0].picture if images else None
    return {"created": int(time.time()),
            "data": [{"b64_json": b64(e.picture), "seed": e.seed, "index": e.index} for e in images],
            "output_format": call.output_format,
            "size": f"{first.width}x{first.height}" if first else None,
            "usage": _usage(summary),
            "timings": vars(summary.timings) if summary is not None else None}


class _Renderer:
    """Core events -> OpenAI's stream events: partials for the last `partial_images` steps before the
    final one; each image's completed event once the summary (its usage) is in."""

    def __init__(self, call: ImagesCall) -> None:
        self.call = call
        self.created = int(time.time())
        self.images: list[ImageEvent] = []

    def render(self, event: CoreEvent) -> list[ServerSentEvent]:
        call = self.call
        many = call.request.num_images > 1 if call.request.HasField("num_images") else False
        match event:
            case StepEvent(preview=preview) if preview is not None and call.partial_images:
                first = max(0, event.num_steps - 1 - call.partial_images)
                if not first <= event.step < event.num_steps - 1:
                    return []
                kind = f"{call.kind}.partial_image"
                data: dict[str, object] = {
                    "type": kind, "b64_json": b64(preview),
                    "partial_image_index": event.step - first, "created_at": self.created,
                    "size": f"{preview.width}x{preview.height}", "quality": "auto", "background": "opaque",
                    "output_format": call.output_format}
                if many:
                    data["index"] = event.image_index
                return [ServerSentEvent(json.dumps(data), event=kind)]
            case ImageEvent():
                self.images.append(event)
                return []
            case Summary():
                kind = f"{call.kind}.completed"
                return [ServerSentEvent(json.dumps(self._completed(kind, image, event)), event=kind)
                        for image in sorted(self.images, key=lambda e: e.index)]
        return []

    def _completed(self, kind: str, image: ImageEvent, summary: Summary) -> dict[str, object]:
        picture = image.picture
        data: dict[str, object] = {
            "type": kind, "b64_json": b64(picture), "created_at": self.created,
            "size": f"{picture.width}x{picture.height}", "quality": "auto", "background": "opaque",
            "output_format": self.call.output_format, "usage": _usage(summary), "seed": image.seed}
        if len(self.images) > 1:
            data["index"] = image.index
        return data


async def _sse(call: ImagesCall, first: CoreEvent,
               events: AsyncGenerator[CoreEvent, None]) -> AsyncGenerator[ServerSentEvent, None]:
    """The stream's events; a failure after the first event is an `error` event in OpenAI's shape
    (the status line was sent already)."""
    renderer = _Renderer(call)
    async with contextlib.aclosing(events):
        for sse in renderer.render(first):
            yield sse
        try:
            async for event in events:
                for sse in renderer.render(event):
                    yield sse
        except Refused as exc:
            yield ServerSentEvent(json.dumps(refusal_error(exc.refusal, RENAME).body()), event="error")
