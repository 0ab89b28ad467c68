"""Export: base model + LoRAs -> fused, parity-checked artifact folder (`model/`, `manifest.json`).

    load -> loras -> reference (unfused adapters) -> fuse -> check (fused vs reference) -> save

The parity check renders one small image (64x64, 4 LCM steps, guidance 1, fixed prompt and CPU
generator seed) with the adapters still separate, fuses them into the UNet / text-encoder weights
(`fuse_lora` with the `set_adapters` scales, then `unload_lora_weights`), renders again and compares
pixels in [0, 1]. Tolerances (max |difference|):

- float32: 1e-3. Fusing only changes the order of float32 additions (W x + s B A x vs (W + s B A) x);
  measured 8e-7 on the tiny preset, so 1e-3 fails only on a real mismatch (a LoRA dropped,
  a scale applied twice) while leaving room for other kernels (cuDNN / TF32 on a GPU).
- float16 / bfloat16: 2e-2 / 6e-2. Fusing rounds W + s B A to 11 (fp16) or 8 (bf16) significant
  bits once, while the unfused path rounds W x and B A x separately; those per-layer differences
  pass through every layer and 4 denoising steps. Measured on the tiny preset (CPU, two LoRAs):
  fp16 2e-3, bf16 1.6e-2, so about 10x / 4x headroom for deeper models and GPU kernels, while a
  dropped LoRA changes that image by 0.3 (the synthetic LoRAs), far above either tolerance.

The artifact is written into a temp folder beside `out` and renamed into place at the end, so a
failed export never leaves something that looks like a valid artifact; its modes are then what a
plain mkdir / open would give (0755 / 0644 under umask 022), not mkdtemp's 0700, so other users (a
container's uid 1000 reading a mounted /models) can read it. The folder layout and manifest are
artifact.py's; compiled backends are built by compile.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
import torch
from tqdm.auto import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

from lcmserve.export.artifact import (
    BACKENDS,
    MODEL_DIR,
    SCORER_DIR,
    TINY_VAE_DIR,
    CompiledEntry,
    Manifest,
    device_arch,
    device_name,
    library_versions,
    now_utc,
)
from lcmserve.export.errors import ExportError, ParityError, UserInputError
from lcmserve.export.loading import dtype_name, load_pipeline, parse_dtype, resolve_model
from lcmserve.export.lora import LoraSpec, apply_loras, resolve_source
from lcmserve.export.pipeline import SDPipeline
from lcmserve.export.records import LoraRecord, ParityRecord, TinyVaeRecord

# Max |fused - unfused| over pixels in [0, 1] (reasons in the module doc). Measured on `tiny` with
# a kohya (UNet + text encoder) and a diffusers LoRA at 1.0 / 0.8, CPU: float32 8e-7, float16 2e-3,
# bfloat16 1.6e-2; removing the LoRAs changes that image by 0.33.
PARITY_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}


@dataclass(frozen=True)
class ParityCheck:
    """What the parity check renders: small, so it costs little even for sd15 shapes on a CPU."""

    prompt: str = "a photo of a crack in a concrete wall"
    seed: int = 1234
    height: int = 64
    width: int = 64
    steps: int = 4
    guidance_scale: float = 1.0

    def render(self, pipe: SDPipeline) -> NDArray[np.float32]:
        """(H, W, 3) float32 in [0, 1], with the generator on the CPU (the project's seed contract)."""
        generator = torch.Generator("cpu").manual_seed(self.seed)
        out = pipe(
            self.prompt,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            generator=generator,
            output_type="np",
        )
        return np.asarray(out.images[0], dtype=np.float32)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def _as_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} asked for, but torch sees no CUDA device here")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserInputError(f"device {device!r} is not one of cpu, cuda, cuda:N")


