"""The eager modules of the parts: plain PyTorch, each behind the adapter export/adapters.py traces
(the same positional signature as the compiled parts), built on first use.

From a loaded pipeline (the eager backend: the modules are already on the device) or from a diffusers
folder (a compiled artifact's model/, for the shapes its compiled parts do not serve: loaded on the CPU
in the model's dtype, then moved to the device).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from lcmserve.export.adapters import TextEncode, TinyVaeDecode, UNetStep, VaeDecode, VaeEncode
from lcmserve.export.pipeline import as_module, load_part

from .parts import Fn

if TYPE_CHECKING:
    from lcmserve.export.pipeline import SDPipeline

    from ..config import AdapterConfig
    from .adapters import AdapterSlots


class EagerModules:
    """part name -> its eager adapter module, built once. `tiny_vae`: the tiny autoencoder, if any."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, pipe: SDPipeline | None = None,
                 folder: Path | None = None, tiny_vae: torch.nn.Module | None = None) -> None:
        if (pipe is None) == (folder is None):
            raise ValueError("eager modules come from a pipeline or from a folder, one of them")
        self.device = device
        self.dtype = dtype
        self.pipe = pipe
        self.folder = folder
        self.tiny_vae = tiny_vae
        self._built: dict[str, Fn] = {}
        self._components: dict[str, torch.nn.Module] = {}

    def loader(self, part: str) -> Callable[[], Fn]:
        """What Part calls the first time it needs the eager form of `part`."""
        return lambda: self.get(part)

    def get(self, part: str) -> Fn:
        if part not in self._built:
            module = self._adapter(part).eval()
            self._built[part] = module
        return self._built[part]

    def install_adapters(self, config: AdapterConfig) -> AdapterSlots:
        """Give the UNet and text encoder adapter slots (adapters.py), in place; from now on their eager
        parts read the adapter extras (the Parts must drop eager callables built before)."""
        from .adapters import WithAdapterRows, install

        unet, text_encoder = self._component("unet"), self._component("text_encoder")
        slots = install(unet, text_encoder, config)
        self._built["unet"] = WithAdapterRows(UNetStep(unet), slots.unet_rows, 3).eval()
        self._built["text_encoder"] = WithAdapterRows(TextEncode(text_encoder), slots.text_rows, 1).eval()
        return slots

    def _adapter(self, part: str) -> torch.nn.Module:
        match part:
            case "text_encoder":
                return TextEncode(self._component("text_encoder"))
            case "unet":
                return UNetStep(self._component("unet"))
            case "vae_decoder":
                return VaeDecode(self._component("vae"))
            case "vae_encoder":
                return VaeEncode(self._component("vae"))
            case "tiny_vae_decoder":
                if self.tiny_vae is None:
                    raise ValueError("this model has no tiny autoencoder")
                return TinyVaeDecode(self.tiny_vae)
        raise ValueError(f"no part {part!r}")

    def _component(self, name: Literal["unet", "vae", "text_encoder"]) -> torch.nn.Module:
        """A component of the pipeline, or loaded from the folder (once: the VAE serves two parts)."""
        if name not in self._components:
            if self.pipe is not None:
                module = as_module(getattr(self.pipe, name))
            else:
                assert self.folder is not None
                module = load_part(name, self.folder, self.dtype).to(self.device)
            self._components[name] = module.eval()
        return self._components[name]
