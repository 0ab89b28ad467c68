"""init_image / mask_image bytes -> the pixels an img2img or inpainting request starts from.

Runs at the edge while validating, in a worker thread (`asyncio.to_thread`): decoding and resizing a
photo costs milliseconds to tens of milliseconds of CPU, which must not stall the gRPC event loop,
nor the engine's loop (it only ever sees the resized uint8 pixels). PIL and numpy only: no torch.

The pixels are what diffusers' `VaeImageProcessor.preprocess(image, height, width)` makes of a PIL
image before it turns them into floats (the engine does that part, server/img2img.py):
  init image  RGB (grey, palette and RGBA converted to RGB), resized to (width, height) with
              Lanczos (PIL's `resize`, reducing_gap None; an image already that size is unchanged)
  mask        as the inpaint pipeline's mask processor: resized the same way in its own mode, then
              converted to grey ("L"); the engine binarizes it at 0.5 (white = repaint)
Width and height default to the init image's size floored to a multiple of 8, as diffusers'
`get_default_height_width` does. EXIF orientation is applied first, as diffusers' `load_image` does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from lcmserve.v1 import generation_pb2 as pb

from ..config import Limits

FORMATS = ("PNG", "JPEG", "WEBP")
ImageField = Literal["init_image", "mask_image"]


@dataclass(frozen=True)
class ImageLimits:
    """Per image field: encoded bytes, and pixels once decoded (a guard against decompression bombs)."""

    max_bytes: int
    max_pixels: int


def image_limits(limits: Limits) -> ImageLimits:
    """The largest image a request may carry (Limits.max_image_bytes: the share of
    `Limits.max_request_bytes` kept for each image) and its most pixels (Limits.max_image_pixels)."""
    return ImageLimits(max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)


@dataclass(frozen=True)
class PreparedImages:
    """What validation needs of a request's images. Pixels are None where an image is absent, did
    not decode (then `violations` says why) or the target size is out of range (validation says so)."""

    default_width: int | None  # the init image's size floored to a multiple of 8, when it decoded
    default_height: int | None
    init_image: bytes | None  # (height, width, 3) uint8 RGB at the request's size
    mask_image: bytes | None  # (height, width) uint8 grey at the request's size
    violations: tuple[tuple[str, str], ...] = ()


def prepare_images(request: pb.GenerateRequest, limits: Limits) -> PreparedImages:
    """Decode, check and resize the request's init and mask images (call it off the event loop)."""
    bad: list[tuple[str, str]] = []
    init = _open("init_image", request.init_image, limits, bad) if request.init_image else None
    mask = _open("mask_image", request.mask_image, limits, bad) if request.mask_image else None
    if request.mask_image and not request.init_image:
        bad.append(("mask_image", "is set without init_image; inpainting repaints part of an init_image"))
    if init is None:
        return PreparedImages(None, None, None, None, tuple(bad))
    multiple = limits.side_multiple
    default_width, default_height = init.width - init.width % multiple, init.height - init.height % multiple
    width = request.width if request.HasField("width") else default_width
    height = request.height if request.HasField("height") else default_height
    sides_ok = all(limits.min_side <= side <= limits.max_side and side % multiple == 0 for side in (width, height))
    init_pixels = mask_pixels = None
    if sides_ok:  # (otherwise validation reports the width or height)
        try:
            init_pixels = _pixels(_resize(_to_rgb(init), width, height))
        except (ValueError, OSError) as exc:  # a pixel mode PIL cannot convert (e.g. 16-bit grey)
            bad.append(("init_image", f"has pixel mode {init.mode!r}, which does not convert to RGB ({exc})"))
        if mask is not None:
            try:
                mask_pixels = _pixels(_resize(mask, width, height).convert("L"))
            except (ValueError, OSError) as exc:
                bad.append(("mask_image", f"has pixel mode {mask.mode!r}, which does not convert to grey ({exc})"))
    return PreparedImages(default_width, default_height, init_pixels, mask_pixels, tuple(bad))


def _open(field: ImageField, data: bytes, limits: Limits, bad: list[tuple[str, str]]) -> Any | None:
    """Encoded bytes -> a loaded PIL image (EXIF orientation applied), or None with a violation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    allowed = image_limits(limits)
    if len(data) > allowed.max_bytes:
        bad.append((field, f"has {len(data)} bytes; the limit is {allowed.max_bytes} (send a smaller image)"))
        return None
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        bad.append((field, f"is not a PNG, JPEG or WEBP image ({len(data)} bytes that PIL cannot identify)"))
        return None
    if image.format not in FORMATS:
        bad.append((field, f"is a {image.format} image; send PNG, JPEG or WEBP"))
        return None
    width, height = image.size
    if width * height > allowed.max_pixels:
        bad.append((field, f"is {width}x{height} = {width * height} pixels; the limit is {allowed.max_pixels}"))
        return None
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        bad.append((field, f"does not decode as {image.format}: {exc}"))
        return None


def _to_rgb(image: Any) -> Any:
    """RGB as is; grey replicated, palette expanded, alpha dropped (PIL's convert, as diffusers'
    `do_convert_rgb`)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize(image: Any, width: int, height: int) -> Any:
    """As VaeImageProcessor.resize(resize_mode="default") on a PIL image."""
    from PIL import Image

    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def _pixels(image: Any) -> bytes:
    """A PIL image -> its uint8 pixels, row-major: (H, W, 3) for RGB, (H, W) for L."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()
