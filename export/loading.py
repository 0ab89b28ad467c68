"""MODEL argument -> a `StableDiffusionPipeline` with the LCM scheduler, or one clear error.

MODEL is, in the order tried:
1. a preset name (`tiny`, `sd15-random`): built once into the cache, then loaded from there;
2. an export artifact folder (`manifest.json` + `model/`): its `model/`;
3. a diffusers folder (`model_index.json`);
4. a hub id (`runwayml/stable-diffusion-v1-5`): `from_pretrained`, which uses the Hugging Face cache
   and honours HF_HUB_OFFLINE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lcmserve.export.artifact import DTYPES, MANIFEST_NAME, MODEL_DIR, read_manifest
from lcmserve.export.errors import ModelNotFoundError, UserInputError
from lcmserve.export.pipeline import SDPipeline, lcm_scheduler, pipeline_from_pretrained
from lcmserve.export.presets import PRESETS, preset_dir
from lcmserve.export.sources import looks_like_hub_id

__all__ = [
    "load_pipeline",
    "parse_dtype",
    "resolve_model",
    "dtype_name",
    "set_lcm_scheduler",
]

_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of DTYPES ("float16", "bfloat16", "float32") or an alias ("fp16", "bf16"...)."""
    key = _ALIASES.get(name.lower(), name.lower())
    dtype = getattr(torch, key) if key in DTYPES else None
    if not isinstance(dtype, torch.dtype):
        raise UserInputError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_model(model: str) -> tuple[str, str]:
    """MODEL -> (kind, what to pass to from_pretrained): kind is preset | artifact | folder | hub."""
    if model in PRESETS:
        return "preset", str(preset_dir(model))
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            read_manifest(path)  # a readable, supported manifest, or a clear error
            if not (path / MODEL_DIR / "model_index.json").is_file():
                raise ModelNotFoundError(
                    f"artifact {path} has a manifest but no {MODEL_DIR}/model_index.json"
                )
            return "artifact", str(path / MODEL_DIR)
        if (path / "model_index.json").is_file():
            return "folder", str(path)
        raise ModelNotFoundError(
            f"folder {path} is neither a diffusers model (no model_index.json) nor an lcmserve artifact "
            f"(no {MANIFEST_NAME})"
        )
    if path.exists():
        raise ModelNotFoundError(f"model {model} is a file; expected a folder, a preset or a hub id")
    if looks_like_hub_id(model):
        return "hub", model
    raise ModelNotFoundError(
        f"model {model!r} is not a preset ({', '.join(PRESETS)}), an existing folder, or a hub id (org/name)"
    )


def set_lcm_scheduler(pipe: SDPipeline) -> None:
    """Swap in LCMScheduler with the model's own schedule (SD v1.5: scaled_linear, steps_offset 1...)."""
    from diffusers import LCMScheduler

    if not isinstance(pipe.scheduler, LCMScheduler):
        pipe.scheduler = lcm_scheduler(pipe.scheduler.config)


def load_pipeline(
    model: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> SDPipeline:
    """Load MODEL (see the module doc) with the LCM scheduler, no safety checker, no progress bars."""
    kind, location = resolve_model(model)
    kwargs: dict[str, Any] = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if kind == "hub":
        try:
            pipe = pipeline_from_pretrained(location, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            reason = " ".join(str(e).split()) or type(e).__name__  # whole, on one line
            raise ModelNotFoundError(
                f"could not load {model!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
                f"to work offline pass a local diffusers folder, an export artifact, a preset "
                f"({', '.join(PRESETS)}), or set HF_HUB_OFFLINE=1 with the model already in the cache"
            ) from e
    else:
        pipe = pipeline_from_pretrained(location, **kwargs)
    set_lcm_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
