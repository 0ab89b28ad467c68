"""The aoti and compile runtimes: the `Runtime` boundary of runtime.py served from `compiled/<backend>/`.

    aoti     AOTInductor packages (`.pt2`, made by `torch.export` + `aoti_compile_and_package`) of the
             UNet, VAE decoder and encoder, text encoder, and the tiny autoencoder's decoder when the
             artifact has one. Loading unzips and dlopens them: seconds.
    compile  torch.compile (inductor) of the UNet and VAE decode, and of the tiny autoencoder's decoder
             where the export warmed it (an artifact with tiny_vae/), started from the compile cache
             that the export saved (`torch.compiler.save_cache_artifacts`); the text encoder and VAE
             encoder stay eager.

What each artifact serves is its manifest entry's `served` (export/artifact.py): batch 1..63 per call
(larger batches run in chunks); for aoti, UNet latent sides that are multiples of 2**(UNet
upsamplers) and VAE sides in the image range, other sides on the eager modules of model/
(compiled_common.py); compile: any shape, the warm shapes without a cold compile.

Both runtimes' callables may be captured in the engine's own CUDA graphs (server/engine/cuda_graphs.py):
  - aoti packages are loaded with `run_single_threaded=True`. Without it the AOTInductor runner
    guards its model container with a CUDA event recorded on the current stream; during the
    engine's first capture that stream is the capture stream, so the event becomes a captured
    event, and the next call (the next bucket's warm-up) queries it, which CUDA forbids: every batch
    above 1 would fail. Single-threaded also means: call them from one thread at a time (the
    engine's loop is one thread; warm-up runs before it starts).
  - compile runs inductor's default mode, not "reduce-overhead" (why: export/adapters.py
    `compile_settings`); an older artifact that recorded reduce-overhead is served in the default
    mode, with a warning that its cache will not hit.

Choosing among backends, and refusing an artifact made for another machine, happen in loader.py.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lcmserve.export.adapters import (
    TextEncode,
    compile_parts,
    compile_tiny_vae_decoder,
    copy_cpp_kernels,
    warm_compiled,
    warm_decoder,
)
from lcmserve.export.artifact import TINY_VAE_DIR, AotiEntry, CompileEntry, Manifest
from lcmserve.export.pipeline import load_part

from .compiled_common import CompiledRuntimeBase, batch_timesteps, chunked

log = logging.getLogger("lcmserve.compiled")

AotiPart = Callable[..., torch.Tensor]


def aoti_load_kwargs(load: Callable[..., Any]) -> dict[str, Any]:
    """Keyword arguments for `load` (torch._inductor.aoti_load_package): `run_single_threaded=True`
    where this torch has it (2.6 and later, 2.11 and 2.13 included), else none, with a logged note:
    such a torch's packages then cannot be captured in CUDA graphs past the first one."""
    if "run_single_threaded" in inspect.signature(load).parameters:
        return {"run_single_threaded": True}
    log.warning("torch %s: aoti_load_package has no run_single_threaded argument; AOTInductor parts "
                "captured in CUDA graphs may fail after the first capture (serve with --no-cuda-graphs)",
                torch.__version__)
    return {}


class AOTIRuntime(CompiledRuntimeBase):
    """AOTInductor packages; every call runs compiled code on the current stream (no host syncs with
    static-range shapes), so the engine may capture them in CUDA graphs."""

    backend = "aoti"

    def __init__(self, artifact_dir: Path, manifest: Manifest, entry: AotiEntry, device: torch.device,
                 *, warmup: bool = True) -> None:
        super().__init__(artifact_dir, manifest, entry, device)
        index = device.index if device.type == "cuda" and device.index is not None else -1
        load = torch._inductor.aoti_load_package
        kwargs = aoti_load_kwargs(load)
        self.spec.extra["aoti_run_single_threaded"] = bool(kwargs.get("run_single_threaded"))
        # OPTIONAL_PARTS (vae_encoder, tiny_vae_decoder) may be absent: those run eagerly.
        self._parts: dict[str, AotiPart] = {
            part: load(str(artifact_dir / entry.files[part]), device_index=index, **kwargs)
            for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tiny_vae_decoder")
            if part in entry.files}

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return chunked(self._parts["text_encoder"], input_ids.to(torch.int64).contiguous())

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        timesteps = batch_timesteps(timesteps, latents.shape[0])
        if not self.unet_serves(latents):
            noise: torch.Tensor = self.eager_part("unet", tuple(latents.shape))(latents, timesteps, text)
            return noise
        return chunked(self._parts["unet"], latents.contiguous(), timesteps, text.contiguous())

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.vae_serves(latents):
            pixels: torch.Tensor = self.eager_part("vae_decoder", tuple(latents.shape))(latents)
            return pixels
        return chunked(self._parts["vae_decoder"], latents.contiguous())

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.spec.vae_scale_factor
        if "vae_encoder" not in self._parts or not self.vae_serves(pixels[:, :, ::f, ::f]):
            return super().vae_encode(pixels)  # eager, logged
        return chunked(self._parts["vae_encoder"], pixels.contiguous())

    def compiled_tiny_vae_decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        part = self._parts.get("tiny_vae_decoder")
        if part is None:
            return None

        def run(latents: torch.Tensor) -> torch.Tensor:
            return chunked(part, latents.contiguous())

        return run


