"""MODEL (+ LoRAs, backend, device, dtype, tiny autoencoder) -> the Runtime the engine drives, and its
ModelSpec, each made once. The one place a backend is chosen, `--backend auto` included.

A runtime is five parts (parts.py), each the backend's compiled form where it serves the shape, else
the eager module: the eager backend has no compiled forms; a compiled backend's provider
(compiled.py, compiled_onnx.py) gives those its artifact holds, beside the eager modules of its model/.

MODEL is an export artifact (DIR with manifest.json and model/), a diffusers folder, a built-in
preset (`tiny`, `sd15-random`) or a hub id. LoRAs given at serve time are fused in memory, as
`lcmserve export` would, so the served model is the same either way.

A compiled backend serves an artifact's `compiled/<backend>/` (manifest entry: export/artifact.py)
only on the kind of machine it was made for: `check_runs_here` raises ArtifactMismatchError (what
differs, how to re-export) for another device architecture or torch / onnxruntime version.
`--backend auto` takes the first of COMPILED_BACKENDS (aoti > compile > onnx) that the artifact has,
that was made for this machine and whose runtime is installed, else eager.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lcmserve.export.artifact import (
    COMPILED_BACKENDS,
    MODEL_DIR,
    AotiEntry,
    ArtifactMismatchError,
    CompiledEntry,
    CompileEntry,
    Manifest,
    OnnxEntry,
    check_runs_here,
    is_artifact,
    read_manifest,
)
from lcmserve.export.quiet import quiet_libraries
from lcmserve.export.records import LoraRecord, TinyVaeRecord

from .compiled_common import ArtifactModel, Provider
from .eager import EagerModules
from .parts import PART_NAMES, Compiled, Part
from .runtime import BackendDetails, ModelDims, ModelSpec, Runtime

if TYPE_CHECKING:
    from lcmserve.export.pipeline import SDPipeline

log = logging.getLogger("lcmserve.loader")


class LoadError(Exception):
    """The model cannot be served as asked; the message says why and what to do."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_runtime(model: str, *, loras: Sequence[str] = (), backend: str = "auto", device: str | None = None,
                 dtype: str | None = None, allow_partial_lora: bool = False, tiny_vae: str | None = None,
                 default_decoder: str = "vae", scorer: str | None = None) -> Runtime:
    """The runtime for `lcmserve serve --model MODEL [--lora ...] --backend ... --device ... --dtype ...
    [--tiny-vae SRC] [--default-decoder vae|tiny-vae] [--scorer SRC]`. An artifact's own tiny_vae/ and
    scorer/ are served unless --tiny-vae / --scorer name others."""
    default_decoder = default_decoder.replace("-", "_")
    if default_decoder not in ("vae", "tiny_vae"):
        raise LoadError(f"--default-decoder {default_decoder!r} is not one of vae, tiny-vae")
    tiny_source = tiny_vae or _artifact_tiny_vae(model)
    if tiny_source is None and default_decoder == "tiny_vae":
        raise LoadError("--default-decoder tiny-vae needs a tiny autoencoder: serve an artifact exported with "
                        "--tiny-vae, or pass --tiny-vae SRC (e.g. madebyollin/taesd)")
    start = time.perf_counter()
    scorer_source = scorer or (model if is_artifact(model) and read_manifest(model).scorer is not None else None)
    if scorer_source is not None:
        from lcmserve.export.scorer import resolve_scorer

        resolve_scorer(scorer_source)  # a source that is not CLIP fails here, before the model loads
    loaded = _load(model, loras=loras, backend=backend, device=device, dtype=dtype,
                   allow_partial_lora=allow_partial_lora)
    runtime = _runtime(loaded, tiny_source, default_decoder, start)
    if scorer_source is not None:
        attach_scorer(runtime, scorer_source)
    return runtime


