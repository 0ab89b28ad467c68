"""The artifact contract: what `lcmserve export` writes and `lcmserve serve` reads. The one owner of it.

An artifact is a folder:

    model/          a diffusers folder (StableDiffusionPipeline.from_pretrained loads it), LoRAs fused
    tiny_vae/       optional: a tiny autoencoder (diffusers' AutoencoderTiny folder, TAESD), from --tiny-vae
    scorer/         optional: the candidate scorer (a CLIPModel + CLIPProcessor folder), from --scorer
    compiled/<b>/   per compiled backend b: the files of PARTS[b]
    manifest.json   written last (a folder with a manifest is complete), by `Manifest.write` only;
                    read by `read_manifest` only, which refuses a format_version it does not know

    {"format_version": 1, "base": "tiny", "base_kind": "preset",
     "loras": [{"source": "...", "sha256": "...", "scale": 0.8, "format": "kohya", "rank": 4,
                "targets": ["unet", "text_encoder"], "modules": 12, "unmatched": []}],
     "dtype": "float32", "device": "cpu", "device_arch": "cpu-x86_64-avx2", "device_name": "...",
     "backend": "eager", "compiled": {"aoti": {...an AotiEntry...}}, "scheduler": "LCMScheduler",
     "versions": {"lcmserve": "0.1.0", "torch": "...", ...}, "created": "2025-01-01T00:00:00+00:00",
     "parity": {"max_abs_diff": 1e-07, "tolerance": 0.001, "passed": true, ...}}

Machine identity (`device_arch`) has one meaning everywhere: the CUDA capability (`sm_90`), or on a
CPU the machine and the vector ISA that inductor's C++ code and ATen's kernels are built for
(`cpu-x86_64-avx2`). A compiled entry is served only where it was made (`check_runs_here`): aoti and
compile need the same arch and torch build; onnx, whose files hold no ISA-specific code, the same
coarse arch (`cpu-x86_64`) and onnxruntime version.

No torch import at module level: the CLIs read BACKENDS and DTYPES where torch may be absent.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lcmserve.export import unet_call
from lcmserve.export.errors import ModelNotFoundError
from lcmserve.export.records import LoraRecord, ParityRecord, ScorerRecord, TinyVaeRecord

if TYPE_CHECKING:
    from torch import device as TorchDevice  # a plain name: CompiledEntry has a field called `torch`

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_DIR = "model"
TINY_VAE_DIR = "tiny_vae"
SCORER_DIR = "scorer"
COMPILED_DIR = "compiled"

BACKENDS: tuple[str, ...] = ("eager", "compile", "aoti", "onnx")
COMPILED_BACKENDS: tuple[str, ...] = ("aoti", "compile", "onnx")  # best first: what `--backend auto` tries
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")

MAX_BATCH = 63  # rows per call of an exported part; Dim("batch", max=64) fails a UNet guard (batch >= 64)
IMAGE_SIDE_RANGE = (64, 1024)  # pixels, as the request validation allows

# File names inside compiled/<backend>/, per part.
PARTS: dict[str, dict[str, str]] = {
    # vae_encoder (img2img, inpainting) is optional when reading: artifacts from before it serve it eagerly.
    # tiny_vae_decoder (TAESD's decoder) is written only for an artifact with tiny_vae/, and optional when
    # reading (artifacts from before it, or without a tiny autoencoder, run tiny_vae/ eagerly).
    "aoti": {"text_encoder": "text_encoder.pt2", "unet": "unet.pt2", "vae_decoder": "vae_decoder.pt2",
             "vae_encoder": "vae_encoder.pt2", "tiny_vae_decoder": "tiny_vae_decoder.pt2"},
    "onnx": {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx", "vae_decoder": "vae_decoder.onnx",
             "vae_encoder": "vae_encoder.onnx", "tiny_vae_decoder": "tiny_vae_decoder.onnx"},
    # torch.compiler.save_cache_artifacts() bytes, and the C++ kernels inductor built on the CPU
    # (the mega-cache bundles Triton kernels but not these: without them a CPU start rebuilds each).
    "compile": {"cache": "inductor_cache.bin", "cpp_kernels": "cpp_kernels"},
}
# Names of the exported inputs / output of each part (ONNX graph names), in the order the graphs take
# them; the UNet's are UNetCall's fields (export/unet_call.py).
IO_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "text_encoder": (("input_ids",), "hidden"),
    "unet": (unet_call.INPUT_NAMES, unet_call.OUTPUT_NAME),
    "vae_decoder": (("latents",), "pixels"),
    "vae_encoder": (("pixels",), "moments"),
    "tiny_vae_decoder": (("latents",), "pixels"),
}
# Parts an artifact may lack (see PARTS): its runtimes then run them eagerly.
OPTIONAL_PARTS: tuple[str, ...] = ("vae_encoder", "tiny_vae_decoder")


class ArtifactMismatchError(RuntimeError):
    """A compiled artifact made for another device architecture or library version than this machine's."""


