"""The model behind a small, pure boundary: one Runtime, five parts, one typed UNet call.

    encode_text(input_ids)              (B, 77) int64            -> (B, 77, D) text embeddings
    unet(call: UNetCall)                latents (B, 4, h, w), timesteps (B,) int64, text (B, 77, D), and
                                        per-row extras (export/unet_call.py) -> (B, 4, h, w) predicted noise
    vae_decode(latents)                 (B, 4, h, w) unscaled    -> (B, 3, 8h, 8w) pixels in [-1, 1]
    vae_encode(pixels)                  (B, 3, 8h, 8w) in [-1, 1] -> (B, 8, h, w) moments: the mean and
                                        log-variance of the latent distribution (diffusers'
                                        DiagonalGaussianDistribution.parameters), unscaled; the engine
                                        draws the sample itself, from each image's own generator
    tiny_vae_decode(latents), optional  (B, 4, h, w) / tiny scaling -> (B, 3, 8h, 8w) pixels in [-1, 1]
                                        (TAESD's decoder; None when the model has no tiny autoencoder)

Each callable is a `Part` (parts.py): the backend's compiled form where it serves the shape, else the
eager module, in chunks. The backend (eager, compile, aoti, onnx) only provides compiled forms
(compiled.py, compiled_onnx.py); loader.py builds the Runtime and its `ModelSpec`, once. Tensors live
on `spec.device` in `spec.dtype` (timesteps and ids are int64 on the device). All calls run under
`torch.inference_mode()` on the engine's thread; none of them may keep references to their inputs
(the engine reuses buffers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lcmserve.export.artifact import CompiledEntry
from lcmserve.export.records import LoraRecord, ScorerRecord, TinyVaeRecord
from lcmserve.export.unet_call import UNetCall

from .parts import Part

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from .adapters import AdapterSlots
    from .eager import EagerModules
    # The defining module: `from diffusers import LCMScheduler` gives mypy diffusers' dummy class.
    from diffusers.schedulers.scheduling_lcm import LCMScheduler
    from transformers import CLIPTokenizer

    from .scorer import ClipScorer

__all__ = ["BackendDetails", "ModelDims", "ModelSpec", "Runtime", "UNetCall"]


@dataclass(frozen=True)
class ModelDims:
    """The shapes the engine needs, read off the model's configs."""

    latent_channels: int = 4
    vae_scale_factor: int = 8  # pixels per latent along each side
    scaling_factor: float = 0.18215  # SD v1.5's latent scaling (vae.config.scaling_factor)
    text_max_length: int = 77  # CLIP context
    text_hidden_size: int = 768


@dataclass(frozen=True)
class BackendDetails:
    """How the backend serves the model, for GetModelInfo's backend details and the logs."""

    artifact: str | None = None  # the artifact folder a compiled backend serves
    compiled: CompiledEntry | None = None  # its manifest entry
    load_seconds: float | None = None
    warmup_seconds: float | None = None  # compile: running the shapes warmed at export, at load
    aoti_run_single_threaded: bool | None = None  # aoti: packages loaded with run_single_threaded
    torch_compile: Mapping[str, Any] | None = None  # compile: the torch.compile settings served with
    parts: tuple[tuple[str, str], ...] = ()  # part -> "compiled" | "eager" (at the shapes the backend serves)

    def part(self, name: str) -> str | None:
        """"compiled" or "eager" for a part the model has, None for one it lacks."""
        return dict(self.parts).get(name)


@dataclass(frozen=True)
class ModelSpec:
    """What the engine and the edge need to know about the served model, whatever the backend; built
    once, by loader.py."""

    base: str  # hub id, folder or preset name
    dtype: torch.dtype
    device: torch.device
    backend: str  # "eager" | "compile" | "aoti" | "onnx"
    loras: tuple[LoraRecord, ...] = ()  # fused into the model, in order
    latent_channels: int = 4
    vae_scale_factor: int = 8  # pixels per latent along each side
    scaling_factor: float = 0.18215  # SD v1.5's latent scaling (vae.config.scaling_factor)
    text_max_length: int = 77  # CLIP context
    text_hidden_size: int = 768
    decoders: tuple[str, ...] = ("vae",)  # ("vae", "tiny_vae") with a tiny autoencoder
    default_decoder: str = "vae"  # what a request's DECODER_UNSPECIFIED means (serve --default-decoder)
    tiny_vae_scaling_factor: float = 1.0  # the tiny autoencoder's config.scaling_factor (TAESD: 1.0)
    tiny_vae: TinyVaeRecord | None = None  # the tiny autoencoder's record, None without one
    scorer: ScorerRecord | None = None  # the candidate scorer's record (best-of-N: scorer.py), None without one
    # Capabilities. May the engine capture the callables in its CUDA graphs (not ONNX Runtime's, which
    # wait for the device inside each call)? Which per-row UNetCall extras does the UNet read (room for
    # per-request adapters: slot indices, scales)? Does it serve per-request adapters (issue 21)?
    graph_capturable: bool = True
    unet_extras: tuple[str, ...] = ()
    adapters_supported: bool = False
    details: BackendDetails = BackendDetails()


