"""What every compiled backend shares: the artifact read once (tokenizer, scheduler, shapes, the manifest
entry), the shapes an exported part serves, and the `Provider` each backend is.

A provider gives the compiled forms of the parts it has (parts.py `Compiled`); loader.py puts them
beside the eager modules of the artifact's model/ (eager.py), one `Part` each. The providers are leaves
that import this module and nothing of each other: compiled.py (aoti, compile) and compiled_onnx.py
(onnx).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lcmserve.export.artifact import MAX_BATCH, MODEL_DIR, CompiledEntry, Manifest, Served
from lcmserve.export.loading import parse_dtype
from lcmserve.export.pipeline import lcm_scheduler

from .parts import Compiled
from .runtime import ModelDims

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_lcm import LCMScheduler  # not diffusers' dummy class (runtime.py)
    from transformers import CLIPTokenizer


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def folder_dims(model_dir: Path, text_max_length: int) -> ModelDims:
    """ModelDims of a diffusers folder, from its configs (no weights loaded)."""
    unet_cfg = _read_json(model_dir / "unet" / "config.json")
    vae_cfg = _read_json(model_dir / "vae" / "config.json")
    text_cfg = _read_json(model_dir / "text_encoder" / "config.json")
    return ModelDims(latent_channels=int(unet_cfg.get("in_channels", 4)),
                     vae_scale_factor=2 ** (len(vae_cfg.get("block_out_channels", (0,) * 4)) - 1),
                     scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
                     text_max_length=text_max_length, text_hidden_size=int(text_cfg.get("hidden_size", 768)))


@dataclass
class ArtifactModel:
    """An artifact's compiled/<backend>/ and model/, read once for its provider and the loader."""

    artifact_dir: Path
    manifest: Manifest
    entry: CompiledEntry
    device: torch.device
    dtype: torch.dtype = field(init=False)
    model_dir: Path = field(init=False)
    tokenizer: CLIPTokenizer = field(init=False)
    scheduler: LCMScheduler = field(init=False)
    dims: ModelDims = field(init=False)

    def __post_init__(self) -> None:
        import transformers

        self.model_dir = self.artifact_dir / MODEL_DIR
        self.dtype = parse_dtype(self.entry.dtype)
        index = _read_json(self.model_dir / "model_index.json")
        tokenizer_cls = getattr(transformers, index.get("tokenizer", ["", "CLIPTokenizer"])[1])
        self.tokenizer = tokenizer_cls.from_pretrained(self.model_dir / "tokenizer")
        self.scheduler = lcm_scheduler(folder=self.model_dir / "scheduler")
        self.dims = folder_dims(self.model_dir, int(self.tokenizer.model_max_length))


class Provider(Protocol):
    """A compiled backend: the compiled forms of the parts its artifact holds."""

    backend: str
    graph_capturable: bool  # may the engine capture its callables in CUDA graphs

    def compiled(self) -> dict[str, Compiled]:
        """part name -> its compiled form, for the parts the artifact has (text_encoder, unet,
        vae_decoder, and vae_encoder where exported); the tiny decoder comes from `tiny_vae_decoder`."""
        ...

    def tiny_vae_decoder(self) -> Compiled | None:
        """The artifact's compiled tiny decoder (its own tiny_vae/), or None where it has none. Asked only
        when the tiny autoencoder served is the artifact's own."""
        ...

    def details(self) -> dict[str, Any]:
        """BackendDetails fields this backend fills (runtime.py)."""
        ...


# --- what an exported part serves (aoti, onnx: the manifest entry's Served) ---------------------------


def _sides(x: torch.Tensor) -> str:
    return "x".join(map(str, x.shape[-2:]))


def served_by_export(fn: Any, served: Served, part: str, vae_scale_factor: int) -> Compiled:
    """The compiled form of an exported `part` serving the shapes of `served` (latent sides in the
    UNet's or VAE's range; any batch, in chunks of the exported range)."""
    max_rows = served.batch_range[1] or MAX_BATCH
    unet_multiple = served.unet_latent_multiple
    unet_lo, unet_hi = served.unet_latent_range or (1, 1 << 30)
    vae_lo, vae_hi = served.vae_latent_range or (1, 1 << 30)

    def unet_serves(inputs: Sequence[torch.Tensor]) -> str | None:
        ok = all(unet_lo <= s <= unet_hi and s % unet_multiple == 0 for s in inputs[0].shape[-2:])
        return None if ok else f"latent size {_sides(inputs[0])}"

    def vae_serves(inputs: Sequence[torch.Tensor]) -> str | None:
        ok = all(vae_lo <= s <= vae_hi for s in inputs[0].shape[-2:])
        return None if ok else f"latent size {_sides(inputs[0])}"

    def encoder_serves(inputs: Sequence[torch.Tensor]) -> str | None:  # pixels -> their latent sides
        ok = all(vae_lo <= -(-s // vae_scale_factor) <= vae_hi for s in inputs[0].shape[-2:])
        return None if ok else f"image size {_sides(inputs[0])}"

    def any_shape(inputs: Sequence[torch.Tensor]) -> str | None:
        return None

    serves = {"unet": unet_serves, "vae_decoder": vae_serves, "tiny_vae_decoder": vae_serves,
              "vae_encoder": encoder_serves}.get(part, any_shape)
    return Compiled(fn=fn, serves=serves, max_rows=max_rows, served=str(served.to_json()))