# --- machine identity -----------------------------------------------------------------------------


def device_arch(device: str | TorchDevice) -> str:
    """The machine identity: `sm_90` for a CUDA device (its compute capability), `cpu-x86_64-avx2` for
    the CPU (machine, and the vector ISA torch dispatches to here: "avx2", "avx512", "default"...)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} asked for, but this torch {torch.__version__} sees no CUDA device")
        major, minor = torch.cuda.get_device_capability(dev)
        return f"sm_{major}{minor}"
    isa = torch.backends.cpu.get_cpu_capability().lower()
    return f"cpu-{platform.machine().lower()}-{isa}"


def coarse_arch(arch: str) -> str:
    """`cpu-x86_64-avx2` -> `cpu-x86_64` (what an ONNX file depends on); CUDA archs unchanged."""
    return "-".join(arch.split("-")[:2]) if arch.startswith("cpu-") else arch


def device_name(device: str | TorchDevice) -> str:
    """For people reading the manifest: "NVIDIA H100 80GB HBM3", "AMD EPYC 7B13"."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return str(torch.cuda.get_device_name(dev))
    try:  # Linux: the marketing name; platform.processor() there is often just "x86_64" or ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime  # type: ignore[import-untyped]  # onnxruntime ships no type information
    except ImportError:
        return None
    return str(onnxruntime.__version__)


# --- compiled entries: manifest["compiled"][backend] ----------------------------------------------


@dataclass(frozen=True)
class Served:
    """Shapes the exported graphs hold; others run on the eager modules of model/ (aoti, onnx).

    batch_range: rows per call, (1, 63); a None upper end means any (compile). Larger batches run in
    chunks. Latent sides (pixels / vae scale): the UNet's are multiples of `unet_latent_multiple` in
    `unet_latent_range`, the VAE decoder's in `vae_latent_range`; `any_shape` (compile): no limit.
    """

    batch_range: tuple[int, int | None]
    unet_latent_multiple: int = 1
    unet_latent_range: tuple[int, int] | None = None
    vae_latent_range: tuple[int, int] | None = None
    any_shape: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch_range": list(self.batch_range)}
        if self.any_shape:
            out["any_shape"] = True
        else:
            out["unet_latent_multiple"] = self.unet_latent_multiple
            out["unet_latent_range"] = list(self.unet_latent_range) if self.unet_latent_range else None
            out["vae_latent_range"] = list(self.vae_latent_range) if self.vae_latent_range else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Served:
        def pair(key: str) -> tuple[int, int] | None:
            value = data.get(key)
            return (int(value[0]), int(value[1])) if value else None

        lo, hi = data.get("batch_range") or (1, MAX_BATCH)
        return cls(batch_range=(int(lo), None if hi is None else int(hi)),
                   unet_latent_multiple=int(data.get("unet_latent_multiple", 1)),
                   unet_latent_range=pair("unet_latent_range"), vae_latent_range=pair("vae_latent_range"),
                   any_shape=bool(data.get("any_shape", False)))


