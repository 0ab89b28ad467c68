"""The model behind a small, pure boundary: four callables the engine runs.

    encode_text(input_ids)              (B, 77) int64            -> (B, 77, D) text embeddings
    unet(latents, timesteps, text)      (B, 4, h, w), (B,) int64, (B, 77, D) -> (B, 4, h, w) predicted noise
    vae_decode(latents)                 (B, 4, h, w) unscaled    -> (B, 3, 8h, 8w) pixels in [-1, 1]
    vae_encode(pixels)                  (B, 3, 8h, 8w) in [-1, 1] -> (B, 8, h, w) moments: the mean and
                                        log-variance of the latent distribution (diffusers'
                                        DiagonalGaussianDistribution.parameters), unscaled; the engine
                                        draws the sample itself, from each image's own generator
    tiny_vae_decode(latents), optional  (B, 4, h, w) / tiny scaling -> (B, 3, 8h, 8w) pixels in [-1, 1]
                                        (TAESD's decoder; None when the model has no tiny autoencoder)

Tensors live on `spec.device` in `spec.dtype` (timesteps and ids are int64 on the device). The engine
does not know which backend runs them: eager PyTorch here, compiled ones in compiled.py (AOTInductor,
torch.compile) and compiled_onnx.py (ONNX Runtime); loader.py picks one. All calls run under
`torch.inference_mode()` on the engine's thread; none of them may keep references to their inputs
(the engine reuses buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lcmserve.export.pipeline import as_module

if TYPE_CHECKING:
    # The defining module: `from diffusers import LCMScheduler` gives mypy diffusers' dummy class.
    from diffusers.schedulers.scheduling_lcm import LCMScheduler
    from transformers import CLIPTokenizer

    from lcmserve.export.pipeline import SDPipeline


@dataclass(frozen=True)
class ModelSpec:
    """What the engine and the edge need to know about the served model, whatever the backend."""

    base: str  # hub id, folder or preset name
    dtype: torch.dtype
    device: torch.device
    backend: str  # "eager" | "compile" | "aoti" | "onnx"
    loras: tuple[dict[str, Any], ...] = ()  # manifest records: source, sha256, scale, format
    latent_channels: int = 4
    vae_scale_factor: int = 8  # pixels per latent along each side
    scaling_factor: float = 0.18215  # SD v1.5's latent scaling (vae.config.scaling_factor)
    text_max_length: int = 77  # CLIP context
    text_hidden_size: int = 768
    extra: dict[str, Any] = field(default_factory=dict)  # backend details for model info / logs
    decoders: tuple[str, ...] = ("vae",)  # ("vae", "tiny_vae") with a tiny autoencoder
    default_decoder: str = "vae"  # what a request's DECODER_UNSPECIFIED means (serve --default-decoder)
    tiny_vae_scaling_factor: float = 1.0  # the tiny autoencoder's config.scaling_factor (TAESD: 1.0)
    tiny_vae: dict[str, Any] | None = None  # its manifest record (source, sha256), None without one


class Runtime(Protocol):
    """The four model callables plus what is needed to prepare their inputs."""

    spec: ModelSpec
    tokenizer: CLIPTokenizer
    scheduler: LCMScheduler  # only read for its config (alphas, timesteps); the engine steps itself

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    # The tiny autoencoder's decoder, or None (loader.attach_tiny_vae sets it on any runtime).
    tiny_vae_decode: Callable[[torch.Tensor], torch.Tensor] | None


class EagerRuntime:
    """Plain PyTorch modules of a (fused) StableDiffusionPipeline."""

    def __init__(self, pipe: SDPipeline, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer: CLIPTokenizer = pipe.tokenizer
        self.scheduler: LCMScheduler = pipe.scheduler
        self.text_encoder = as_module(pipe.text_encoder).eval()
        self.unet_module = as_module(pipe.unet).eval()
        self.vae = as_module(pipe.vae).eval()
        self._vae_decode: Callable[..., Any] = getattr(self.vae, "decode")  # AutoencoderKL.decode
        self._vae_encode: Callable[..., Any] = getattr(self.vae, "encode")  # AutoencoderKL.encode
        self.tiny_vae_decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        # As StableDiffusionPipeline.encode_prompt: last hidden state, no attention mask for CLIP.
        hidden: torch.Tensor = self.text_encoder(input_ids)[0]
        return hidden.to(self.spec.dtype)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        noise: torch.Tensor = self.unet_module(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return noise

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels: torch.Tensor = self._vae_decode(latents, return_dict=False)[0]
        return pixels

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # AutoencoderKL.encode -> (DiagonalGaussianDistribution,); its parameters are the moments.
        moments: torch.Tensor = self._vae_encode(pixels, return_dict=False)[0].parameters
        return moments


def spec_from_pipeline(pipe: SDPipeline, *, base: str, backend: str,
                       loras: tuple[dict[str, Any], ...] = ()) -> ModelSpec:
    """Read the shapes the engine needs off a loaded pipeline."""
    return ModelSpec(
        base=base,
        dtype=pipe.unet.dtype,
        device=pipe.unet.device,
        backend=backend,
        loras=loras,
        latent_channels=int(pipe.unet.config.in_channels),
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
        scaling_factor=float(pipe.vae.config.scaling_factor),
        text_max_length=int(pipe.tokenizer.model_max_length),
        text_hidden_size=int(pipe.text_encoder.config.hidden_size),
    )
