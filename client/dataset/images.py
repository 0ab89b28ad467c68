"""Init images and masks as the server sees them, for the dataset's sizes and labels.

The server (server/edge/images.py) follows diffusers' VaeImageProcessor: EXIF orientation applied,
width and height defaulting to the init image's size floored to a multiple of 8, and the mask
resized to (width, height) with Lanczos in its own mode, then made grey ("L"); the engine
binarizes it at 0.5 (white = repaint). The dataset job does the same here, with Pillow, so that an
inpainting image's `_mask.png` label is the mask the server used, pixel for pixel, at the image's
size. Needs Pillow (not in the plain install); only init-image specs use this module.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .spec import DatasetError

SIDE_MULTIPLE = 8  # pixels: the server's GetModelInfo limits.side_multiple
MIN_SIDE, MAX_SIDE = 64, 1024  # pixels: the spec's (and the server's default) range of width and height


def _pil() -> tuple[Any, Any]:
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise DatasetError("init_images and masks need Pillow, which lcmserve does not install: "
                           "pip install pillow") from exc
    return Image, ImageOps


def _open(key: str, path: Path) -> Any:
    """A loaded PIL image with its EXIF orientation applied (as the server's, and diffusers' load_image)."""
    image_mod, ops = _pil()
    try:
        with image_mod.open(path) as image:
            image.load()
            return ops.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{key}: {path} does not open as an image: {exc}") from exc


def default_size(path: Path) -> tuple[int, int]:
    """(width, height) of a request from this init image without width/height in the spec: the
    image's size floored to a multiple of 8, as the server and `lcmserve generate` take it."""
    width, height = _open("init_images", path).size
    size = (width - width % SIDE_MULTIPLE, height - height % SIDE_MULTIPLE)
    if not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
        raise DatasetError(f"init_images: {path.name} is {width}x{height}, which makes {size[0]}x{size[1]} "
                           f"images, out of {MIN_SIDE} to {MAX_SIDE}: set width and height in the spec")
    return size


def mask_label(path: Path, width: int, height: int) -> bytes:
    """PNG bytes of the mask as the server uses it for a (width, height) request: resized with
    Lanczos in its own mode (reducing_gap None; unchanged at that size), then grey."""
    image_mod, _ = _pil()
    mask = _open("masks", path)
    label = mask.resize((width, height), resample=image_mod.Resampling.LANCZOS, reducing_gap=None).convert("L")
    buffer = io.BytesIO()
    label.save(buffer, format="PNG")
    return buffer.getvalue()
