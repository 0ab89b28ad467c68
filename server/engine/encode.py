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

from ..protocol import HostTensor, ImageEvent, Picture, StepEvent
from .work import Request

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



# ---- the encoder pool's jobs: one event each, its picture encoded ----------------------------------


def host_tensors(latents: torch.Tensor) -> list[HostTensor]:
    """(B, ...) on the device -> B float32 host tensors (one copy off the device for the batch; waits)."""
    host = latents.float().contiguous().cpu()
    return [HostTensor(tuple(row.shape), row.numpy().astype("<f4").tobytes()) for row in host]


def encode_step_event(request: Request, pixels: torch.Tensor | Picture, event: StepEvent) -> StepEvent:
    """A step event with its preview: host pixels encoded here, or a picture the GPU encoded."""
    p = request.params
    picture, ms = (pixels, 0.0) if isinstance(pixels, Picture) else encode(pixels.numpy(), p.output_format, p.quality)
    request.add_encode_ms(ms)
    return StepEvent(event.image_index, event.step, event.num_steps, event.timestep, picture, event.latents)


def encode_image_event(request: Request, pixels: torch.Tensor | Picture, index: int, seed: int,
                       latents: HostTensor | None, score: float | None = None) -> ImageEvent:
    """A final image's event: host pixels encoded here, or a picture the GPU encoded (`score`: its
    CLIPScore, when the engine has a scorer)."""
    p = request.params
    picture, ms = (pixels, 0.0) if isinstance(pixels, Picture) else encode(pixels.numpy(), p.output_format, p.quality)
    request.add_encode_ms(ms, image=True)
    return ImageEvent(index, seed, picture, latents, score)


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


PROBE_SHAPE = (3, 512, 512)  # the probe is a real image size: nvjpeg set-up failures show at size, not at 8x8


def probe_jpeg(encode_jpeg: EncodeJpeg, device: torch.device) -> None:
    """Encode one PROBE_SHAPE image on `device`; raises unless a JPEG comes back."""
    probe = torch.zeros(PROBE_SHAPE, dtype=torch.uint8, device=device)
    if not encode_jpeg([probe], 90)[0].cpu().numpy().tobytes().startswith(b"\xff\xd8"):
        raise RuntimeError("encode_jpeg returned no JPEG")


def _torchvision_encode_jpeg(device: torch.device) -> EncodeJpeg:
    """torchvision.io.encode_jpeg, tried once on `device` (a torchvision built without nvjpeg, or for
    another CUDA, fails here rather than on a request)."""
    # optional (not installable beside every torch build), and without type information
    from torchvision.io import encode_jpeg  # type: ignore[import-not-found, import-untyped, unused-ignore]

    def encode(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
        result: list[torch.Tensor] = encode_jpeg(images, quality)
        return result

    probe_jpeg(encode, device)
    return encode


def select_jpeg_encoder(device: torch.device,
                        load: Callable[[torch.device], EncodeJpeg] = _torchvision_encode_jpeg) -> GpuJpeg | None:
    """GPU JPEG on a CUDA device when `load` (torchvision's encode_jpeg, probed at 3x512x512) works
    there, else None: the host encoder (PIL in the encoder threads). Whatever goes wrong in the
    selection (an import, a missing library, a CUDA or nvjpeg error) falls back to the host encoder
    with one log line: GPU JPEG is a speed-up, never a reason not to serve."""
    if device.type != "cuda":
        return None
    try:
        encoder = GpuJpeg(load(device))
    except ImportError as exc:
        log.info("JPEG on the host (PIL): torchvision is not importable (%s)", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of an optional speed-up means the host encoder
        log.warning("JPEG on the host (PIL): GPU JPEG (torchvision's encode_jpeg) failed on %s: %s: %s",
                    device, type(exc).__name__, exc)
        return None
    log.info("JPEG on the GPU: torchvision's encode_jpeg (nvjpeg) on %s", device)
    return encoder
