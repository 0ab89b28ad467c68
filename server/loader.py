"""MODEL (+ LoRAs, backend, device, dtype) -> a Runtime the engine can drive.

MODEL is an export artifact (DIR with manifest.json and model/), a diffusers folder, a built-in
preset (`tiny`, `sd15-random`) or a hub id. LoRAs given at serve time are fused in memory, as
`lcmserve export` would, so the served model is the same either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .runtime import EagerRuntime, Runtime, spec_from_pipeline

log = logging.getLogger("lcmserve.loader")


class LoadError(Exception):
    """The model cannot be served as asked; the message says why and what to do."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_runtime(model: str, *, loras: list[str] = (), backend: str = "auto",  # type: ignore[assignment]
                 device: str | None = None, dtype: str | None = None, allow_partial_lora: bool = False) -> Runtime:
    from lcmserve.export.loading import load_pipeline, parse_dtype

    device = device or default_device()
    artifact = Path(model) if (Path(model) / "manifest.json").is_file() else None
    manifest = _read_manifest(artifact) if artifact else {}
    if dtype is None:
        # An artifact keeps the dtype it was exported (and checked) in; otherwise fp16 on GPUs.
        dtype = manifest.get("dtype") or ("float16" if device.startswith("cuda") else "float32")
    torch_dtype = parse_dtype(dtype)

    if backend == "auto":
        backend = "eager"
        if artifact is not None and not loras:
            from .compiled import pick_backend

            backend = pick_backend(artifact, device)
        log.info("backend auto -> %s", backend)
    if backend != "eager":
        if artifact is None:
            raise LoadError(f"--backend {backend} serves a compiled artifact: make one with "
                            f"`lcmserve export --base {model} --backend {backend} --out DIR`, then serve DIR")
        if loras:
            raise LoadError("--lora cannot be added to a compiled artifact: export the LoRAs with it")
        from .compiled import load_compiled_runtime

        return load_compiled_runtime(artifact, backend=backend, device=device)

    if loras:
        from lcmserve.export.fuse import fuse_in_memory
        from lcmserve.export.lora import parse_lora_arg

        pipe, fused_manifest = fuse_in_memory(model, [parse_lora_arg(arg, allow_partial=allow_partial_lora) for arg in loras],
                                              dtype=torch_dtype, device=device)
        records = tuple(_as_dict(r) for r in getattr(fused_manifest, "loras", ()))
    else:
        pipe = load_pipeline(model, dtype=torch_dtype, device=device)
        records = tuple(manifest.get("loras", ()))
    base = manifest.get("base", model) if artifact else model
    return EagerRuntime(pipe, spec_from_pipeline(pipe, base=str(base), backend="eager", loras=records))


def _read_manifest(artifact: Path) -> dict:
    import json

    try:
        return json.loads((artifact / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{artifact}/manifest.json cannot be read: {exc}") from exc


def _as_dict(record: object) -> dict:
    if isinstance(record, dict):
        return record
    import dataclasses

    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else vars(record)
