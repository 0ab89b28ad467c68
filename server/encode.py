"""Pixels -> bytes on the host (JPEG, PNG, WEBP, RAW), and the cheap latent preview.

Encoding runs in the engine's thread pool, never on the gRPC event loop nor the model's thread:
PNG and WEBP of a 512x512 image cost 50-70 ms of CPU (measured on an H100 host), more than the whole GPU pipeline.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from .protocol import Picture

# Linear map from SD v1.5's 4 latent channels to RGB in about [-1, 1] (a widely used fit; rows are
# latent channels, columns R, G, B). Good enough to watch a picture form; not a decoder.
LATENT_RGB_FACTORS = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.6431],
])


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the host, rounded as diffusers does."""
    unit = (pixels / 2 + 0.5).clamp(0, 1).float()  # as VaeImageProcessor.postprocess
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def approx_preview(latents: torch.Tensor) -> torch.Tensor:
    """Denoised latents (B, 4, h, w) -> (B, h, w, 3) uint8 on the host: a linear projection, no VAE."""
    factors = LATENT_RGB_FACTORS.to(latents.device, latents.dtype)
    rgb = torch.einsum("bchw,cr->brhw", latents, factors)  # (B, 3, h, w), about [-1, 1]
    return to_uint8(rgb)


def encode(image: np.ndarray, fmt: str, quality: int) -> tuple[Picture, float]:
    """(H, W, 3) uint8 RGB -> (the encoded picture, ms it took)."""
    start = time.perf_counter()
    height, width = image.shape[:2]
    if fmt == "raw":
        data = np.ascontiguousarray(image).tobytes()
    else:
        from PIL import Image

        buf = io.BytesIO()
        pil = Image.fromarray(image)  # (H, W, 3) uint8 -> RGB
        if fmt == "jpeg":
            pil.save(buf, format="JPEG", quality=quality)
        elif fmt == "webp":
            pil.save(buf, format="WEBP", quality=quality)
        elif fmt == "png":
            pil.save(buf, format="PNG", compress_level=1)  # level 1: 3-5x faster than 6, a little larger
        else:
            raise ValueError(f"unknown format {fmt!r}; expected jpeg, png, webp or raw")
        data = buf.getvalue()
    return Picture(data, fmt, width, height), (time.perf_counter() - start) * 1e3

