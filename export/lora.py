"""LoRA arguments and loading: `--lora SRC[:SCALE]` -> adapters attached to a pipeline, or a clear error.

A source is a `.safetensors` file, a folder holding one (`pytorch_lora_weights.safetensors`, or a
single `*.safetensors`), or a hub id (`latent-consistency/lcm-lora-sdv1-5`). Both diffusers/PEFT
and kohya_ss key layouts load through `pipe.load_lora_weights` (diffusers converts kohya keys,
`.alpha` included, for the UNet and the text encoder). What diffusers does not do is complain
when keys match no module (a LoRA for another model is dropped with a log line): `apply_loras`
counts the modules that really got the adapter and refuses a LoRA with keys left over.

No torch import at module level: the CLI parses `--lora` before importing torch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lcmserve.export.errors import LoraError
from lcmserve.export.records import LoraRecord
from lcmserve.export.sources import file_sha256, looks_like_hub_id

if TYPE_CHECKING:
    from lcmserve.export.pipeline import SDPipeline

log = logging.getLogger("lcmserve.export.lora")

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Markers inside a diffusers-layout key; what precedes the first is the adapted module's name.
_DIFFUSERS_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.", "_lora.")


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora` argument: where the weights are and how strongly to apply them."""

    source: str
    scale: float = 1.0
    allow_partial: bool = False  # attach what matches when some modules match nothing (warn, record)


def parse_lora_arg(arg: str, *, allow_partial: bool = False) -> LoraSpec:
    """Parse `SRC[:SCALE]` into a LoraSpec (scale 1.0 when absent).

    Splits at the last colon only when what follows parses as a number, so `C:\\loras\\x.safetensors`
    stays whole. A tail without a path separator that is not a number (`foo.safetensors:abc`) is a
    mistyped scale, not part of the name: that is an error, unless the whole string is an existing path.
    """
    if not arg:
        raise LoraError("--lora needs a source: a .safetensors file, a folder or a hub id")
    source, sep, tail = arg.rpartition(":")
    if not (sep and source):
        return LoraSpec(source=arg, allow_partial=allow_partial)
    try:
        scale = float(tail)
    except ValueError:
        if "/" in tail or "\\" in tail or Path(arg).expanduser().exists():
            return LoraSpec(source=arg, allow_partial=allow_partial)
        raise LoraError(f"scale {tail!r} of --lora {arg} is not a number") from None
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise LoraError(f"scale {tail!r} of --lora {arg} is not a finite number")
    return LoraSpec(source=source, scale=scale, allow_partial=allow_partial)


