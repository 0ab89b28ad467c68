"""Per-request LoRA adapters: slots in the model's layers, and the files that fill them.

    install(unet, text_encoder, config)  every UNet Linear/Conv2d and every text-encoder projection that
                                         diffusers' load_lora_weights can adapt becomes a slot layer
                                         (adapter_layers.py) with S = max_adapters slots of rank R =
                                         max_adapter_rank, allocated once -> AdapterSlots
    AdapterSlots.load(name, source, s)   read a LoRA (kohya_ss or diffusers/PEFT) into a free slot
    AdapterSlots.unload(name)            new requests naming it are refused; its slot is freed by the
                                         loop's `sweep` once no request the engine holds references it
    AdapterSlots.resolve(adapters)       a request's (name, scale) pairs -> SlotWeights, or AdapterError

A file is read as diffusers reads it, by diffusers itself: `load_lora_weights` into a skeleton of the
served UNet and text encoder (the served configs, weights left uninitialized on the CPU), then each
adapted module's lora_A, lora_B and PEFT scaling (alpha / rank: kohya's `.alpha`, PEFT metadata, rank and
alpha patterns) are copied out; the skeleton is dropped. So the factors and scaling are exactly those of
diffusers' `load_lora_weights` + `set_adapters` (unfused), kohya conv layers (LoCon) included. Writing a
slot only changes buffer values: in-flight requests (which reference other slots) are unaffected, and no
compiled graph or CUDA graph changes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from lcmserve.export.errors import LoraError

from ..config import AdapterConfig
from lcmserve.export.records import AdapterRecord
from .adapter_layers import AdapterRows, SlotConv2d, SlotLayer, SlotLinear

log = logging.getLogger("lcmserve.adapters")

# The per-row UNetCall extras (export/unet_call.py) a UNet with adapter slots reads, in this order.
ADAPTER_EXTRAS: tuple[str, ...] = ("adapter_slots", "adapter_scales")
# Text-encoder modules diffusers adapts (diffusers.loaders.lora_base._load_lora_into_text_encoder).
TEXT_ENCODER_MODULES: tuple[str, ...] = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder")


class AdapterError(Exception):
    """A LoadAdapter, UnloadAdapter or request that cannot be served: `code` names the gRPC status
    ("INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED"), the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SlotWeight:
    """One adapter of a request, resolved: its slot, its scale, the load it belongs to (`uid`: a slot
    reused by a later load gets another), whether it adapts the text encoder."""

    slot: int
    scale: float
    uid: int
    text_encoder: bool


class WithAdapterRows(torch.nn.Module):
    """A step module (UNetStep, TextEncode) that reads the adapter extras: the first `n_inputs` tensors
    go to the module, the last two (slots (B, K) int64, scales (B, K)) to the slot layers for this call."""

    def __init__(self, module: torch.nn.Module, rows: AdapterRows, n_inputs: int) -> None:
        super().__init__()
        self.module = module
        self.rows = rows
        self.n_inputs = n_inputs

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = self.n_inputs
        if len(inputs) not in (n, n + len(ADAPTER_EXTRAS)):
            raise ValueError(f"{type(self.module).__name__} takes {n} tensors, then optionally "
                             f"{', '.join(ADAPTER_EXTRAS)}; got {len(inputs)}")
        if len(inputs) > n:
            self.rows.slots, self.rows.scales = inputs[n], inputs[n + 1]
        try:
            out: torch.Tensor = self.module(*inputs[:n])
        finally:
            self.rows.slots = self.rows.scales = None
        return out


def adaptable(component: str, name: str, module: torch.nn.Module) -> bool:
    """Does this module get adapter slots? Every Linear and Conv2d of the UNet; the text encoder's
    attention and MLP projections (all diffusers adapts there)."""
    if component == "unet":
        return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and getattr(module, "groups", 1) == 1
    return isinstance(module, torch.nn.Linear) and name.endswith(TEXT_ENCODER_MODULES)


@dataclass
class _Loaded:
    record: AdapterRecord
    uid: int
    text_encoder: bool
    unloading: bool = False
    layers: frozenset[tuple[str, str]] = frozenset()  # the slot layers it adapts