def runtime_from_pipeline(pipe: SDPipeline, base: str) -> Runtime:
    """The eager runtime around an already loaded (fused) pipeline, without a second copy of it."""
    start = time.perf_counter()
    device, dtype = pipe.unet.device, pipe.unet.dtype
    loaded = Loaded(base=base, backend="eager", device=device, dtype=dtype, dims=pipeline_dims(pipe),
                    tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, eager=EagerModules(device, dtype, pipe=pipe))
    return _runtime(loaded, None, "vae", start)


def _artifact_tiny_vae(model: str) -> str | None:
    """The artifact folder itself when it has a tiny autoencoder (tiny_vae.resolve_tiny_vae reads it)."""
    return model if is_artifact(model) and read_manifest(model).tiny_vae is not None else None


@dataclass
class Loaded:
    """A model loaded for one backend, before its parts are made: the eager modules (on first use), and
    for a compiled backend its provider."""

    base: str
    backend: str
    device: torch.device
    dtype: torch.dtype
    dims: ModelDims
    tokenizer: Any
    scheduler: Any
    eager: EagerModules
    loras: tuple[LoraRecord, ...] = ()
    provider: Provider | None = None
    artifact: ArtifactModel | None = None


def pipeline_dims(pipe: SDPipeline) -> ModelDims:
    """The shapes the engine needs, read off a loaded pipeline."""
    return ModelDims(latent_channels=int(pipe.unet.config.in_channels),
                     vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
                     scaling_factor=float(pipe.vae.config.scaling_factor),
                     text_max_length=int(pipe.tokenizer.model_max_length),
                     text_hidden_size=int(pipe.text_encoder.config.hidden_size))


def _runtime(loaded: Loaded, tiny_source: str | None, default_decoder: str, start: float) -> Runtime:
    """The parts (compiled where the provider has them, else eager) and the ModelSpec, made once."""
    provider, artifact = loaded.provider, loaded.artifact
    compiled = provider.compiled() if provider is not None else {}
    tiny_record: TinyVaeRecord | None = None
    if tiny_source is not None:
        loaded.eager.tiny_vae, tiny_record = _tiny_vae(tiny_source, loaded)
        if provider is not None and artifact is not None:
            tiny = _compiled_tiny(provider, artifact, tiny_source)
            if tiny is not None:
                compiled["tiny_vae_decoder"] = tiny
    notes = {"vae_encoder": "no compiled VAE encoder (img2img, inpainting: it runs once per request, at admission)"}
    parts = {name: Part(name, loaded.backend, loaded.eager.loader(name), compiled.get(name),
                        notes.get(name) if provider is not None else None)
             for name in PART_NAMES if name != "tiny_vae_decoder" or tiny_record is not None}
    details = BackendDetails(
        artifact=str(artifact.artifact_dir) if artifact is not None else None,
        compiled=artifact.entry if artifact is not None else None,
        load_seconds=round(time.perf_counter() - start, 3),
        parts=tuple((name, part.runs) for name, part in parts.items()),
        **(provider.details() if provider is not None else {}))
    spec = ModelSpec(
        base=loaded.base, dtype=loaded.dtype, device=loaded.device, backend=loaded.backend, loras=loaded.loras,
        **dataclasses.asdict(loaded.dims),
        decoders=("vae", "tiny_vae") if tiny_record is not None else ("vae",),
        default_decoder=default_decoder,
        tiny_vae_scaling_factor=tiny_record.scaling_factor if tiny_record is not None else 1.0,
        tiny_vae=tiny_record,
        graph_capturable=provider.graph_capturable if provider is not None else True,
        details=details)
    if tiny_record is not None:
        log.info("tiny autoencoder %s (%s) on %s; default decoder %s", tiny_source, tiny_record.kind, loaded.device,
                 default_decoder)
    return Runtime(spec, loaded.tokenizer, loaded.scheduler, parts, eager=loaded.eager)


