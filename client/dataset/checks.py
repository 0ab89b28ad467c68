"""What a spec needs of the SDK and of the servers, checked before the first request."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..options import GenerateOptions
from ..types import ModelInfo
from .plan import Plan
from .spec import DatasetError, DatasetSpec


def check_sdk_supports(spec: DatasetSpec) -> None:
    """Refuses a spec this SDK cannot send (GenerateOptions lacks a field it needs)."""
    fields = {f.name for f in dataclasses.fields(GenerateOptions)}
    needed = ["init_image"] + (["strength"] if spec.strength is not None else []) + \
        (["mask_image"] if spec.masks is not None else [])
    if spec.init_images is not None and not set(needed) <= fields:
        raise DatasetError(f"init_images: this lcmserve SDK has no img2img (GenerateOptions lacks "
                           f"{', '.join(sorted(set(needed) - fields))})")
    if spec.per_image > 1 and "candidates" not in fields:
        raise DatasetError("candidates: this lcmserve SDK has no best-of-N (GenerateOptions lacks candidates)")
    if spec.uses_adapters and "adapters" not in fields:
        raise DatasetError("adapters: this lcmserve SDK has no per-request adapters (GenerateOptions lacks adapters)")


def scorer_of(info: ModelInfo) -> dict[str, Any] | None:
    """The scorer GetModelInfo names, as JSON values; None when the server has none."""
    scorer = getattr(info, "scorer", None)
    if scorer is None or not (getattr(scorer, "name", None) or getattr(scorer, "source", None)):
        return None
    if dataclasses.is_dataclass(scorer) and not isinstance(scorer, type):
        return dataclasses.asdict(scorer)
    return {"name": str(scorer)}


def check_servers(spec: DatasetSpec, plan: Plan, targets: tuple[str, ...], infos: list[ModelInfo]) -> None:
    """What the spec needs of every server, checked before the first request: a scorer for
    min_score and candidates > 1, room for K candidates, every adapter the plan names loaded."""
    for target, info in zip(targets, infos):
        if spec.best_of_n and scorer_of(info) is None and (spec.min_score is not None or spec.per_image > 1):
            key = "min_score" if spec.min_score is not None else "candidates"
            raise DatasetError(f"{key}: the server at {target} has no scorer (GetModelInfo names none), so it cannot "
                               "score or pick candidates; serve a model exported with --scorer, or `lcmserve serve "
                               "--scorer SRC`. Nothing was made")
        limit = getattr(info.limits, "max_candidates", 0)
        if limit and spec.per_image > limit:
            raise DatasetError(f"candidates: {spec.per_image} is over the limit of the server at {target} "
                               f"(max_candidates {limit})")
        names = sorted({name for image in plan.images for name, _ in image.adapters})
        loaded = {adapter.name for adapter in getattr(info, "adapters", [])}
        missing = [name for name in names if name not in loaded]
        if missing:
            raise DatasetError(f"adapters: {', '.join(missing)} not loaded on the server at {target} (it has "
                               f"{', '.join(sorted(loaded)) or 'none'}; `lcmserve serve --adapter NAME=SRC` or "
                               "`lcmserve adapters load`). Nothing was made")