@dataclass(frozen=True, kw_only=True)
class CompiledEntry:
    """What a compiled backend's export made, for which machine, and what it serves (common part)."""

    backend: ClassVar[str] = ""
    device: str  # "cpu" | "cuda"
    device_arch: str  # device_arch() of the exporting machine
    device_name: str
    torch: str  # torch.__version__ at export
    python: str
    dtype: str  # one of DTYPES
    optimizations: tuple[str, ...]  # module rewrites applied before export (adapters.optimizations_for)
    files: dict[str, str]  # part -> path relative to the artifact folder
    served: Served
    parity_max_abs_diff: dict[str, float | str]  # part -> max |compiled - eager| at the example shape
    export_seconds: dict[str, Any]  # per part / step, and "total"

    def made_for(self) -> dict[str, str | None]:
        """The identity this entry needs of a machine (compared with `identity_here`)."""
        return {"device_arch": self.device_arch, "torch": self.torch}

    @classmethod
    def identity_here(cls, device: str | TorchDevice) -> dict[str, str | None]:
        import torch

        return {"device_arch": device_arch(device), "torch": torch.__version__}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json() if isinstance(value, Served) else _plain(value)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CompiledEntry:
        """The entry of `data` (one manifest["compiled"] value); newer keys are ignored."""
        known = {f.name: f for f in fields(cls)}
        missing = [name for name, f in known.items() if name not in data and _required(f)]
        if missing:
            raise ModelNotFoundError(f"{MANIFEST_NAME}: compiled.{cls.backend} lacks {', '.join(missing)}: re-export")
        return cls(**cls._typed({k: v for k, v in data.items() if k in known}))

    @classmethod
    def _typed(cls, values: dict[str, Any]) -> dict[str, Any]:
        """JSON values -> the field types (lists -> tuples, the nested Served)."""
        values["served"] = Served.from_json(values.get("served") or {})
        values["optimizations"] = tuple(values.get("optimizations") or ())
        values["files"] = {str(k): str(v) for k, v in (values.get("files") or {}).items()}
        return values


@dataclass(frozen=True, kw_only=True)
class AotiEntry(CompiledEntry):
    """AOTInductor `.pt2` packages of the parts (PARTS["aoti"]; OPTIONAL_PARTS may be absent)."""

    backend: ClassVar[str] = "aoti"
    shapes: dict[str, Any] = field(default_factory=dict)  # exported input/output shapes and dims, for people


@dataclass(frozen=True, kw_only=True)
class OnnxEntry(CompiledEntry):
    """ONNX files of the parts (PARTS["onnx"], `<part>_data` external weights; OPTIONAL_PARTS may be
    absent)."""

    backend: ClassVar[str] = "onnx"
    onnxruntime: str | None = None  # onnxruntime.__version__ at export (its parity check ran there)
    shapes: dict[str, Any] = field(default_factory=dict)

    def made_for(self) -> dict[str, str | None]:
        return {"device_arch": coarse_arch(self.device_arch), "onnxruntime": self.onnxruntime}

    @classmethod
    def identity_here(cls, device: str | TorchDevice) -> dict[str, str | None]:
        return {"device_arch": coarse_arch(device_arch(device)), "onnxruntime": onnxruntime_version()}


