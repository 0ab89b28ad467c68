"""The tiny autoencoder (TAESD, diffusers' `AutoencoderTiny`): where it comes from, how it is saved.

TAESD decodes SD latents with about 1.2 M decoder parameters against the VAE's 49.5 M (roughly 18x
fewer multiply-adds at 512x512), at some cost in detail: cheap full-size previews and a fast final
decode. Its input is the UNet's latents divided by its own `scaling_factor` (1.0), not by the VAE's
0.18215: diffusers' pipeline makes the same division with `vae=AutoencoderTiny`.

SRC (`lcmserve export --tiny-vae SRC`, `lcmserve serve --tiny-vae SRC`) is, in the order tried:
1. a preset name (`tiny`, `sd15-random`): that preset's AutoencoderTiny (TAESD's real shapes for
   sd15-random) with seeded random weights, built once into `$LCMSERVE_CACHE/presets/<name>-tiny-vae-v<N>`;
2. an export artifact folder that has one (`tiny_vae/`);
3. a folder with an AutoencoderTiny `config.json` (what `save_pretrained` writes);
4. a hub id (`madebyollin/taesd`): its config.json and safetensors from the hub cache or the hub
   (HF_HUB_OFFLINE honoured).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lcmserve.export.artifact import MANIFEST_NAME, TINY_VAE_DIR
from lcmserve.export.errors import ModelNotFoundError, UserInputError
from lcmserve.export.pipeline import as_module
from lcmserve.export.presets import PRESETS, cache_root, init_weights, preset_spec
from lcmserve.export.records import TinyVaeRecord
from lcmserve.export.sources import file_sha256, looks_like_hub_id

if TYPE_CHECKING:
    import torch

TINY_VAE_VERSION = 1  # bump when a preset's tiny autoencoder changes
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def build_preset_tiny_vae(name: str) -> torch.nn.Module:
    """The preset's AutoencoderTiny in memory (float32, CPU), weights from presets.init_weights."""
    from diffusers import AutoencoderTiny

    spec = preset_spec(name)
    model = as_module(AutoencoderTiny(**spec.tiny_vae))  # type: ignore[no-untyped-call]  # diffusers' config decorators
    init_weights("tiny_vae", model, spec.tiny_vae_gain)
    return model.eval()


def preset_tiny_vae_dir(name: str) -> Path:
    """The preset's tiny autoencoder as a diffusers folder, built and saved on first use (atomically,
    as presets.preset_dir does), reused afterwards."""
    preset_spec(name)
    final = cache_root() / "presets" / f"{name}-tiny-vae-v{TINY_VAE_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_pretrained(build_preset_tiny_vae(name), tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_pretrained(model: torch.nn.Module, folder: Path) -> str:
    """`model.save_pretrained(folder)` (safetensors) -> the sha256 of the weights file written."""
    getattr(model, "save_pretrained")(folder, safe_serialization=True)
    return file_sha256(Path(folder) / WEIGHTS_NAME)


def resolve_tiny_vae(source: str) -> tuple[str, Path]:
    """SRC (module doc) -> (kind: preset | artifact | folder | hub, the local AutoencoderTiny folder)."""
    if source in PRESETS:
        return "preset", preset_tiny_vae_dir(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            if not (path / TINY_VAE_DIR / "config.json").is_file():
                raise ModelNotFoundError(f"artifact {path} has no tiny autoencoder ({TINY_VAE_DIR}/): export it with "
                                         "--tiny-vae SRC")
            return "artifact", path / TINY_VAE_DIR
        _check_config(path)
        return "folder", path
    if path.exists():
        raise ModelNotFoundError(f"tiny autoencoder {source} is a file; expected an AutoencoderTiny folder, "
                                 f"a preset ({', '.join(PRESETS)}) or a hub id")
    if looks_like_hub_id(source):
        return "hub", _download(source)
    raise ModelNotFoundError(f"tiny autoencoder {source!r} is not a preset ({', '.join(PRESETS)}), an existing "
                             "folder, or a hub id (org/name, e.g. madebyollin/taesd)")


def _check_config(folder: Path) -> None:
    config = folder / "config.json"
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except FileNotFoundError:
        raise ModelNotFoundError(f"folder {folder} is not an AutoencoderTiny folder: no config.json") from None
    except (OSError, ValueError, AttributeError) as e:
        raise ModelNotFoundError(f"cannot read {config}: {e}") from e
    if cls != "AutoencoderTiny":
        raise ModelNotFoundError(f"{config} describes a {cls!r}, not an AutoencoderTiny (TAESD)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise ModelNotFoundError(
            f"could not get the tiny autoencoder {repo_id!r} from the Hugging Face hub ({type(e).__name__}); to "
            f"work offline pass a local AutoencoderTiny folder, a preset ({', '.join(PRESETS)}), or set "
            "HF_HUB_OFFLINE=1 with it already in the cache") from e
    _check_config(folder)
    return folder


def load_tiny_vae(source: str, *, dtype: torch.dtype, device: str | torch.device,
                  latent_channels: int = 4, vae_scale_factor: int = 8) -> tuple[torch.nn.Module, TinyVaeRecord]:
    """SRC -> (the AutoencoderTiny in eval mode on `device` in `dtype`, its record: source, kind,
    source_sha256, scaling_factor). Refuses one whose latent channels or upscale differ from the model's."""
    from diffusers import AutoencoderTiny

    kind, folder = resolve_tiny_vae(source)
    model: torch.nn.Module = AutoencoderTiny.from_pretrained(folder, dtype=dtype)  # type: ignore[no-untyped-call]  # diffusers' config decorators
    config: Any = getattr(model, "config")
    scale = int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
    if int(config.latent_channels) != latent_channels or scale != vae_scale_factor:
        raise UserInputError(
            f"tiny autoencoder {source}: {config.latent_channels} latent channels and {scale}x upscale; the model "
            f"has {latent_channels} and {vae_scale_factor}x (a TAESD made for another model family?)")
    weights = folder / WEIGHTS_NAME
    record = TinyVaeRecord(source=source, kind=kind, source_sha256=file_sha256(weights) if weights.is_file() else None,
                           scaling_factor=float(config.scaling_factor))
    return model.eval().to(device), record

