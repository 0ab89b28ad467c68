"""The engine's decoders: denoised latents -> uint8 pixels on the host, per decoder, in batches.

    "vae"       the model's AutoencoderKL decoder (runtime.vae_decode); input latents / vae scaling
                (0.18215 for SD v1.5), as diffusers' pipeline divides them
    "tiny_vae"  the tiny autoencoder's decoder (TAESD, runtime.tiny_vae_decode, when the model has
                one); input latents / its own scaling factor (1.0 for TAESD): the same division
                diffusers' pipeline makes with `vae=AutoencoderTiny`

Both give (B, 3, 8h, 8w) in [-1, 1], rounded to uint8 as diffusers' postprocess does. On CUDA each
decoder is replayed from CUDA graphs per padded batch (cuda_graphs.py), as the UNet is. The engine
decodes one (resolution, decoder) group at a time (a batch has one shape and one decoder). Rows to
be JPEG-encoded are encoded on the device when GPU JPEG runs (encode.select_jpeg_encoder), and come
back as Pictures; the others as host pixels for the encoder threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import EngineConfig
from .encode import GpuJpeg, to_host_hwc, to_uint8_chw
from ..protocol import Picture
from ..model.runtime import Runtime
from .rows import pick

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


class Decoders:
    """Name -> (decode callable, latent scaling factor) for the decoders the model has."""

    def __init__(self, runtime: Runtime, config: EngineConfig, graphs: bool, gpu_jpeg: GpuJpeg | None = None) -> None:
        spec = runtime.spec
        self.spec = spec
        self.batch_size = config.vae_batch_size
        self.gpu_jpeg = gpu_jpeg
        self.jpeg_encoder = "gpu" if gpu_jpeg is not None else "host"  # GetModelInfo.jpeg_encoder
        self._fns: dict[str, tuple[DecodeFn, float]] = {"vae": (runtime.vae_decode, spec.scaling_factor)}
        if runtime.tiny_vae_decode is not None:
            self._fns["tiny_vae"] = (runtime.tiny_vae_decode, spec.tiny_vae_scaling_factor)
        if graphs:
            from .cuda_graphs import BucketedGraphs

            buckets = tuple(b for b in config.buckets if b <= config.vae_batch_size)
            self._fns = {name: (BucketedGraphs(fn, buckets, name=name), scale)
                         for name, (fn, scale) in self._fns.items()}

    @property
    def callables(self) -> tuple[DecodeFn, ...]:
        return tuple(fn for fn, _ in self._fns.values())

    @property
    def names(self) -> tuple[str, ...]:
        """The decoders this model has: ("vae",) or ("vae", "tiny_vae")."""
        return tuple(self._fns)

    def resolve(self, name: str) -> str:
        """A request's decoder name ("unspecified" means the server's default) -> the one that runs."""
        return self.spec.default_decoder if name == "unspecified" else name

    def missing(self, decoder: str, preview_mode: str) -> tuple[str, str] | None:
        """(field, problem) when a request asks for a decoder this model lacks, else None."""
        if self.resolve(decoder) not in self._fns:
            return "decoder", f"is {decoder}, but the model has no tiny autoencoder (decoders: {', '.join(self.names)})"
        if preview_mode == "tiny_vae" and "tiny_vae" not in self._fns:
            return "preview_mode", f"is tiny_vae, but the model has no tiny autoencoder (decoders: {', '.join(self.names)})"
        return None

    def __call__(self, name: str, denoised: torch.Tensor, dtype: torch.dtype,
                 jpeg: Sequence[int | None] = (),
                 on_pixels: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor | Picture]:
        """Denoised latents (B, 4, h, w) float32 -> per row (8h, 8w, 3) uint8 on the host, or its JPEG
        Picture when jpeg[row] is a quality and GPU JPEG runs; in batches of at most vae_batch_size.
        Waits for the device (pixels or JPEG bytes are copied to the host). `on_pixels(first row,
        (b, 3, H, W) uint8)` sees each batch on the device first (the scorer: candidates.py)."""
        fn, scaling = self._fns[self.resolve(name)]
        scaled = (denoised / scaling).to(dtype)  # as diffusers: latents / vae.config.scaling_factor
        qualities = list(jpeg) + [None] * (len(scaled) - len(jpeg))
        out: list[torch.Tensor | Picture] = []
        for start in range(0, len(scaled), self.batch_size):
            pixels = to_uint8_chw(fn(scaled[start: start + self.batch_size]))  # (b, 3, H, W) uint8 on the device
            if on_pixels is not None:
                on_pixels(start, pixels)
            out.extend(self._to_host(pixels, qualities[start: start + len(pixels)]))
        return out

    def _to_host(self, pixels: torch.Tensor, qualities: list[int | None]) -> list[torch.Tensor | Picture]:
        on_gpu = [i for i, q in enumerate(qualities) if q is not None] if self.gpu_jpeg is not None else []
        rows: list[torch.Tensor | Picture] = [torch.empty(0)] * len(qualities)
        if on_gpu and self.gpu_jpeg is not None:
            for i, picture in zip(on_gpu, self.gpu_jpeg(pick(pixels, on_gpu), [q for q in qualities if q is not None])):
                rows[i] = picture
        on_host = [i for i in range(len(qualities)) if i not in on_gpu]
        if on_host:
            for i, host in zip(on_host, to_host_hwc(pick(pixels, on_host))):
                rows[i] = host
        return rows

    def capture(self, latent_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> int:
        """Capture every bucket's graph of every decoder for one latent shape (C, h, w); 0 without graphs."""
        from .cuda_graphs import BucketedGraphs

        count = 0
        for fn, _ in self._fns.values():
            if isinstance(fn, BucketedGraphs):
                for bucket in fn.buckets:
                    fn(torch.randn(bucket, *latent_shape, device=device, dtype=dtype))
                    count += 1
        return count