def resolve_source(source: str) -> Path:
    """The local .safetensors file for a source: a file, a folder holding one, or a hub id (downloaded
    or taken from the hub cache)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraError(f"LoRA file {path} is not a .safetensors file (pickled weights are not loaded)")
        return path
    if path.is_dir():
        default = path / DEFAULT_WEIGHT_NAME
        if default.is_file():
            return default
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise LoraError(f"LoRA folder {path} holds no .safetensors file")
        names = ", ".join(p.name for p in found[:5])
        raise LoraError(
            f"LoRA folder {path} holds {len(found)} .safetensors files ({names}); name the file instead"
        )
    if _looks_like_hub_id(source):
        return _download(source)
    raise LoraError(f"LoRA file {path} does not exist")


def _looks_like_hub_id(source: str) -> bool:
    """True for `org/name` with nothing path-like (no .safetensors suffix, no ./ ~ or second slash)."""
    return looks_like_hub_id(source) and not source.endswith(".safetensors")


def _download(repo_id: str) -> Path:
    """hub id -> local file (hub cache). Any hub failure becomes one LoraError naming the offline ways."""
    from huggingface_hub import hf_hub_download, list_repo_files

    offline_hint = (
        "to work offline pass a local .safetensors file or folder, or set HF_HUB_OFFLINE=1 with the "
        "LoRA already in the Hugging Face cache"
    )
    try:
        return Path(hf_hub_download(repo_id, DEFAULT_WEIGHT_NAME))
    except Exception as first:  # noqa: BLE001 - hub errors have many types; all end the same way
        if type(first).__name__ == "EntryNotFoundError":
            try:
                files = [f for f in list_repo_files(repo_id) if f.endswith(".safetensors")]
                if len(files) == 1:
                    return Path(hf_hub_download(repo_id, files[0]))
                raise LoraError(
                    f"LoRA hub repo {repo_id} has no {DEFAULT_WEIGHT_NAME} and {len(files)} other "
                    ".safetensors files; download the one you want and pass its path"
                ) from first
            except LoraError:
                raise
            except Exception as second:  # noqa: BLE001
                first = second
        reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
        raise LoraError(
            f"could not get LoRA {repo_id!r} from the Hugging Face hub ({type(first).__name__}: "
            f"{reason}); {offline_hint}"
        ) from first


# --- format detection and key bookkeeping ----------------------------------------------------------


def detect_format(keys: list[str]) -> str:
    """The key layout: "kohya" (lora_unet_* / lora_te_* keys), "diffusers" (unet./text_encoder. +
    lora_A/B or lora.down/up), or "unknown" (no LoRA-looking keys)."""
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(m in k for k in keys for m in _DIFFUSERS_MARKERS):
        return "diffusers"
    return "unknown"


def _file_modules(keys: list[str], fmt: str) -> dict[str, set[str]]:
    """Component -> names of the modules the file adapts, in the file's own spelling."""
    out: dict[str, set[str]] = {"unet": set(), "text_encoder": set(), "other": set()}
    for key in keys:
        if fmt == "kohya":
            name = key.split(".", 1)[0]
            comp = "unet" if name.startswith("lora_unet_") else "text_encoder"
            if name.startswith("lora_te2_"):
                comp = "other"  # SDXL's second text encoder: SD v1.5 has none
            out[comp].add(name)
        else:
            cut = min((key.find(m) for m in _DIFFUSERS_MARKERS if m in key), default=-1)
            name = key[:cut] if cut >= 0 else key
            comp = name.split(".", 1)[0]
            out[comp if comp in ("unet", "text_encoder") else "other"].add(name)
    return out


def _attached_modules(model: Any, adapter_name: str) -> list[str]:
    """Names of the modules of `model` that hold LoRA weights of `adapter_name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            lora_a = getattr(module, "lora_A", {})
            if adapter_name in lora_a:
                names.append(name)
    return names


def _spelled(comp: str, module_name: str, fmt: str) -> str:
    """A model module's name as the LoRA file spells it."""
    if fmt == "kohya":
        return ("lora_unet_" if comp == "unet" else "lora_te_") + module_name.replace(".", "_")
    return f"{comp}.{module_name}"


def _max_rank(state_dict: dict[str, Any], fmt: str) -> int | None:
    down = ".lora_down.weight" if fmt == "kohya" else ".lora_A."
    ranks = [int(v.shape[0]) for k, v in state_dict.items() if down in k and v.dim() >= 2]
    return max(ranks) if ranks else None


# --- attaching -------------------------------------------------------------------------------------


