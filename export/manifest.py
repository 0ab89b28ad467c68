"""`manifest.json` of an export artifact: what was fused, how, where, and whether it checked out.

An artifact folder is `model/` (a diffusers folder), `manifest.json`, and `compiled/` when a
compiled backend was built. The manifest is plain JSON so other tools (and people) can read it:

    {"format_version": 1, "base": "tiny", "base_kind": "preset",
     "loras": [{"source": "...", "sha256": "...", "scale": 0.8, "format": "kohya", "rank": 4,
                "targets": ["unet", "text_encoder"], "modules": 12}],
     "dtype": "float32", "device": "cpu", "device_arch": "cpu-x86_64", "device_name": "...",
     "backend": "eager", "compiled": {}, "scheduler": "LCMScheduler",
     "versions": {"lcmserve": "0.1.0", "torch": "...", ...}, "created": "2025-01-01T00:00:00+00:00",
     "parity": {"max_abs_diff": 1e-07, "tolerance": 0.001, "passed": true, ...}}
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lcmserve.export.errors import ModelNotFoundError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_DIR = "model"
COMPILED_DIR = "compiled"


@dataclass
class Manifest:
    base: str  # as given: a preset name, a folder, or a hub id
    base_kind: str  # "preset" | "folder" | "artifact" | "hub"
    loras: list[dict[str, Any]]  # LoraRecord.to_json() of each, in the order they were applied
    dtype: str  # "float32" | "float16" | "bfloat16"
    device: str  # "cpu" | "cuda" | "cuda:1" ...
    device_arch: str  # "sm_90" for CUDA capability 9.0, "cpu-x86_64" on a CPU
    device_name: str
    backend: str = "eager"  # "eager" | "compile" | "aoti" | "onnx"
    # Per backend, what the compiler wrote under compiled/ (filled by lcmserve.export.compile).
    compiled: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "LCMScheduler"
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""  # UTC, ISO 8601
    # {"max_abs_diff", "tolerance", "passed", "prompt", "seed", "height", "width", "steps",
    #  "guidance_scale"}: fused vs unfused adapters, pixels in [0, 1]. None when there was no LoRA.
    parity: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # newer keys are ignored

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an artifact folder (ModelNotFoundError when there is none or it is unreadable)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder} is not an lcmserve artifact: no {MANIFEST_NAME}") from None
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read {path}: {e}") from e
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelNotFoundError(
            f"{path} has format_version {version!r}; this lcmserve reads up to {FORMAT_VERSION}"
        )
    return Manifest.from_json(data)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("lcmserve", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def device_architecture(device: str) -> tuple[str, str]:
    """(arch, name): ("sm_90", "NVIDIA H100 80GB HBM3") for CUDA, ("cpu-x86_64", processor) else."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"sm_{major}{minor}", torch.cuda.get_device_name(index)
    return f"cpu-{platform.machine() or 'unknown'}", _cpu_name()


def _cpu_name() -> str:
    try:  # Linux: the marketing name; platform.processor() there is often just "x86_64" or ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
