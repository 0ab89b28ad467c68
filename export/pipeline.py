"""The parts of diffusers' StableDiffusionPipeline that lcmserve uses, as typed Protocols.

diffusers ships `py.typed`, but mypy cannot see through its classes: the config decorators leave
`__init__` / `from_pretrained` / `from_config` untyped, and ModelMixin's torch.nn.Module base is lost
(`UNet2DConditionModel(...).eval` is "no attribute" to it). So lcmserve types a pipeline as
`SDPipeline`, turns its parts into torch.nn.Modules with `as_module` (a checked narrowing, not a
cast), and makes the untyped library calls here, each once, with the error code it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


class UNetPart(Protocol):
    """A diffusers UNet2DConditionModel, as far as it is read here."""

    config: Any  # a diffusers FrozenDict: in_channels, sample_size, ...
    num_upsamplers: int  # the latent is halved this many times

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...


class ConfiguredPart(Protocol):
    """A VAE (AutoencoderKL) or text encoder (CLIPTextModel): read for its config only."""

    config: Any  # VAE: block_out_channels, scaling_factor; text encoder: hidden_size


class SDPipeline(Protocol):
    """diffusers' StableDiffusionPipeline with the LCM scheduler."""

    unet: UNetPart
    vae: ConfiguredPart
    text_encoder: ConfiguredPart
    tokenizer: CLIPTokenizer
    scheduler: Any  # an LCMScheduler (set_lcm_scheduler); diffusers' scheduler classes are opaque to mypy

    def __call__(self, prompt: str, **kwargs: Any) -> Any: ...

    def to(self, device: str | torch.device) -> SDPipeline: ...

    def set_progress_bar_config(self, **kwargs: Any) -> None: ...

    def load_lora_weights(self, state_dict: dict[str, Any], *, adapter_name: str) -> None: ...

    def set_adapters(self, adapter_names: list[str], adapter_weights: list[float]) -> None: ...

    def fuse_lora(self, *, components: list[str], lora_scale: float, adapter_names: list[str]) -> None: ...

    def unload_lora_weights(self) -> None: ...

    def save_pretrained(self, save_directory: str | Path, *, safe_serialization: bool = True) -> None: ...


def as_module(part: object) -> torch.nn.Module:
    """`part` (a pipeline component) as the torch.nn.Module it is; TypeError if it is not one."""
    if not isinstance(part, torch.nn.Module):
        raise TypeError(f"{type(part).__name__} is not a torch.nn.Module")
    return part


def pipeline_from_pretrained(location: str | Path, **kwargs: Any) -> SDPipeline:
    """StableDiffusionPipeline.from_pretrained(location, **kwargs)."""
    from diffusers import StableDiffusionPipeline

    return cast(SDPipeline, StableDiffusionPipeline.from_pretrained(location, **kwargs))  # type: ignore[no-untyped-call]  # diffusers' config decorators


def lcm_scheduler(config: Any = None, *, folder: Path | None = None) -> Any:
    """An LCMScheduler from another scheduler's `config`, or from a saved `folder`."""
    from diffusers import LCMScheduler

    if folder is not None:
        return LCMScheduler.from_pretrained(folder)  # type: ignore[no-untyped-call]  # diffusers' config decorators
    return LCMScheduler.from_config(config)  # type: ignore[no-untyped-call]  # diffusers' config decorators


def load_part(part: Literal["unet", "vae", "text_encoder"], model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """One component of the diffusers folder `model_dir`, in eval mode, on the CPU in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    module: object
    if part == "unet":
        module = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=dtype)  # type: ignore[no-untyped-call]  # diffusers' config decorators
    elif part == "vae":
        module = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=dtype)  # type: ignore[no-untyped-call]  # diffusers' config decorators
    else:
        module = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=dtype)
    return as_module(module).eval()