class _Stages:
    """A tqdm bar over the named export stages (on stderr; silent when progress=False)."""

    def __init__(self, names: list[str], progress: bool) -> None:
        self._bar = tqdm(total=len(names), desc="export", unit="stage", disable=not progress, leave=True)
        self._names = names

    def start(self, name: str) -> None:
        self._bar.set_postfix_str(name)

    def done(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _load_and_fuse(
    base: str,
    loras: list[LoraSpec],
    *,
    dtype: torch.dtype,
    device: str,
    stages: _Stages,
    check: ParityCheck,
) -> tuple[SDPipeline, list[LoraRecord], ParityRecord | None, str]:
    """Load, attach, render unfused, fuse, render fused, compare. -> (pipe, records, parity, base kind)."""
    stages.start("load")
    for spec in loras:  # a missing LoRA file fails here, before the model loads
        resolve_source(spec.source)
    kind, _ = resolve_model(base)
    pipe = load_pipeline(base, dtype=dtype, device=device)
    stages.done()

    stages.start("loras")
    records = apply_loras(pipe, loras)
    stages.done()
    if not records:
        return pipe, records, None, kind

    stages.start("reference")
    reference = check.render(pipe)  # adapters active and separate
    stages.done()

    stages.start("fuse")
    names = [r.adapter_name for r in records]
    components = [c for c in ("unet", "text_encoder") if any(c in r.targets for r in records)]
    pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter modules
    stages.done()

    stages.start("check")
    fused = check.render(pipe)
    max_diff = float(np.abs(fused - reference).max())
    tolerance = PARITY_TOLERANCE[dtype]
    parity = ParityRecord(max_abs_diff=max_diff, tolerance=tolerance, passed=bool(max_diff <= tolerance),
                          prompt=check.prompt, seed=check.seed, height=check.height, width=check.width,
                          steps=check.steps, guidance_scale=check.guidance_scale)
    if not max_diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"fused model differs from the unfused LoRAs: max |pixel difference| {max_diff:.3g} > tolerance "
            f"{tolerance:g} ({dtype_name(dtype)}, {check.height}x{check.width}, {check.steps} steps, "
            f"seed {check.seed})"
        )
    stages.done()
    return pipe, records, parity, kind


def _manifest(
    base: str,
    kind: str,
    records: list[LoraRecord],
    dtype: torch.dtype,
    device: str,
    backend: str,
    parity: ParityRecord | None,
    compiled: dict[str, CompiledEntry] | None = None,
    tiny_vae: TinyVaeRecord | None = None,
) -> Manifest:
    return Manifest(
        base=base,
        base_kind=kind,
        loras=tuple(dataclasses.replace(r, adapter_name="", path="") for r in records),  # as read back
        dtype=dtype_name(dtype),
        device=device,
        device_arch=device_arch(device),
        device_name=device_name(device),
        backend=backend,
        compiled=compiled or {},
        versions=library_versions(),
        created=now_utc(),
        parity=parity,
        tiny_vae=tiny_vae,
    )


def fuse_in_memory(
    base: str,
    loras: list[LoraSpec],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    progress: bool = False,
) -> tuple[SDPipeline, Manifest]:
    """Base + LoRAs fused and parity-checked in memory, for a server started from a hub id + --lora.
    The manifest is what an export would have written (backend "eager")."""
    device = device or default_device()
    _check_device(device)
    torch_dtype = _as_dtype(dtype, device)
    stages = _Stages(["load", "loras", "reference", "fuse", "check"], progress)
    try:
        pipe, records, parity, kind = _load_and_fuse(
            base, loras, dtype=torch_dtype, device=device, stages=stages, check=ParityCheck()
        )
    finally:
        stages.close()
    return pipe, _manifest(base, kind, records, torch_dtype, device, "eager", parity)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserInputError(f"output folder {out} exists and is not empty; pass --force to replace it")


