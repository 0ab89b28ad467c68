"""The model behind a small, pure boundary: three callables the engine runs.

    encode_text(input_ids)              (B, 77) int64            -> (B, 77, D) text embeddings
    unet(latents, timesteps, text)      (B, 4, h, w), (B,) int64, (B, 77, D) -> (B, 4, h, w) predicted noise
    vae_decode(latents)                 (B, 4, h, w) unscaled    -> (B, 3, 8h, 8w) pixels in [-1, 1]

Tensors live on `spec.device` in `spec.dtype` (timesteps and ids are int64 on the device). The engine
does not know which backend runs them: eager PyTorch here, compiled ones in `runtimes_compiled`
(torch.compile, AOTInductor, ONNX Runtime). All calls run under `torch.inference_mode()` on the
engine's thread; none of them may keep references to their inputs (the engine reuses buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer


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


class Runtime(Protocol):
    """The three model callables plus what is needed to prepare their inputs."""

    spec: ModelSpec
    tokenizer: CLIPTokenizer
    scheduler: LCMScheduler  # only read for its config (alphas, timesteps); the engine steps itself

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class EagerRuntime:
    """Plain PyTorch modules of a (fused) StableDiffusionPipeline."""

    def __init__(self, pipe: StableDiffusionPipeline, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer = pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.text_encoder = pipe.text_encoder.eval()
        self.unet_module = pipe.unet.eval()
        self.vae = pipe.vae.eval()

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        # As StableDiffusionPipeline.encode_prompt: last hidden state, no attention mask for CLIP.
        return self.text_encoder(input_ids)[0].to(self.spec.dtype)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet_module(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def spec_from_pipeline(pipe: StableDiffusionPipeline, *, base: str, backend: str,
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
