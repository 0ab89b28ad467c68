"""The aoti and compile providers: the compiled forms of the parts, from `compiled/<backend>/`.

    aoti     AOTInductor packages (`.pt2`, made by `torch.export` + `aoti_compile_and_package`) of the
             UNet, VAE decoder and encoder, text encoder, and the tiny autoencoder's decoder when the
             artifact has one. Loading unzips and dlopens them: seconds.
    compile  torch.compile (inductor) of the UNet and VAE decode, and of the tiny autoencoder's decoder
             where the export warmed it (an artifact with tiny_vae/), started from the compile cache
             that the export saved (`torch.compiler.save_cache_artifacts`); the text encoder and VAE
             encoder stay eager.

What each serves (parts.py runs every other shape on the eager modules of model/): aoti, the manifest
entry's `served` (export/artifact.py): batch 1..63 per call (larger batches in chunks), UNet latent
sides that are multiples of 2**(UNet upsamplers) and VAE sides in the image range. compile, only the
shapes the export warmed (latent sides, and batches from the smallest warmed to the largest, in chunks
of the largest), run after the warm-up under torch's "fail_on_recompile" stance: a call that would
still compile (a guard the warm-up did not cover) is declined and runs eagerly. So a served compile
artifact never compiles in the middle of traffic (issue 18, item 2); a cold compile takes minutes.

Both providers' callables may be captured in the engine's own CUDA graphs (server/engine/cuda_graphs.py):
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lcmserve.export.adapters import compile_parts, compile_tiny_vae_decoder, copy_cpp_kernels, warm_compiled, warm_decoder
from lcmserve.export.artifact import TINY_VAE_DIR, AotiEntry, CompileEntry
from lcmserve.export.pipeline import load_part

from .compiled_common import ArtifactModel, served_by_export
from .parts import Compiled, Fn, NotServed

log = logging.getLogger("lcmserve.compiled")


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


class AotiProvider:
    """AOTInductor packages; every call runs compiled code on the current stream (no host syncs with
    static-range shapes), so the engine may capture them in CUDA graphs."""

    backend = "aoti"
    graph_capturable = True

    def __init__(self, model: ArtifactModel, entry: AotiEntry) -> None:
        self.model = model
        self.entry = entry
        device = model.device
        index = device.index if device.type == "cuda" and device.index is not None else -1
        load = torch._inductor.aoti_load_package
        kwargs = aoti_load_kwargs(load)
        self.single_threaded = bool(kwargs.get("run_single_threaded"))
        # OPTIONAL_PARTS (vae_encoder, tiny_vae_decoder) may be absent: those run eagerly.
        self._packages: dict[str, Fn] = {
            part: load(str(model.artifact_dir / entry.files[part]), device_index=index, **kwargs)
            for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tiny_vae_decoder")
            if part in entry.files}

    def _compiled(self, part: str) -> Compiled:
        package = self._packages[part]

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            return package(*(x.contiguous() for x in inputs))

        return served_by_export(run, self.entry.served, part, self.model.dims.vae_scale_factor)

    def compiled(self) -> dict[str, Compiled]:
        return {part: self._compiled(part) for part in self._packages if part != "tiny_vae_decoder"}

    def tiny_vae_decoder(self) -> Compiled | None:
        return self._compiled("tiny_vae_decoder") if "tiny_vae_decoder" in self._packages else None

    def details(self) -> dict[str, Any]:
        return {"aoti_run_single_threaded": self.single_threaded}


def serving_compile_settings(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The torch.compile kwargs to serve with: the recorded ones, less mode="reduce-overhead" (an
    artifact from before the default mode; see export/adapters.py `compile_settings`)."""
    settings = dict(recorded)
    if settings.get("mode") == "reduce-overhead":
        del settings["mode"]
        log.warning("compile artifact recorded mode='reduce-overhead': serving in the default mode (the engine "
                    "captures its own CUDA graphs); its compile cache will not hit, so re-export it")
    return settings


def no_recompile(fn: Fn) -> Fn:
    """`fn` (a torch.compile'd module) under the "fail_on_recompile" stance: a call that dynamo would
    have to compile raises NotServed instead (parts.py then runs it eagerly)."""

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.compiler.set_stance("fail_on_recompile"):
            try:
                return fn(*inputs)
            except RuntimeError as exc:
                if not str(exc).startswith("Detected recompile"):
                    raise
                shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
                guards = [line.strip(" -") for line in str(exc).splitlines() if line.strip().startswith("- ")]
                why = f": {guards[0]}" if guards else ""
                raise NotServed(f"a call of shapes {shapes} (it would compile a new graph{why})") from None

    return run