@dataclass
class _Factors:
    """One adapted module's factors as diffusers holds them: A (r, in[, kh, kw]), B (out, r[, 1, 1]),
    and PEFT's scaling (alpha / r) for that module."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float


@dataclass
class LoraFile:
    path: Path
    format: str
    sha256: str
    modules: dict[tuple[str, str], _Factors] = field(default_factory=dict)  # (component, module name) ->

    @property
    def rank(self) -> int:
        return max(f.down.shape[0] for f in self.modules.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(comp == c for comp, _ in self.modules))


class AdapterSlots:
    """The slot layers of one model and which adapter holds which slot. Thread-safe: the engine process's
    receiver thread loads, unloads and resolves; the loop thread sweeps."""

    def __init__(self, layers: dict[tuple[str, str], SlotLayer], configs: dict[str, Any], config: AdapterConfig,
                 unet_rows: AdapterRows, text_rows: AdapterRows) -> None:
        self.layers = layers  # (component, module name) -> its slot layer
        self.configs = configs  # component -> the served model's config (the skeleton's)
        self.config = config
        self.unet_rows = unet_rows
        self.text_rows = text_rows
        self._lock = threading.Lock()
        self._by_name: dict[str, _Loaded] = {}
        self._free = list(range(config.max_adapters))
        self._uids = itertools.count(1)
        self._all_live = False
        self._set_live()

    def keep_all_live(self) -> None:
        """Every slot layer computes its delta from now on, adapted or not: for callers that capture or
        trace the model (CUDA graphs), which would keep a skipped layer skipped after a later load."""
        self._all_live = True
        self._set_live()

    def _set_live(self) -> None:
        """Each layer's `live`: adapted by a loaded adapter (or all, once keep_all_live)."""
        with self._lock:
            adapted = set().union(*(a.layers for a in self._by_name.values()))
        for key, layer in self.layers.items():
            layer.live = self._all_live or key in adapted

    @property
    def slots(self) -> int:
        return self.config.max_adapters

    @property
    def rank(self) -> int:
        return self.config.max_adapter_rank

    def bytes_per_slot(self) -> int:
        """Memory one slot takes across every slot layer (both factors)."""
        return sum((layer.down[0].numel() + layer.up[0].numel()) * layer.down.element_size()
                   for layer in self.layers.values())

    def records(self) -> tuple[AdapterRecord, ...]:
        with self._lock:
            return tuple(a.record for a in self._by_name.values() if not a.unloading)

    def unloading(self) -> bool:
        """Is an unloaded adapter's slot still waiting for its requests to finish?"""
        with self._lock:
            return any(a.unloading and a.uid for a in self._by_name.values())

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, a in self._by_name.items() if not a.unloading)

    # ---- load / unload ------------------------------------------------------------------------------

    def load(self, name: str, source: str, scale: float) -> AdapterRecord:
        """Read `source` into a free slot; its record. AdapterError: a taken name (ALREADY_EXISTS), no free
        slot (RESOURCE_EXHAUSTED), a file that cannot be used (INVALID_ARGUMENT, with the reason)."""
        with self._lock:
            if name in self._by_name:
                why = " (it is being unloaded: try again once its requests finish)" if self._by_name[name].unloading \
                    else ""
                raise AdapterError("ALREADY_EXISTS", f"an adapter named {name!r} is already loaded{why}")
            if not self._free:
                raise AdapterError("RESOURCE_EXHAUSTED",
                                   f"all {self.slots} adapter slots are taken (--max-adapters {self.slots}): "
                                   f"unload one of {', '.join(sorted(self._by_name))} first")
            slot = self._free.pop(0)
            placeholder = _Loaded(AdapterRecord(name, source, "", 0, (), scale, "", 0, slot), 0, False, unloading=True)
            self._by_name[name] = placeholder  # the name and slot are held while the file is read
        try:
            lora = self._read(source)
            self._write(slot, lora)
        except BaseException:
            with self._lock:
                del self._by_name[name]
                self._free.append(slot)
                self._free.sort()
            raise
        record = AdapterRecord(name=name, source=source, sha256=lora.sha256, rank=lora.rank, targets=lora.targets,
                               default_scale=scale, format=lora.format, modules=len(lora.modules), slot=slot)
        with self._lock:
            self._by_name[name] = _Loaded(record, next(self._uids), "text_encoder" in lora.targets,
                                          layers=frozenset(lora.modules))
        self._set_live()  # after the write: a layer turned live adds what its slot holds
        log.info("adapter %s loaded into slot %d: %s (%s, rank %d, %d modules of %s)", name, slot, source,
                 lora.format, lora.rank, len(lora.modules), ", ".join(lora.targets))
        return record

    def unload(self, name: str) -> None:
        """Refuse new requests naming `name` from now on; its slot is freed by a later `sweep` (the engine's
        loop, which knows the requests it holds). AdapterError NOT_FOUND for a name not loaded."""
        with self._lock:
            loaded = self._by_name.get(name)
            if loaded is None or loaded.unloading:
                names = sorted(n for n, a in self._by_name.items() if not a.unloading)
                raise AdapterError("NOT_FOUND", f"no adapter named {name!r} is loaded (loaded: "
                                   f"{', '.join(names) or 'none'})")
            loaded.unloading = True

    def sweep(self, referenced: Iterable[int]) -> list[str]:
        """Free the slots of unloaded adapters that no slot in `referenced` (the slots of every request the
        engine still holds) names: their buffers are zeroed. Returns the names freed."""
        busy = set(referenced)
        with self._lock:
            gone = [(n, a) for n, a in self._by_name.items() if a.unloading and a.uid and a.record.slot not in busy]
            for n, _ in gone:
                del self._by_name[n]
        if gone:
            self._set_live()
        for n, a in gone:
            self._zero(a.record.slot)
            with self._lock:
                self._free.append(a.record.slot)
                self._free.sort()
            log.info("adapter %s unloaded; slot %d is free", n, a.record.slot)
        return [n for n, _ in gone]

    def resolve(self, adapters: Sequence[tuple[str, float]]) -> tuple[SlotWeight, ...]:
        """A request's (name, scale) pairs -> its slots; AdapterError INVALID_ARGUMENT naming
        `adapters[i].name` for a name not loaded (or being unloaded)."""
        if len(adapters) > self.config.max_adapters_per_request:
            raise AdapterError("INVALID_ARGUMENT", f"adapters: {len(adapters)} adapters, at most "
                               f"{self.config.max_adapters_per_request} per request (--max-adapters-per-request)")
        out = []
        with self._lock:
            for i, (name, scale) in enumerate(adapters):
                loaded = self._by_name.get(name)
                if loaded is None or loaded.unloading:
                    names = sorted(n for n, a in self._by_name.items() if not a.unloading)
                    raise AdapterError("INVALID_ARGUMENT", f"adapters[{i}].name: no adapter named {name!r} is "
                                       f"loaded (loaded: {', '.join(names) or 'none'})")
                out.append(SlotWeight(loaded.record.slot, float(scale), loaded.uid, loaded.text_encoder))
        return tuple(out)

    # ---- slots --------------------------------------------------------------------------------------

    def _read(self, source: str) -> LoraFile:
        try:
            lora = read_lora(source, self.configs)
        except LoraError as exc:
            raise AdapterError("INVALID_ARGUMENT", str(exc)) from exc
        missing = [f"{c}.{n}" for c, n in lora.modules if (c, n) not in self.layers]
        if missing:
            raise AdapterError("INVALID_ARGUMENT", f"LoRA {source} adapts {len(missing)} modules that hold no adapter "
                               f"slots here (e.g. {', '.join(missing[:3])})")
        if lora.rank > self.rank:
            worst = max(lora.modules.items(), key=lambda item: item[1].down.shape[0])
            raise AdapterError("INVALID_ARGUMENT", f"LoRA {source} has rank {lora.rank} (module "
                               f"{'.'.join(worst[0])}), over the limit of {self.rank} (--max-adapter-rank)")
        return lora

    @torch.inference_mode()
    def _write(self, slot: int, lora: LoraFile) -> None:
        for key, layer in self.layers.items():
            factors = lora.modules.get(key)
            if factors is None:
                layer.down[slot].zero_()
                layer.up[slot].zero_()
                continue
            r = factors.down.shape[0]
            down = torch.zeros_like(layer.down[slot], device="cpu", dtype=torch.float32)  # (R, in[, kh, kw])
            down[:r] = factors.down
            up = torch.zeros_like(layer.up[slot], device="cpu", dtype=torch.float32)  # (R, out)
            up[:r] = (factors.up.reshape(factors.up.shape[0], r) * factors.scaling).T
            layer.down[slot].copy_(down)
            layer.up[slot].copy_(up)

    @torch.inference_mode()
    def _zero(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.down[slot].zero_()
            layer.up[slot].zero_()


def install(unet: torch.nn.Module, text_encoder: torch.nn.Module, config: AdapterConfig) -> AdapterSlots:
    """Replace every adaptable module (`adaptable`) of the served UNet and text encoder by its slot layer,
    in place; the AdapterSlots that fills them. The step modules must read the rows: WithAdapterRows."""
    if config.max_adapters < 1 or config.max_adapter_rank < 1:
        raise ValueError(f"adapter slots need --max-adapters >= 1 and --max-adapter-rank >= 1, got "
                         f"{config.max_adapters} and {config.max_adapter_rank}")
    unet_rows, text_rows = AdapterRows(), AdapterRows()
    layers: dict[tuple[str, str], SlotLayer] = {}
    for component, model, rows in (("unet", unet, unet_rows), ("text_encoder", text_encoder, text_rows)):
        chosen = [(n, m) for n, m in model.named_modules() if n and adaptable(component, n, m)]
        for name, module in chosen:
            layer: SlotLayer
            if isinstance(module, torch.nn.Conv2d):
                layer = SlotConv2d(module, rows, config.max_adapters, config.max_adapter_rank)
            else:
                assert isinstance(module, torch.nn.Linear)
                layer = SlotLinear(module, rows, config.max_adapters, config.max_adapter_rank)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            layers[(component, name)] = layer
    configs = {"unet": dict(getattr(unet, "config")), "text_encoder": getattr(text_encoder, "config")}
    slots = AdapterSlots(layers, configs, config, unet_rows, text_rows)
    log.info("adapter slots: %d layers, %d slots of rank %d, %.1f MiB per slot", len(layers), config.max_adapters,
             config.max_adapter_rank, slots.bytes_per_slot() / 2**20)
    return slots


# ---- reading a LoRA file, as diffusers does ----------------------------------------------------------


def read_lora(source: str, configs: dict[str, Any]) -> LoraFile:
    """The factors of every module the LoRA `source` adapts, read by diffusers' own `load_lora_weights`
    into a skeleton of the served model (module doc). LoraError: unreadable, no LoRA keys, matching
    nothing or only part of the model (another base model?), DoRA or LoRA biases (not served)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lcmserve.export.lora import _attached_modules, _check_attached, _file_modules, detect_format, resolve_source
    from lcmserve.export.sources import file_sha256

    path = resolve_source(source)
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"LoRA file {path} could not be read as safetensors: {e}") from e
    keys = sorted(state_dict)
    fmt = detect_format(keys)
    if fmt == "unknown":
        example = ", ".join(repr(k) for k in keys[:3]) or "none"
        raise LoraError(f"LoRA {source} has no LoRA weights: none of its {len(keys)} keys look like lora_down/lora_up "
                        f"(kohya) or lora_A/lora_B (diffusers), e.g. {example}")

    class Skeleton(StableDiffusionLoraLoaderMixin):  # what load_lora_weights needs of a pipeline
        hf_device_map = None

        def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
            self.unet, self.text_encoder = unet, text_encoder

        @property
        def components(self) -> dict[str, torch.nn.Module]:
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    skeleton = Skeleton(*_skeleton_models(configs))
    adapter = "adapter"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton.load_lora_weights(dict(state_dict), adapter_name=adapter)
    except Exception as e:  # noqa: BLE001 - peft/diffusers raise ValueError, RuntimeError, KeyError...
        attached = {c: _attached_modules(getattr(skeleton, c), adapter) for c in COMPONENTS}
        _check_attached(source, fmt, _file_modules(keys, fmt), attached, n_keys=len(keys), allow_partial=False)
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise LoraError(f"LoRA {source} does not fit the model: {' '.join(lines[:2])[:400]}") from e
    attached = {c: _attached_modules(getattr(skeleton, c), adapter) for c in COMPONENTS}
    _check_attached(source, fmt, _file_modules(keys, fmt), attached, n_keys=len(keys), allow_partial=False)

    lora = LoraFile(path=path, format=fmt, sha256=file_sha256(path))
    for component in COMPONENTS:
        for name, layer in getattr(skeleton, component).named_modules():
            if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
                continue
            module: Any = layer  # (peft's ModuleDicts: mypy sees their items as Tensors)
            if module.use_dora.get(adapter, False) or getattr(module.lora_B[adapter], "bias", None) is not None:
                raise LoraError(f"LoRA {source}: module {component}.{name} is a DoRA or has a LoRA bias: only plain "
                                "LoRA factors are served as adapters (fuse it at export instead)")
            down = module.lora_A[adapter].weight.detach().float().clone()
            up = module.lora_B[adapter].weight.detach().float().clone()
            if up.dim() == 4 and up.shape[2:] != (1, 1):
                raise LoraError(f"LoRA {source}: module {component}.{name} has a {tuple(up.shape[2:])} up kernel; "
                                "only 1x1 up convolutions are served as adapters")
            lora.modules[(component, name)] = _Factors(down, up, float(module.scaling[adapter]))
    del skeleton
    return lora


def _skeleton_models(configs: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The served UNet and text encoder's architecture on the CPU, weights allocated but never written
    (untouched memory: no resident pages), for diffusers to attach a LoRA to."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet = cast(Any, UNet2DConditionModel).from_config(configs["unet"])
        text_encoder = CLIPTextModel(configs["text_encoder"])
    return unet.to_empty(device="cpu"), text_encoder.to_empty(device="cpu")