def apply_loras(pipe: SDPipeline, specs: list[LoraSpec]) -> list[LoraRecord]:
    """Load every LoRA as its own adapter (`lora_0`, `lora_1`, ...), check each one really attached,
    then activate them together with their scales (`set_adapters`). Raises LoraError on any problem;
    the pipeline may then hold part of an adapter: discard it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    records: list[LoraRecord] = []
    for i, spec in enumerate(specs):
        path = resolve_source(spec.source)
        try:
            state_dict = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise LoraError(f"LoRA file {path} could not be read as safetensors: {e}") from e
        keys = sorted(state_dict)
        fmt = detect_format(keys)
        if fmt == "unknown":
            example = ", ".join(repr(k) for k in keys[:3]) or "none"
            raise LoraError(
                f"LoRA {spec.source} has no LoRA weights: none of its {len(keys)} keys look like "
                f"lora_down/lora_up (kohya) or lora_A/lora_B (diffusers), e.g. {example}"
            )
        adapter = f"lora_{i}"
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters are the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # A copy: diffusers pops converted keys out of the dict it is given.
                pipe.load_lora_weights(dict(state_dict), adapter_name=adapter)
        except Exception as e:  # noqa: BLE001 - peft/diffusers raise ValueError, RuntimeError, KeyError...
            if "not found in the base model" in str(e):  # peft: no target module of a component exists
                attached = {c: _attached_modules(getattr(pipe, c), adapter) for c in ("unet", "text_encoder")}
                _check_attached(spec.source, fmt, _file_modules(keys, fmt), attached, n_keys=len(keys),
                                allow_partial=False)
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            # Two lines: torch puts "size mismatch for <param>" on the second.
            msg = " ".join(lines[:2])[:400] if lines else type(e).__name__
            raise LoraError(f"LoRA {spec.source} does not fit the model: {msg}") from e

        wanted = _file_modules(keys, fmt)
        attached = {
            comp: _attached_modules(getattr(pipe, comp), adapter)
            for comp in ("unet", "text_encoder")
            if getattr(pipe, comp, None) is not None
        }
        unmatched = _check_attached(spec.source, fmt, wanted, attached, n_keys=len(keys),
                                    allow_partial=spec.allow_partial)
        records.append(
            LoraRecord(
                source=spec.source,
                sha256=file_sha256(path),
                scale=spec.scale,
                format=fmt,
                rank=_max_rank(state_dict, fmt),
                targets=tuple(c for c in ("unet", "text_encoder") if attached.get(c)),
                adapter_name=adapter,
                path=str(path),
                modules=sum(len(v) for v in attached.values()),
                unmatched=tuple(unmatched),
            )
        )
    if records:
        pipe.set_adapters([r.adapter_name for r in records], adapter_weights=[r.scale for r in records])
    return records


def _check_attached(
    source: str, fmt: str, wanted: dict[str, set[str]], attached: dict[str, list[str]], n_keys: int,
    allow_partial: bool,
) -> list[str]:
    """Refuse a LoRA whose modules did not all become adapters (wrong base model, typo'd keys...),
    or, with allow_partial, warn and return the ones that match nothing. A LoRA that matches
    nothing at all is always refused."""
    total_wanted = sum(len(v) for v in wanted.values())
    total_attached = sum(len(v) for v in attached.values())
    if total_attached == 0:
        example = ", ".join(repr(k) for k in sorted(set().union(*wanted.values()))[:3])
        raise LoraError(
            f"LoRA {source} matches nothing in the model: none of its {total_wanted} modules "
            f"({n_keys} keys, {fmt} format) is a UNet or text-encoder module here, e.g. {example}; "
            "is it a LoRA for another base model?"
        )
    unmatched: list[str] = sorted(wanted["other"])
    for comp in ("unet", "text_encoder"):
        got = attached.get(comp, [])
        if len(got) >= len(wanted[comp]):
            continue
        spelled = {_spelled(comp, n, fmt) for n in got}
        missing = sorted(wanted[comp] - spelled)
        if fmt == "diffusers":  # older diffusers spellings ("attn1.processor.to_q_lora"): compare loosely
            missing = [m for m in missing if not any(s.startswith(m.split(".processor")[0]) for s in spelled)]
        unmatched += missing or [f"{len(wanted[comp]) - len(got)} {comp} module(s)"]
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        what = f"LoRA {source}: {len(unmatched)} of its {total_wanted} modules match nothing in the model ({shown})"
        if not allow_partial:
            raise LoraError(f"{what}; is it a LoRA for another base model? (--allow-partial-lora applies the "
                            "modules that do match and records the others in the manifest)")
        log.warning("%s; applying the other %d (--allow-partial-lora)", what, total_attached)
    return unmatched