@dataclass(frozen=True, kw_only=True)
class CompileEntry(CompiledEntry):
    """torch.compile caches (PARTS["compile"]) of the UNet and VAE decode, warmed at `warm_shapes`; also of
    the tiny autoencoder's decoder where warm_shapes has "tiny_vae_decoder" (artifacts with tiny_vae/;
    older ones, without it, run tiny_vae/ eagerly)."""

    backend: ClassVar[str] = "compile"
    torch_compile: dict[str, Any] = field(default_factory=dict)  # torch.compile kwargs used at export
    warm_shapes: dict[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)  # part -> (B, h, w)
    cache_bytes: int = 0
    cpp_kernels: int = 0

    @classmethod
    def _typed(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = super()._typed(values)
        values["warm_shapes"] = {str(part): tuple((int(b), int(h), int(w)) for b, h, w in shapes)
                                 for part, shapes in (values.get("warm_shapes") or {}).items()}
        return values


ENTRY_TYPES: dict[str, type[CompiledEntry]] = {t.backend: t for t in (AotiEntry, CompileEntry, OnnxEntry)}


def check_runs_here(artifact_dir: Path, entry: CompiledEntry, device: str | TorchDevice) -> None:
    """Raise ArtifactMismatchError unless `entry` was made for this machine, FileNotFoundError when one
    of its files is missing."""
    import torch

    expected = entry.identity_here(device)
    found = entry.made_for()
    diffs = [f"{key} {found.get(key)!r} (this machine: {want!r})" for key, want in expected.items()
             if found.get(key) != want]
    if diffs:
        raise ArtifactMismatchError(
            f"{artifact_dir}: the {entry.backend} artifact was made for {', '.join(diffs)}. Compiled code "
            f"only runs where it was built: re-export on this machine, e.g. `lcmserve export --base "
            f"{Path(artifact_dir) / MODEL_DIR} --backend {entry.backend} --device {torch.device(device).type} "
            f"--out NEW_DIR` (model/ already has the LoRAs fused), or serve this one with --backend eager."
        )
    for name in entry.files.values():
        if not (Path(artifact_dir) / name).exists():
            raise FileNotFoundError(f"{artifact_dir}: {name} listed in {MANIFEST_NAME} is missing: re-export")


# --- the manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    base: str  # as given: a preset name, a folder, or a hub id
    base_kind: str  # "preset" | "folder" | "artifact" | "hub"
    loras: tuple[LoraRecord, ...]  # in the order they were applied
    dtype: str  # one of DTYPES
    device: str  # "cpu" | "cuda" | "cuda:1" ...
    device_arch: str  # device_arch(device)
    device_name: str
    backend: str = "eager"  # one of BACKENDS: what the export was asked for
    compiled: Mapping[str, CompiledEntry] = field(default_factory=dict)  # backend -> its entry
    scheduler: str = "LCMScheduler"
    versions: Mapping[str, str] = field(default_factory=dict)
    created: str = ""  # UTC, ISO 8601
    parity: ParityRecord | None = None  # fused vs unfused adapters; None when there was no LoRA
    tiny_vae: TinyVaeRecord | None = None  # its sha256 is tiny_vae/'s weights file's; None: no tiny_vae/
    scorer: ScorerRecord | None = None  # its sha256 is scorer/'s weights file's; None: no scorer/
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        out["loras"] = [record.to_json() for record in self.loras]
        out["compiled"] = {name: entry.to_json() for name, entry in self.compiled.items()}
        out["parity"] = self.parity.to_json() if self.parity else None
        out["tiny_vae"] = self.tiny_vae.to_json() if self.tiny_vae else None
        out["scorer"] = self.scorer.to_json() if self.scorer else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """Newer keys, and compiled entries of backends this version does not know, are ignored."""
        known = {f.name: f for f in fields(cls)}
        missing = [name for name, f in known.items() if name not in data and _required(f)]
        if missing:
            raise ModelNotFoundError(f"{MANIFEST_NAME} lacks {', '.join(missing)}: not an lcmserve artifact")
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = tuple(LoraRecord.from_json(record) for record in data.get("loras") or ())
        values["parity"] = ParityRecord.from_json(data["parity"]) if data.get("parity") else None
        values["tiny_vae"] = TinyVaeRecord.from_json(data["tiny_vae"]) if data.get("tiny_vae") else None
        values["scorer"] = ScorerRecord.from_json(data["scorer"]) if data.get("scorer") else None
        values["compiled"] = {name: ENTRY_TYPES[name].from_json(entry)
                              for name, entry in (data.get("compiled") or {}).items()
                              if name in ENTRY_TYPES and isinstance(entry, Mapping)}
        return cls(**values)

    def write(self, folder: Path) -> Path:
        """Write `folder/manifest.json` atomically (a reader never sees half a manifest)."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def is_artifact(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an artifact folder; ModelNotFoundError when there is none, it is unreadable, or
    its format_version is newer than this lcmserve reads."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder} is not an lcmserve artifact: no {MANIFEST_NAME}") from None
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path} holds a JSON {type(data).__name__}, not an object")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelNotFoundError(
            f"{path} has format_version {version!r}; this lcmserve reads up to {FORMAT_VERSION}"
        )
    try:
        return Manifest.from_json(data)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a key of the wrong type, a record lacking one
        raise ModelNotFoundError(f"{path} is malformed ({e}): re-export") from e


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


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _plain(value: Any) -> Any:
    """Tuples -> lists, mappings -> dicts, recursively: what json.dumps writes, so to_json() == read back."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