def served_by_warmup(fn: Fn, shapes: Sequence[tuple[int, int, int]], part: str) -> Compiled:
    """The compiled form of a part warmed at `shapes` ((batch, latent_h, latent_w) each): it serves the
    warmed latent sides, from the smallest warmed batch up, in chunks of the largest."""
    sides = sorted({(h, w) for _, h, w in shapes})
    batches = [b for b, _, _ in shapes]
    lo, hi = (min(batches), max(batches)) if batches else (1, 1)

    def serves(inputs: Sequence[torch.Tensor]) -> str | None:
        x = inputs[0]
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in sides:
            return f"latent size {size[0]}x{size[1]}"
        if min(x.shape[0], hi) < lo:
            return f"batch {x.shape[0]}"
        return None

    served = f"latent sizes {', '.join(f'{h}x{w}' for h, w in sides)} at batch {lo}..{hi} (warmed at export)"
    return Compiled(fn=fn, serves=serves, max_rows=hi, served=served)


class TorchCompileProvider:
    """torch.compile of the UNet and VAE decode from the artifact's compile cache, in inductor's default
    mode (the C++ wrapper on the CPU): no graphs of its own, so the engine captures these callables in
    its bucketed CUDA graphs. Batches past the largest warmed one run in chunks (diffusers' upsampler
    branches on batch >= 64, which would compile one more graph)."""

    backend = "compile"
    graph_capturable = True

    def __init__(self, model: ArtifactModel, entry: CompileEntry, *, warmup: bool = True) -> None:
        self.model = model
        self.entry = entry
        self.settings = serving_compile_settings(entry.torch_compile)
        self.warmup = warmup
        self.warmup_seconds: float | None = None
        device, dtype, dims = model.device, model.dtype, model.dims
        cache = model.artifact_dir / entry.files["cache"]
        t0 = time.perf_counter()
        torch.compiler.load_cache_artifacts(cache.read_bytes())
        kernels = 0
        if "cpp_kernels" in entry.files:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            kernels = copy_cpp_kernels(model.artifact_dir / entry.files["cpp_kernels"], Path(cache_dir()))
        log.info("loaded compile cache %s (%.1f MB, %d C++ kernels installed) in %.1f s", cache,
                 cache.stat().st_size / 1e6, kernels, time.perf_counter() - t0)
        unet = load_part("unet", model.model_dir, dtype).to(device)
        vae = load_part("vae", model.model_dir, dtype).to(device)
        self._unet, self._vae = compile_parts(unet, vae, entry.optimizations, self.settings)
        if warmup:
            t0 = time.perf_counter()
            warm_compiled(self._unet, self._vae, entry.warm_shapes, device=device, dtype=dtype,
                          latent_channels=dims.latent_channels, text_len=dims.text_max_length,
                          text_dim=dims.text_hidden_size)
            self.warmup_seconds = round(time.perf_counter() - t0, 3)

    def _served(self, fn: Fn, part: str) -> Compiled:
        # Without the warm-up, the warm shapes compile on first use (from the cache): no stance then.
        return served_by_warmup(no_recompile(fn) if self.warmup else fn, self.entry.warm_shapes.get(part, ()), part)

    def compiled(self) -> dict[str, Compiled]:
        return {"unet": self._served(self._unet, "unet"), "vae_decoder": self._served(self._vae, "vae_decoder")}

    def tiny_vae_decoder(self) -> Compiled | None:
        """The tiny decoder compiled as the export compiled it (the artifact's tiny_vae/, same rewrites and
        settings) and warmed at its recorded warm shapes, which the loaded cache holds. None for an
        artifact whose export did not compile it."""
        shapes = self.entry.warm_shapes.get("tiny_vae_decoder")
        if shapes is None:
            return None
        from lcmserve.export.tiny_vae import load_tiny_vae

        model, dims = self.model, self.model.dims
        module, _ = load_tiny_vae(str(model.artifact_dir / TINY_VAE_DIR), dtype=model.dtype, device=model.device,
                                  latent_channels=dims.latent_channels, vae_scale_factor=dims.vae_scale_factor)
        tiny = compile_tiny_vae_decoder(module, self.entry.optimizations, self.settings)
        if self.warmup:
            t0 = time.perf_counter()
            warm_decoder(tiny, shapes, device=model.device, dtype=model.dtype, latent_channels=dims.latent_channels)
            self.warmup_seconds = round((self.warmup_seconds or 0.0) + time.perf_counter() - t0, 3)
        return self._served(tiny, "tiny_vae_decoder")

    def details(self) -> dict[str, Any]:
        return {"warmup_seconds": self.warmup_seconds, "torch_compile": self.settings}