def export_model(
    base: str,
    loras: list[LoraSpec],
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    backend: str = "eager",
    force: bool = False,
    progress: bool = True,
    tiny_vae: str | None = None,
    scorer: str | None = None,
) -> Manifest:
    """Fuse `loras` into `base`, check parity, write the artifact folder `out`. Returns its manifest.

    `scorer` (tiny, a CLIPModel + processor folder, an artifact with one, or a hub id: export/scorer.py)
    is saved as `out/scorer/`, the sha256 of its weights in the manifest; a source that is not CLIP
    is refused before anything loads.

    `tiny_vae` (a preset name, an AutoencoderTiny folder, an artifact with one, or a hub id:
    export/tiny_vae.py) is saved as `out/tiny_vae/` in the model's dtype, its sha256 in the manifest.

    `dtype`/`device` default to float16 on CUDA when there is one, else float32 on the CPU. A backend
    other than eager is built by `lcmserve.export.compile.compile_artifact` into the same folder.
    Raises UserInputError (bad input), ParityError, or ExportError; `out` is then left untouched.
    """
    out = Path(out).expanduser()
    device = device or default_device()
    _check_device(device)
    torch_dtype = _as_dtype(dtype, device)
    _check_out(out, force)
    if backend not in BACKENDS:
        raise UserInputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if scorer is not None:
        from lcmserve.export.scorer import resolve_scorer

        resolve_scorer(scorer)  # not CLIP, missing: ModelNotFoundError now, not after the fuse

    names = ["load", "loras", "reference", "fuse", "check", "save"] + ([backend] if backend != "eager" else [])
    stages = _Stages(names, progress)
    tmp: Path | None = None
    try:
        pipe, records, parity, kind = _load_and_fuse(
            base, loras, dtype=torch_dtype, device=device, stages=stages, check=ParityCheck()
        )
        if not records:  # no LoRA: nothing to fuse or check
            for _ in range(3):
                stages.done()
        stages.start("save")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        pipe.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
        tiny_record = _save_tiny_vae(pipe, tiny_vae, tmp, torch_dtype) if tiny_vae is not None else None
        if scorer is not None:
            from lcmserve.export.scorer import save_scorer

            scorer_record = save_scorer(scorer, tmp / SCORER_DIR)
        stages.done()

        compiled: dict[str, CompiledEntry] = {}
        if backend != "eager":
            from lcmserve.export.compile import compile_artifact  # torch.export / inductor / onnx machinery

            stages.start(backend)
            compiled[backend] = compile_artifact(pipe, tmp, backend=backend, device=device, dtype=torch_dtype)
            stages.done()

        manifest = _manifest(base, kind, records, torch_dtype, device, backend, parity, compiled, tiny_record)
        if scorer is not None:
            manifest = dataclasses.replace(manifest, scorer=scorer_record)
        manifest.write(tmp)  # last file: a folder with a manifest is complete
        make_readable(tmp)
        _swap_into_place(tmp, out, force)
        tmp = None
        return manifest
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else still must not leave a half artifact
        raise ExportError(f"export failed: {type(e).__name__}: {e}") from e
    finally:
        stages.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _save_tiny_vae(pipe: SDPipeline, source: str, folder: Path, dtype: torch.dtype) -> TinyVaeRecord:
    """Load the tiny autoencoder `source`, check it fits the model, save it as folder/tiny_vae/."""
    from lcmserve.export.tiny_vae import load_tiny_vae, save_pretrained

    model, record = load_tiny_vae(source, dtype=dtype, device="cpu",
                                  latent_channels=int(pipe.unet.config.in_channels),
                                  vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1))
    return dataclasses.replace(record, sha256=save_pretrained(model, folder / TINY_VAE_DIR))


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    """rename(tmp, out); with force, an existing out is moved aside first and deleted after."""
    old: Path | None = None
    if out.exists():
        _check_out(out, force)  # may have been filled while we worked
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # put the previous artifact back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_readable(root: Path) -> None:
    """Give the artifact tree the modes a plain `mkdir` / `open` would have under the current umask
    (0755 folders, 0644 files under 022). Export builds it in a `mkdtemp` folder (mode 0700), renamed
    into place: without this, other users (a container's uid 1000 reading a mounted /models) cannot
    read it. Executable bits of files (none expected) are kept as the umask allows."""
    umask = _current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode) or mode & 0o111:
            path.chmod(0o777 & ~umask)
        else:
            path.chmod(0o666 & ~umask)


def _current_umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only set it,
    and setting it briefly would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