def _tiny_vae(source: str, loaded: Loaded) -> tuple[torch.nn.Module, TinyVaeRecord]:
    """The tiny autoencoder `source` (export/tiny_vae.py) in the model's dtype on its device, and its
    record (an artifact's own: its export record, with the sha256)."""
    from lcmserve.export.tiny_vae import load_tiny_vae

    module, record = load_tiny_vae(source, dtype=loaded.dtype, device=loaded.device,
                                   latent_channels=loaded.dims.latent_channels,
                                   vae_scale_factor=loaded.dims.vae_scale_factor)
    exported = read_manifest(source).tiny_vae if _artifact_tiny_vae(source) is not None else None
    return module, exported or record


def _compiled_tiny(provider: Provider, artifact: ArtifactModel, source: str) -> Compiled | None:
    """A compiled artifact's compiled tiny decoder, when the tiny autoencoder served is its own tiny_vae/
    (the one exported) and it has one; otherwise None (it runs eagerly), logged."""
    own = _artifact_tiny_vae(source) is not None and Path(source).resolve() == artifact.artifact_dir.resolve()
    compiled = provider.tiny_vae_decoder() if own else None
    backend = provider.backend
    if compiled is None:
        why = ("the tiny autoencoder served is not the artifact's own tiny_vae/" if not own
               else "its compile cache has no tiny decoder (exported before it)" if backend == "compile"
               else "it has no compiled tiny decoder (exported before it)")
        log.warning("%s artifact: %s; running the tiny autoencoder's decoder eagerly", backend, why)
        return None
    log.info("%s artifact: serving its compiled tiny decoder (%s)", backend,
             artifact.entry.files.get("tiny_vae_decoder", "in its compile cache"))
    return compiled


def _load(model: str, *, loras: Sequence[str], backend: str, device: str | None, dtype: str | None,
          allow_partial_lora: bool) -> Loaded:
    from lcmserve.export.loading import load_pipeline, parse_dtype

    quiet_libraries()
    device = device or default_device()
    artifact = Path(model) if is_artifact(model) else None
    manifest = read_manifest(artifact) if artifact is not None else None
    if dtype is None:
        # An artifact keeps the dtype it was exported (and checked) in; otherwise fp16 on GPUs.
        dtype = manifest.dtype if manifest else ("float16" if device.startswith("cuda") else "float32")
    torch_dtype = parse_dtype(dtype)

    if backend == "auto":
        backend = pick_backend(artifact, device) if artifact is not None and not loras else "eager"
        log.info("backend auto -> %s", backend)
    if backend != "eager":
        if artifact is None:
            raise LoadError(f"--backend {backend} serves a compiled artifact: make one with "
                            f"`lcmserve export --base {model} --backend {backend} --out DIR`, then serve DIR")
        if loras:
            raise LoadError("--lora cannot be added to a compiled artifact: export the LoRAs with it")
        return _load_compiled(artifact, backend=backend, device=device)

    if loras:
        from lcmserve.export.fuse import fuse_in_memory
        from lcmserve.export.lora import parse_lora_arg

        specs = [parse_lora_arg(arg, allow_partial=allow_partial_lora) for arg in loras]
        pipe, fused = fuse_in_memory(model, specs, dtype=torch_dtype, device=device)
        records = fused.loras
    else:
        pipe = load_pipeline(model, dtype=torch_dtype, device=device)
        records = manifest.loras if manifest else ()
    dev, dt = pipe.unet.device, pipe.unet.dtype
    return Loaded(base=manifest.base if manifest else model, backend="eager", device=dev, dtype=dt,
                  dims=pipeline_dims(pipe), tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
                  eager=EagerModules(dev, dt, pipe=pipe), loras=tuple(records))


def compiled_entry(artifact_dir: Path, manifest: Manifest, backend: str) -> CompiledEntry:
    """manifest.compiled[backend], or FileNotFoundError saying how to make it."""
    entry = manifest.compiled.get(backend)
    if entry is None:
        have = ", ".join(sorted(manifest.compiled)) or "none"
        raise FileNotFoundError(
            f"{artifact_dir} has no {backend!r} compiled artifact (compiled backends present: {have}): "
            f"make one with `lcmserve export --base {Path(artifact_dir) / MODEL_DIR} --backend {backend} "
            f"--out NEW_DIR`"
        )
    return entry


