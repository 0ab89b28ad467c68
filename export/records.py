"""The manifest's records, typed from export to GetModelInfo: a LoRA fused in, the fuse parity check,
the tiny autoencoder, the candidate scorer. Each has one JSON form (`to_json`, `from_json`), what manifest.json holds.

No torch import: the manifest is read where torch may be absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoraRecord:
    """A LoRA fused into the model: what the manifest records about it (and GetModelInfo shows)."""

    source: str  # as given: a file, folder or hub id
    sha256: str  # of the weights file, hex
    scale: float
    format: str  # "diffusers" | "kohya"
    rank: int | None  # largest rank in the file
    targets: tuple[str, ...]  # components that got adapters: "unet", "text_encoder"
    modules: int  # number of adapted modules
    unmatched: tuple[str, ...] = ()  # modules of the file that match nothing (only with allow_partial)
    # While fusing only (not in the manifest): the adapter's name in the pipeline and the local file read.
    adapter_name: str = ""
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "scale": self.scale, "format": self.format,
                "rank": self.rank, "targets": list(self.targets), "modules": self.modules,
                "unmatched": list(self.unmatched)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoraRecord:
        rank = data.get("rank")
        return cls(source=str(data.get("source", "")), sha256=str(data.get("sha256", "")),
                   scale=float(data.get("scale", 1.0)), format=str(data.get("format", "")),
                   rank=None if rank is None else int(rank), targets=tuple(data.get("targets") or ()),
                   modules=int(data.get("modules", 0)), unmatched=tuple(data.get("unmatched") or ()))


@dataclass(frozen=True)
class ParityRecord:
    """The fuse check: fused vs unfused adapters on one small render, pixels in [0, 1]."""

    max_abs_diff: float
    tolerance: float
    passed: bool
    prompt: str
    seed: int
    height: int
    width: int
    steps: int
    guidance_scale: float

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "passed": self.passed,
                "prompt": self.prompt, "seed": self.seed, "height": self.height, "width": self.width,
                "steps": self.steps, "guidance_scale": self.guidance_scale}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParityRecord:
        return cls(max_abs_diff=float(data["max_abs_diff"]), tolerance=float(data["tolerance"]),
                   passed=bool(data["passed"]), prompt=str(data.get("prompt", "")), seed=int(data.get("seed", 0)),
                   height=int(data.get("height", 0)), width=int(data.get("width", 0)),
                   steps=int(data.get("steps", 0)), guidance_scale=float(data.get("guidance_scale", 1.0)))


@dataclass(frozen=True)
class TinyVaeRecord:
    """A tiny autoencoder (TAESD): where it came from and what scales its latents."""

    source: str  # as given: a preset, folder, artifact or hub id
    kind: str  # "preset" | "artifact" | "folder" | "hub"
    source_sha256: str | None  # of the source's weights file, when it had one
    scaling_factor: float  # its config.scaling_factor (TAESD: 1.0)
    sha256: str | None = None  # of an artifact's tiny_vae/ weights file (export writes it)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "kind": self.kind, "source_sha256": self.source_sha256,
                               "scaling_factor": self.scaling_factor}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TinyVaeRecord:
        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(source=str(data.get("source", "")), kind=str(data.get("kind", "")),
                   source_sha256=text("source_sha256"), scaling_factor=float(data.get("scaling_factor", 1.0)),
                   sha256=text("sha256"))


@dataclass(frozen=True)
class ScorerRecord:
    """The CLIP model that scores candidates (best-of-N, export/scorer.py): GetModelInfo.scorer."""

    source: str  # as given: "tiny", a folder, an artifact or a hub id
    kind: str  # "preset" | "artifact" | "folder" | "hub"
    sha256: str  # of its weights file (an artifact's: of scorer/model.safetensors); "" when it has none
    projection_dim: int  # the embedding both towers map to
    image_size: int  # input side of its image tower, pixels

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256,
                "projection_dim": self.projection_dim, "image_size": self.image_size}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScorerRecord:
        return cls(source=str(data.get("source", "")), kind=str(data.get("kind", "")),
                   sha256=str(data.get("sha256", "")), projection_dim=int(data.get("projection_dim", 0)),
                   image_size=int(data.get("image_size", 0)))


@dataclass(frozen=True)
class AdapterRecord:
    """A per-request LoRA adapter an engine holds in a slot (GetModelInfo.adapters, ListAdapters)."""

    name: str
    source: str  # file, folder or hub id, as given
    sha256: str  # of its weights file
    rank: int  # the largest rank of its modules
    targets: tuple[str, ...]  # parts it adapts: "unet", "text_encoder"
    default_scale: float  # what a request naming it without a scale gets
    format: str  # "kohya" | "diffusers"
    modules: int  # modules it adapts
    slot: int  # its slot in the engine's adapter buffers