class Runtime:
    """The model callables of the module doc, over its parts, plus what prepares their inputs."""

    def __init__(self, spec: ModelSpec, tokenizer: CLIPTokenizer, scheduler: LCMScheduler,
                 parts: Mapping[str, Part], eager: EagerModules | None = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # only read for its config (alphas, timesteps); the engine steps itself
        self.parts = dict(parts)
        tiny = self.parts.get("tiny_vae_decoder")
        # The tiny autoencoder's decoder, or None (the engine's decoders check for it).
        self.tiny_vae_decode: Callable[[torch.Tensor], torch.Tensor] | None = tiny
        self.scorer: ClipScorer | None = None  # CLIPScore of decoded images (scorer.attach_scorer), None without one
        self._eager = eager
        self.adapters: AdapterSlots | None = None  # per-request adapter slots, once enabled

    def enable_adapters(self, config: AdapterConfig) -> AdapterSlots | None:
        """Give the UNet and text encoder per-request adapter slots (adapters.py), once, before any CUDA
        graph is captured; None when this backend serves no adapters (aoti, onnx: their UNet and text
        encoder are exported graphs without the slots; a request with adapters is then refused). The
        compile backend's slots are in its eager modules: a UNet call with adapters runs there (counted
        as an eager fallback), one without runs the compiled graph."""
        if self.adapters is not None:
            return self.adapters
        if self._eager is None or self.parts["text_encoder"].compiled is not None or (
                self.parts["unet"].compiled is not None and self.spec.backend != "compile"):
            return None
        self.adapters = self._eager.install_adapters(config)
        for name in ("unet", "text_encoder"):
            self.parts[name].rebuild_eager()
        from .adapters import ADAPTER_EXTRAS

        self.spec = dataclasses.replace(self.spec, unet_extras=ADAPTER_EXTRAS, adapters_supported=True)
        return self.adapters

    def encode_text(self, input_ids: torch.Tensor, extras: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """`extras`: the rows' adapter slots (N, K) int64 and scales (N, K), with adapter slots enabled."""
        # As StableDiffusionPipeline.encode_prompt: last hidden state, no attention mask for CLIP.
        return self.parts["text_encoder"](input_ids.to(torch.int64), *extras).to(self.spec.dtype)

    def unet(self, call: UNetCall) -> torch.Tensor:
        unread = [name for name in call.extra_names if name not in self.spec.unet_extras]
        if unread:
            raise ValueError(f"this model's UNet reads no {', '.join(unread)} (its extras: "
                             f"{', '.join(self.spec.unet_extras) or 'none'})")
        part = self.parts["unet"]
        if call.extras and part.compiled is not None:  # the compiled graph has no adapter slots
            return part.run_eagerly(call.positional(), "a call with adapters")
        return part(*call.positional())

    def example_unet_call(self, rows: int, latent_h: int, latent_w: int, adapters: int = 0) -> UNetCall:
        """A valid UNet call of `rows` rows at one latent size (every input the UNet reads, on the device
        in its dtype): what CUDA-graph captures and warm-ups run. `adapters`: K > 0 adds the adapter
        extras, K entries per row (slot 0, scale 0), when the model has adapter slots."""
        spec = self.spec
        extras: tuple[tuple[str, torch.Tensor], ...] = ()
        if adapters and spec.adapters_supported:
            extras = tuple(zip(spec.unet_extras, (
                torch.zeros(rows, adapters, dtype=torch.long, device=spec.device),
                torch.zeros(rows, adapters, dtype=spec.dtype, device=spec.device))))
        return UNetCall(
            torch.randn(rows, spec.latent_channels, latent_h, latent_w, device=spec.device, dtype=spec.dtype),
            torch.full((rows,), 999, dtype=torch.long, device=spec.device),
            torch.zeros(rows, spec.text_max_length, spec.text_hidden_size, device=spec.device, dtype=spec.dtype),
            extras)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.parts["vae_decoder"](latents)

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.parts["vae_encoder"](pixels)

    def fallbacks(self) -> dict[str, int]:
        """Per part, the calls run eagerly because the compiled part does not serve their shape (for
        /metrics: lcmserve_eager_fallback_calls_total)."""
        return {name: part.fallbacks for name, part in self.parts.items() if part.compiled is not None}