def available_backends(artifact_dir: Path) -> list[str]:
    """Backends this artifact can be served with, best first: its compiled ones (whatever machine they
    were made for), then "eager" (model/ is always there)."""
    compiled = read_manifest(artifact_dir).compiled
    return [b for b in COMPILED_BACKENDS if b in compiled] + ["eager"]


def pick_backend(artifact_dir: Path, device: str | torch.device) -> str:
    """`--backend auto`: the best compiled backend whose artifact was made for this machine and whose
    runtime is installed, else "eager". Logs why each candidate was passed over."""
    manifest = read_manifest(artifact_dir)
    for backend in available_backends(artifact_dir)[:-1]:
        try:
            check_runs_here(artifact_dir, compiled_entry(artifact_dir, manifest, backend), device)
            if backend == "onnx":
                from .compiled_onnx import onnx_providers

                onnx_providers(torch.device(device))
        except (ArtifactMismatchError, FileNotFoundError, ImportError, RuntimeError) as exc:
            log.info("backend auto: not %s: %s", backend, exc)
            continue
        return backend
    return "eager"


def load_compiled_runtime(artifact_dir: Path, *, backend: str, device: str, warmup: bool = True) -> Runtime:
    """Serve `artifact_dir/compiled/<backend>` on `device` ("cpu", "cuda", "cuda:1"), without a tiny
    autoencoder (load_runtime adds the artifact's own).

    Raises ArtifactMismatchError for an artifact made for another machine, FileNotFoundError when the
    backend was not exported. `warmup` (compile backend) runs the shapes warmed at export once, so the
    first request does not pay dynamo tracing and the cache load.
    """
    start = time.perf_counter()
    return _runtime(_load_compiled(Path(artifact_dir), backend=backend, device=device, warmup=warmup), None, "vae",
                    start)


def _load_compiled(artifact_dir: Path, *, backend: str, device: str, warmup: bool = True) -> Loaded:
    quiet_libraries()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if backend not in COMPILED_BACKENDS:
        raise ValueError(f"backend {backend!r} is not a compiled backend: one of {', '.join(COMPILED_BACKENDS)}")
    manifest = read_manifest(artifact_dir)
    entry = compiled_entry(artifact_dir, manifest, backend)
    check_runs_here(artifact_dir, entry, dev)
    start = time.perf_counter()
    model = ArtifactModel(artifact_dir, manifest, entry, dev)
    provider: Provider
    match entry:
        case AotiEntry():
            from .compiled import AotiProvider

            provider = AotiProvider(model, entry)
        case CompileEntry():
            from .compiled import TorchCompileProvider

            provider = TorchCompileProvider(model, entry, warmup=warmup)
        case OnnxEntry():
            from .compiled_onnx import OnnxProvider

            provider = OnnxProvider(model, entry)
        case _:
            raise ValueError(f"{artifact_dir}: no provider for a {type(entry).__name__}")
    log.info("loaded %s artifact %s on %s in %.1f s", backend, artifact_dir, dev, time.perf_counter() - start)
    return Loaded(base=manifest.base, backend=backend, device=dev, dtype=model.dtype, dims=model.dims,
                  tokenizer=model.tokenizer, scheduler=model.scheduler,
                  eager=EagerModules(dev, model.dtype, folder=model.model_dir), loras=manifest.loras,
                  provider=provider, artifact=model)


def attach_scorer(runtime: Runtime, source: str) -> None:
    """Load the scorer `source` on the runtime's device in its dtype: `runtime.scorer`, and its record in
    `runtime.spec.scorer` (GetModelInfo.scorer)."""
    spec = runtime.spec
    from .scorer import ClipScorer

    scorer = ClipScorer.load(source, spec.device, spec.dtype)
    runtime.scorer = scorer
    runtime.spec = dataclasses.replace(spec, scorer=scorer.record)
    log.info("scorer %s (%s, projection %d, image %d px) on %s", source, scorer.record.kind,
             scorer.record.projection_dim, scorer.record.image_size, spec.device)
