"""Pixels -> bytes on the host (JPEG, PNG, WEBP, RAW), JPEG on the GPU, and the cheap latent preview.

Encoding runs in the engine's thread pool, never on the gRPC event loop nor the model's thread:
PNG and WEBP of a 512x512 image cost 50-70 ms of CPU (measured on an H100 host), more than the whole GPU pipeline.
On CUDA, JPEG is encoded on the device instead when torchvision is importable (`select_jpeg_encoder`:
nvjpeg, 0.18 ms against 2.4 ms on the host at 512x512), in the engine's thread, before the pixels
leave the device: only the JPEG bytes are copied to the host. torchvision is optional and imported
lazily (it is not installable beside every torch build).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..protocol import Picture

# Linear map from SD v1.5's 4 latent channels to RGB in about [-1, 1] (a widely used fit; rows are
# latent channels, columns R, G, B). Good enough to watch a picture form; not a decoder.
LATENT_RGB_FACTORS = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.6431],
])


def to_uint8_chw(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, 3, H, W) uint8 on its device, rounded as diffusers does."""
    unit = (pixels / 2 + 0.5).clamp(0, 1).float()  # as VaeImageProcessor.postprocess
    return (unit * 255).round().to(torch.uint8)


def to_host_hwc(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 on the device -> (B, H, W, 3) uint8 on the host (one copy; waits for the device)."""
    return pixels.permute(0, 2, 3, 1).contiguous().cpu()


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the host, rounded as diffusers does."""
    return to_host_hwc(to_uint8_chw(pixels))


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



# ---- JPEG on the GPU ---------------------------------------------------------------------------------

log = logging.getLogger("lcmserve.encode")
EncodeJpeg = Callable[[list[torch.Tensor], int], list[torch.Tensor]]  # torchvision.io.encode_jpeg's list form


class GpuJpeg:
    """JPEG of (B, 3, H, W) uint8 device tensors with `encode_jpeg` (torchvision's nvjpeg on CUDA):
    one batched call per quality; only the JPEG bytes are copied to the host."""

    def __init__(self, encode_jpeg: EncodeJpeg) -> None:
        self.encode_jpeg = encode_jpeg

    def __call__(self, pixels: torch.Tensor, qualities: Sequence[int]) -> list[Picture]:
        height, width = int(pixels.shape[2]), int(pixels.shape[3])
        out: dict[int, Picture] = {}
        for quality in sorted(set(qualities)):
            rows = [i for i, q in enumerate(qualities) if q == quality]
            encoded = self.encode_jpeg([pixels[i] for i in rows], quality)
            for i, data in zip(rows, encoded, strict=True):
                out[i] = Picture(data.cpu().numpy().tobytes(), "jpeg", width, height)
        return [out[i] for i in range(len(qualities))]


def _torchvision_encode_jpeg(device: torch.device) -> EncodeJpeg:
    """torchvision.io.encode_jpeg, tried once on `device` (a torchvision built without nvjpeg, or for
    another CUDA, fails here rather than on a request). Raises ImportError or RuntimeError."""
    # optional (not installable beside every torch build), and without type information
    from torchvision.io import encode_jpeg  # type: ignore[import-not-found, import-untyped, unused-ignore]

    probe = torch.zeros(3, 8, 8, dtype=torch.uint8, device=device)
    if not encode_jpeg([probe], 90)[0].cpu().numpy().tobytes().startswith(b"\xff\xd8"):
        raise RuntimeError("torchvision.io.encode_jpeg returned no JPEG")

    def encode(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
        result: list[torch.Tensor] = encode_jpeg(images, quality)
        return result

    return encode


def select_jpeg_encoder(device: torch.device,
                        load: Callable[[torch.device], EncodeJpeg] = _torchvision_encode_jpeg) -> GpuJpeg | None:
    """GPU JPEG on a CUDA device when `load` (torchvision's encode_jpeg) works there, else None: the
    host encoder (PIL in the encoder threads). Logs which, and why not the GPU."""
    if device.type != "cuda":
        return None
    try:
        encoder = GpuJpeg(load(device))
    except ImportError as exc:
        log.info("JPEG on the host (PIL): torchvision is not importable (%s)", exc)
        return None
    except RuntimeError as exc:
        log.warning("JPEG on the host (PIL): torchvision's encode_jpeg failed on %s (%s)", device, exc)
        return None
    log.info("JPEG on the GPU: torchvision's encode_jpeg (nvjpeg) on %s", device)
    return encoder
