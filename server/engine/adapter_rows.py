"""The engine's side of per-request adapters (issue 21; the slots themselves: server/model/adapters.py).

    enable_adapters(runtime, config)   slots when the server may serve adapters, the initial ones loaded
    resolve_adapters(...)              a request's (name, scale) pairs -> SlotWeights (at submit)
    adapter_extras(rows, ...)          the per-row extras of a model call

A call's extras are each row's adapters (slots and scales) as two small tensors, padded to K entries per
row, K a power of two (1, 2, 4, ...) so that a few shapes (CUDA graphs, compiled graphs) serve every mix.
Unused entries name slot 0 with scale 0 (they add exactly nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..config import AdapterConfig
from ..model.adapters import ADAPTER_EXTRAS, AdapterError, AdapterSlots, SlotWeight
from ..model.runtime import Runtime
from .rows import to_device

log = logging.getLogger("lcmserve.engine")


class AdapterLoadError(Exception):
    """An adapter of serve --adapter could not be loaded: the server does not start."""


def enable_adapters(runtime: Runtime, config: AdapterConfig) -> AdapterSlots | None:
    """The model's adapter slots with serve --adapter's adapters loaded, when the server may serve adapters
    (some given, or --allow-adapter-loading); None otherwise, or for a backend without adapter support."""
    if not config.initial and not config.allow_loading:
        return None
    slots = runtime.enable_adapters(config)
    if slots is None:
        if config.initial:
            raise AdapterLoadError(f"--adapter: the {runtime.spec.backend} backend serves no per-request adapters "
                                   "(serve with --backend eager, or fuse the LoRA at export)")
        log.warning("the %s backend serves no per-request adapters: requests naming adapters are refused",
                    runtime.spec.backend)
        return None
    for name, source, scale in config.initial:
        try:
            slots.load(name, source, scale)
        except AdapterError as exc:
            raise AdapterLoadError(f"--adapter {name}={source}: {exc}") from exc
    return slots


def adapter_slots(slots: AdapterSlots | None, backend: str) -> AdapterSlots:
    """`slots`, or AdapterError INVALID_ARGUMENT saying why this engine has none."""
    if slots is None:
        raise AdapterError("INVALID_ARGUMENT", f"adapters: this server serves no per-request adapters (the "
                           f"{backend} backend, or started without --adapter and --allow-adapter-loading)")
    return slots


def resolve_adapters(slots: AdapterSlots | None, adapters: Sequence[tuple[str, float]],
                     backend: str) -> tuple[SlotWeight, ...]:
    return adapter_slots(slots, backend).resolve(adapters)


def adapter_tensors(rows: Sequence[tuple[SlotWeight, ...]], device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Each row's adapters -> (slots (N, K) int64, scales (N, K) `dtype`) on `device`, or () when no row
    has an adapter (the call then runs the base model only)."""
    most = max((len(r) for r in rows), default=0)
    if most == 0:
        return ()
    k = 1 << (most - 1).bit_length()  # 1, 2, 4, 8...
    slots = torch.zeros(len(rows), k, dtype=torch.long)  # (N, K)
    scales = torch.zeros(len(rows), k, dtype=torch.float32)  # (N, K)
    for i, row in enumerate(rows):
        for j, weight in enumerate(row):
            slots[i, j] = weight.slot
            scales[i, j] = weight.scale
    return to_device(slots, device), to_device(scales, device).to(dtype)


def adapter_extras(rows: Sequence[tuple[SlotWeight, ...]], device: torch.device,
                   dtype: torch.dtype) -> tuple[tuple[str, torch.Tensor], ...]:
    """adapter_tensors as a UNetCall's named extras (export/unet_call.py)."""
    return tuple(zip(ADAPTER_EXTRAS, adapter_tensors(rows, device, dtype)))
