"""What every compiled runtime shares: tokenizer, scheduler, spec, served shapes, the eager fallback.

The runtimes themselves are leaves that import this module and nothing of each other:
compiled.py (aoti, compile) and compiled_onnx.py (onnx). Which one serves is decided in loader.py.

Shapes outside what the exported graphs hold (`Served` in the manifest entry) run on the eager
modules of model/, loaded the first time one comes and logged once per shape; batches past
MAX_BATCH run in near-equal chunks. The tiny autoencoder's decoder (an artifact with tiny_vae/)
is the compiled part `tiny_vae_decoder` where the artifact has one, else eager (`serve_tiny_vae`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lcmserve.export.adapters import UNetStep, VaeDecode, VaeEncode
from lcmserve.export.artifact import MAX_BATCH, MODEL_DIR, CompiledEntry, Manifest
from lcmserve.export.loading import parse_dtype
from lcmserve.export.pipeline import lcm_scheduler, load_part

from .runtime import ModelSpec

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_lcm import LCMScheduler  # not diffusers' dummy class (runtime.py)
    from transformers import CLIPTokenizer

log = logging.getLogger("lcmserve.compiled")


def chunked(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn over the batch in near-equal chunks of at most MAX_BATCH rows (the exported batch range),
    concatenated: 64 rows run as 32 + 32, not 63 + 1."""
    n = inputs[0].shape[0]
    if n <= MAX_BATCH:
        return fn(*inputs)
    chunks = -(-n // MAX_BATCH)
    size = -(-n // chunks)
    return torch.cat([fn(*(x[i:i + size] for x in inputs)) for i in range(0, n, size)])


def batch_timesteps(timesteps: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) int64, also from a scalar timestep."""
    return timesteps.to(torch.int64).reshape(-1).expand(batch).contiguous()


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


class CompiledRuntimeBase:
    """The Runtime boundary (runtime.py) over an artifact's compiled/<backend>/; subclasses give the
    three callables. `graph_capturable`: may the engine capture these callables in its own CUDA
    graphs (spec.extra["cuda_graph_capturable"])?"""

    backend = ""
    graph_capturable = True

    def __init__(self, artifact_dir: Path, manifest: Manifest, entry: CompiledEntry, device: torch.device) -> None:
        import transformers

        self.artifact_dir = artifact_dir
        self.model_dir = artifact_dir / MODEL_DIR
        self.entry = entry
        self.device = device
        self.dtype = parse_dtype(entry.dtype)
        index = _read_json(self.model_dir / "model_index.json")
        tokenizer_cls = getattr(transformers, index.get("tokenizer", ["", "CLIPTokenizer"])[1])
        self.tokenizer: CLIPTokenizer = tokenizer_cls.from_pretrained(self.model_dir / "tokenizer")
        self.scheduler: LCMScheduler = lcm_scheduler(folder=self.model_dir / "scheduler")
        self.tiny_vae_decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # loader.attach_tiny_vae
        unet_cfg = _read_json(self.model_dir / "unet" / "config.json")
        vae_cfg = _read_json(self.model_dir / "vae" / "config.json")
        text_cfg = _read_json(self.model_dir / "text_encoder" / "config.json")
        self.spec = ModelSpec(
            base=manifest.base,
            dtype=self.dtype,
            device=device,
            backend=self.backend,
            loras=tuple(manifest.loras),
            latent_channels=int(unet_cfg.get("in_channels", 4)),
            vae_scale_factor=2 ** (len(vae_cfg.get("block_out_channels", (0,) * 4)) - 1),
            scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
            text_max_length=int(self.tokenizer.model_max_length),
            text_hidden_size=int(text_cfg.get("hidden_size", 768)),
            extra={"artifact": str(artifact_dir), "compiled": entry.to_json(),
                   "cuda_graph_capturable": self.graph_capturable},
        )
        served = entry.served
        self._unet_multiple = served.unet_latent_multiple
        self._unet_range = served.unet_latent_range or (1, 1 << 30)
        self._vae_range = served.vae_latent_range or (1, 1 << 30)
        self._eager: dict[str, torch.nn.Module] = {}
        self._warned: set[tuple[str, tuple[int, ...]]] = set()

    # Shapes outside what the exported graphs hold run on the eager modules of model/.
    def unet_serves(self, latents: torch.Tensor) -> bool:
        lo, hi = self._unet_range
        return all(lo <= s <= hi and s % self._unet_multiple == 0 for s in latents.shape[-2:])

    def vae_serves(self, latents: torch.Tensor) -> bool:
        lo, hi = self._vae_range
        return all(lo <= s <= hi for s in latents.shape[-2:])

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """img2img / inpainting, where the artifact has no compiled VAE encoder (the compile backend;
        aoti/onnx artifacts from before img2img; sides outside the served range): the eager encoder of
        model/, loaded at the first init image, logged once. It runs once per img2img request, at
        admission: small beside the steps and the decode."""
        if "vae_encoder" not in self._eager:
            log.warning("%s artifact: no compiled VAE encoder for %s (img2img, inpainting); running it eagerly "
                        "from %s", self.backend, "x".join(map(str, pixels.shape[-2:])), self.model_dir)
            self._eager["vae_encoder"] = VaeEncode(load_part("vae", self.model_dir, self.dtype)).to(self.device).eval()
        return chunked(self._eager["vae_encoder"], pixels.contiguous())

    def compiled_tiny_vae_decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The artifact's compiled tiny decoder (latents (B, 4, h, w) in a served VAE range -> pixels), or
        None where it has none (artifacts from before it). Subclasses override."""
        return None

    def serve_tiny_vae(self, eager: Callable[[torch.Tensor], torch.Tensor],
                       own: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The runtime's `tiny_vae_decode` (loader.attach_tiny_vae): the compiled part when `own` (the
        tiny autoencoder is this artifact's tiny_vae/, the one exported) and the artifact has it, with
        `eager` (export/tiny_vae.py `decoder_of`) for sides outside the served range; else `eager`,
        logged once. spec.extra["tiny_vae_decoder"] says which: "compiled" or "eager"."""
        compiled = self.compiled_tiny_vae_decoder() if own else None
        if compiled is None:
            why = ("the tiny autoencoder served is not the artifact's own tiny_vae/" if not own
                   else "its compile cache has no tiny decoder (exported before it)" if self.backend == "compile"
                   else "it has no compiled tiny decoder (exported before it)")
            log.warning("%s artifact: %s; running the tiny autoencoder's decoder eagerly", self.backend, why)
            self.spec.extra["tiny_vae_decoder"] = "eager"
            return eager
        log.info("%s artifact: serving its compiled tiny decoder (%s)", self.backend,
                 self.entry.files.get("tiny_vae_decoder", "in its compile cache"))
        self.spec.extra["tiny_vae_decoder"] = "compiled"

        def tiny_vae_decode(latents: torch.Tensor) -> torch.Tensor:
            if self.vae_serves(latents):
                return compiled(latents)
            key = ("tiny_vae_decoder", tuple(latents.shape[-2:]))
            if key not in self._warned:
                self._warned.add(key)
                log.warning("tiny_vae_decoder: latent size %s is not served by the %s artifact (served: %s); "
                            "running it eagerly", "x".join(map(str, key[1])), self.backend,
                            self.entry.served.to_json())
            return eager(latents)

        return tiny_vae_decode

    def eager_part(self, part: Literal["unet", "vae_decoder"], shape: tuple[int, ...]) -> torch.nn.Module:
        """The eager UNetStep / VaeDecode of model/ (loaded once), for a shape the artifact does not hold."""
        key = (part, shape[-2:])
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: latent size %s is not served by the %s artifact (served: %s); running it eagerly",
                        part, "x".join(map(str, shape[-2:])), self.backend, self.entry.served.to_json())
        if part not in self._eager:
            if part == "unet":
                module: torch.nn.Module = UNetStep(load_part("unet", self.model_dir, self.dtype))
            else:
                module = VaeDecode(load_part("vae", self.model_dir, self.dtype))
            self._eager[part] = module.to(self.device).eval()
        return self._eager[part]
