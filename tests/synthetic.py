"""Random LoRA files: test tooling (tests import it as `synthetic`; tests/ is on sys.path under pytest).

`make_lora` writes the two formats users bring:
- diffusers / PEFT (what `StableDiffusionPipeline.save_lora_weights` writes): keys
  `unet.<module>.lora_A.weight` (rank, in), `unet.<module>.lora_B.weight` (out, rank), and
  `text_encoder.<module>.lora_{A,B}.weight`; no alpha, so diffusers uses alpha = rank (scale 1).
- kohya_ss (sd-scripts): keys `lora_unet_<module with . -> _>.lora_down.weight` (rank, in),
  `.lora_up.weight` (out, rank), `.alpha` (a 0-d tensor; the update is up @ down * alpha / rank), and
  `lora_te_<module>` for the text encoder. (sd-scripts also writes `ss_*` header entries; loaders
  do not need them, and several header entries would make the bytes differ between runs.)
Conv2d targets get (rank, in, kh, kw) down and (out, rank, 1, 1) up weights, in both formats.

Values are deterministic from `seed` and large on purpose: each module's update `delta_W` has a
standard deviation of `strength * std(W)`, so a LoRA visibly changes the image and a parity test
that compares against the base model can fail.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

# Attention projections of the UNet's transformer blocks: the usual "small" LoRA.
ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# The modules the LCM-LoRA training script of diffusers adapts (linear and conv layers alike), so a
# synthetic "LCM" LoRA costs what the real one costs when unfused.
LCM_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


def _normal(seed: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 N(0, 1) from a PCG64 stream keyed by (seed, key): same values on every machine."""
    import numpy as np
    import torch

    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(key.encode())]))
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def _targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    import torch

    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            found.append((name, module))
    return found


def _lora_pair(
    seed: int, key: str, module: torch.nn.Module, rank: int, scaling: float, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with std(up @ down * scaling) = strength * std(W)."""
    import torch

    weight = module.get_parameter("weight").detach().float()
    out_ch, in_ch = weight.shape[0], weight.shape[1]
    rank = min(rank, out_ch, in_ch * (weight[0, 0].numel() if weight.dim() > 2 else 1))
    if isinstance(module, torch.nn.Conv2d):
        down_shape: tuple[int, ...] = (rank, in_ch, *weight.shape[2:])  # (r, in, kh, kw)
        up_shape: tuple[int, ...] = (out_ch, rank, 1, 1)
    else:
        down_shape, up_shape = (rank, in_ch), (out_ch, rank)
    down = _normal(seed, key + ".down", down_shape)
    up = _normal(seed, key + ".up", up_shape)
    # Each entry of up @ down is a sum of `rank` products of two N(0,1): std sqrt(rank).
    target_std = strength * float(weight.std()) + 1e-8
    factor = (target_std / (rank**0.5 * scaling)) ** 0.5  # split evenly between the two factors
    return down * factor, up * factor


def make_lora(
    pipe_or_unet: Any,
    path: str | Path,
    *,
    fmt: Literal["diffusers", "kohya"],
    rank: int,
    seed: int,
    targets: tuple[str, ...] = ATTENTION_TARGETS,
    include_text_encoder: bool = False,
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS,
    strength: float = 0.5,
    alpha: float | None = None,
) -> Path:
    """Write a random LoRA for `pipe_or_unet` (a StableDiffusionPipeline, or a UNet alone) to `path`.

    `targets`: UNet module-name suffixes (Linear or Conv2d modules). `include_text_encoder`: also
    adapt the text encoder (needs a pipeline). `strength`: std of each update relative to the
    weight it adds to. `alpha` (kohya only): the stored network alpha, default rank / 2 so that the
    alpha / rank scaling is exercised. Returns the path written (parents are created).
    """
    from safetensors.torch import save_file

    if fmt not in ("diffusers", "kohya"):
        raise ValueError(f"fmt {fmt!r} is not one of 'diffusers', 'kohya'")
    if rank < 1:
        raise ValueError(f"rank {rank} must be >= 1")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    components: list[tuple[str, Any, tuple[str, ...]]] = [("unet", unet, targets)]
    if include_text_encoder:
        text_encoder = getattr(pipe_or_unet, "text_encoder", None)
        if text_encoder is None:
            raise ValueError("include_text_encoder=True needs a pipeline with a text_encoder, not a UNet")
        components.append(("text_encoder", text_encoder, text_encoder_targets))

    net_alpha = float(alpha) if alpha is not None else rank / 2
    scaling = net_alpha / rank if fmt == "kohya" else 1.0
    tensors: dict[str, torch.Tensor] = {}
    for comp, model, suffixes in components:
        found = _targets(model, suffixes)
        if not found:
            raise ValueError(f"no {comp} module matches targets {suffixes}")
        for name, module in found:
            down, up = _lora_pair(seed, f"{comp}.{name}", module, rank, scaling, strength)
            if fmt == "diffusers":
                tensors[f"{comp}.{name}.lora_A.weight"] = down.contiguous()
                tensors[f"{comp}.{name}.lora_B.weight"] = up.contiguous()
            else:
                kohya = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
                tensors[f"{kohya}.lora_down.weight"] = down.contiguous()
                tensors[f"{kohya}.lora_up.weight"] = up.contiguous()
                tensors[f"{kohya}.alpha"] = _scalar(net_alpha)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry only: safetensors writes the metadata map in hash order, so several
    # entries (kohya's ss_* keys) would make the file bytes, and its sha256, differ run to run.
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out


def _scalar(value: float) -> torch.Tensor:
    import torch

    return torch.tensor(value, dtype=torch.float32)