def serving_compile_settings(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The torch.compile kwargs to serve with: the recorded ones, less mode="reduce-overhead" (an
    artifact from before the default mode; see export/adapters.py `compile_settings`)."""
    settings = dict(recorded)
    if settings.get("mode") == "reduce-overhead":
        del settings["mode"]
        log.warning("compile artifact recorded mode='reduce-overhead': serving in the default mode (the engine "
                    "captures its own CUDA graphs); its compile cache will not hit, so re-export it")
    return settings


class TorchCompileRuntime(CompiledRuntimeBase):
    """torch.compile of the UNet and VAE decode from the artifact's compile cache, in inductor's default
    mode (the C++ wrapper on the CPU): no graphs of its own, so the engine captures these callables in
    its bucketed CUDA graphs (`cuda_graph_capturable` True). Batches past 63 run in chunks as for
    aoti: diffusers' upsampler branches on batch >= 64, which would compile one more graph."""

    backend = "compile"

    def __init__(self, artifact_dir: Path, manifest: Manifest, entry: CompileEntry, device: torch.device,
                 *, warmup: bool = True) -> None:
        super().__init__(artifact_dir, manifest, entry, device)
        self.settings = serving_compile_settings(entry.torch_compile)
        self._warmup = warmup
        self._tiny_shapes = entry.warm_shapes.get("tiny_vae_decoder")  # None: the export did not compile it
        self._tiny: Callable[[torch.Tensor], torch.Tensor] | None = None
        cache = artifact_dir / entry.files["cache"]
        t0 = time.perf_counter()
        torch.compiler.load_cache_artifacts(cache.read_bytes())
        kernels = 0
        if "cpp_kernels" in entry.files:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            kernels = copy_cpp_kernels(artifact_dir / entry.files["cpp_kernels"], Path(cache_dir()))
        log.info("loaded compile cache %s (%.1f MB, %d C++ kernels installed) in %.1f s", cache,
                 cache.stat().st_size / 1e6, kernels, time.perf_counter() - t0)
        self._text = TextEncode(load_part("text_encoder", self.model_dir, self.dtype).to(device)).eval()
        unet = load_part("unet", self.model_dir, self.dtype).to(device)
        vae = load_part("vae", self.model_dir, self.dtype).to(device)
        self._unet, self._vae = compile_parts(unet, vae, entry.optimizations, self.settings)
        if warmup:
            t0 = time.perf_counter()
            warm_compiled(self._unet, self._vae, entry.warm_shapes, device=device, dtype=self.dtype,
                          latent_channels=self.spec.latent_channels, text_len=self.spec.text_max_length,
                          text_dim=self.spec.text_hidden_size)
            self.spec.extra["warmup_seconds"] = round(time.perf_counter() - t0, 3)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self._text(input_ids)
        return hidden

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return chunked(self._unet, latents, batch_timesteps(timesteps, latents.shape[0]), text)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return chunked(self._vae, latents)

    def compiled_tiny_vae_decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The tiny decoder compiled as the export compiled it (the artifact's tiny_vae/, same rewrites and
        settings) and warmed at its recorded warm shapes, which the loaded cache holds: built on the first
        call (loader.attach_tiny_vae, at load), so a runtime serving another tiny autoencoder never compiles
        it. None for an artifact whose export did not compile it."""
        shapes = self._tiny_shapes
        if shapes is None:
            return None
        if self._tiny is None:
            from lcmserve.export.tiny_vae import load_tiny_vae

            module, _ = load_tiny_vae(str(self.artifact_dir / TINY_VAE_DIR), dtype=self.dtype, device=self.device,
                                      latent_channels=self.spec.latent_channels,
                                      vae_scale_factor=self.spec.vae_scale_factor)
            self._tiny = compile_tiny_vae_decoder(module, self.entry.optimizations, self.settings)
            if self._warmup:
                t0 = time.perf_counter()
                warm_decoder(self._tiny, shapes, device=self.device, dtype=self.dtype,
                             latent_channels=self.spec.latent_channels)
                self.spec.extra["tiny_vae_warmup_seconds"] = round(time.perf_counter() - t0, 3)
        tiny = self._tiny

        def run(latents: torch.Tensor) -> torch.Tensor:
            return chunked(tiny, latents)

        return run
