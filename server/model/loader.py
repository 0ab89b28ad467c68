"""MODEL (+ LoRAs, backend, device, dtype) -> a Runtime the engine can drive. The one place a runtime
is chosen, `--backend auto` included.

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
from pathlib import Path

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

from .runtime import EagerRuntime, Runtime, spec_from_pipeline

log = logging.getLogger("lcmserve.loader")


class LoadError(Exception):
    """The model cannot be served as asked; the message says why and what to do."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_runtime(model: str, *, loras: Sequence[str] = (), backend: str = "auto", device: str | None = None,
                 dtype: str | None = None, allow_partial_lora: bool = False, tiny_vae: str | None = None,
                 default_decoder: str = "vae") -> Runtime:
    """The runtime for `lcmserve serve --model MODEL [--lora ...] --backend ... --device ... --dtype ...
    [--tiny-vae SRC] [--default-decoder vae|tiny-vae]`. An artifact's own tiny_vae/ is served unless
    --tiny-vae names another."""
    runtime = _load_runtime(model, loras=loras, backend=backend, device=device, dtype=dtype,
                            allow_partial_lora=allow_partial_lora)
    return attach_tiny_vae(runtime, tiny_vae or _artifact_tiny_vae(model), default_decoder)


def _artifact_tiny_vae(model: str) -> str | None:
    """The artifact folder itself when it has a tiny autoencoder (tiny_vae.resolve_tiny_vae reads it)."""
    return model if is_artifact(model) and read_manifest(model).tiny_vae is not None else None


def attach_tiny_vae(runtime: Runtime, source: str | None, default_decoder: str = "vae") -> Runtime:
    """Give `runtime` (any backend) the tiny autoencoder `source` (export/tiny_vae.py), in the model's
    dtype on its device, and say so in its spec (decoders, default_decoder, record). A compiled runtime
    serving its artifact's own tiny_vae/ runs the compiled tiny decoder where the artifact has one
    (compiled_common.py `serve_tiny_vae`); otherwise it runs eagerly."""
    default_decoder = default_decoder.replace("-", "_")
    if default_decoder not in ("vae", "tiny_vae"):
        raise LoadError(f"--default-decoder {default_decoder!r} is not one of vae, tiny-vae")
    if source is None:
        if default_decoder == "tiny_vae":
            raise LoadError("--default-decoder tiny-vae needs a tiny autoencoder: serve an artifact exported with "
                            "--tiny-vae, or pass --tiny-vae SRC (e.g. madebyollin/taesd)")
        return runtime
    from lcmserve.export.tiny_vae import decoder_of, load_tiny_vae

    spec = runtime.spec
    module, record = load_tiny_vae(source, dtype=spec.dtype, device=spec.device,
                                   latent_channels=spec.latent_channels, vae_scale_factor=spec.vae_scale_factor)
    if _artifact_tiny_vae(source) is not None:  # an artifact's own: its export record (with the sha256)
        record = {**record, **(read_manifest(source).tiny_vae or {})}
    decode = decoder_of(module)
    from .compiled_common import CompiledRuntimeBase

    if isinstance(runtime, CompiledRuntimeBase):
        own = _artifact_tiny_vae(source) is not None and Path(source).resolve() == runtime.artifact_dir.resolve()
        decode = runtime.serve_tiny_vae(decode, own)
    runtime.tiny_vae_decode = decode
    runtime.spec = dataclasses.replace(spec, decoders=("vae", "tiny_vae"), default_decoder=default_decoder,
                                       tiny_vae_scaling_factor=float(record["scaling_factor"]), tiny_vae=record)
    log.info("tiny autoencoder %s (%s) on %s; default decoder %s", source, record["kind"], spec.device,
             default_decoder)
    return runtime


def _load_runtime(model: str, *, loras: Sequence[str], backend: str, device: str | None, dtype: str | None,
                  allow_partial_lora: bool) -> Runtime:
    from lcmserve.export.loading import load_pipeline, parse_dtype

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
        return load_compiled_runtime(artifact, backend=backend, device=device)

    if loras:
        from lcmserve.export.fuse import fuse_in_memory
        from lcmserve.export.lora import parse_lora_arg

        specs = [parse_lora_arg(arg, allow_partial=allow_partial_lora) for arg in loras]
        pipe, fused = fuse_in_memory(model, specs, dtype=torch_dtype, device=device)
        records = fused.loras
    else:
        pipe = load_pipeline(model, dtype=torch_dtype, device=device)
        records = manifest.loras if manifest else ()
    base = manifest.base if manifest else model
    return EagerRuntime(pipe, spec_from_pipeline(pipe, base=base, backend="eager", loras=records))


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
    """Serve `artifact_dir/compiled/<backend>` on `device` ("cpu", "cuda", "cuda:1").

    Raises ArtifactMismatchError for an artifact made for another machine, FileNotFoundError when the
    backend was not exported. `warmup` (compile backend) runs the shapes warmed at export once, so the
    first request does not pay dynamo tracing and the cache load.
    """
    artifact_dir = Path(artifact_dir)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if backend not in COMPILED_BACKENDS:
        raise ValueError(f"backend {backend!r} is not a compiled backend: one of {', '.join(COMPILED_BACKENDS)}")
    manifest = read_manifest(artifact_dir)
    entry = compiled_entry(artifact_dir, manifest, backend)
    check_runs_here(artifact_dir, entry, dev)
    start = time.perf_counter()
    runtime: Runtime
    match entry:
        case AotiEntry():
            from .compiled import AOTIRuntime

            runtime = AOTIRuntime(artifact_dir, manifest, entry, dev, warmup=warmup)
        case CompileEntry():
            from .compiled import TorchCompileRuntime

            runtime = TorchCompileRuntime(artifact_dir, manifest, entry, dev, warmup=warmup)
        case OnnxEntry():
            from .compiled_onnx import OnnxRuntime

            runtime = OnnxRuntime(artifact_dir, manifest, entry, dev, warmup=warmup)
        case _:
            raise ValueError(f"{artifact_dir}: no runtime for a {type(entry).__name__}")
    runtime.spec.extra["load_seconds"] = round(time.perf_counter() - start, 3)
    log.info("loaded %s artifact %s on %s in %.1f s", backend, artifact_dir, dev, time.perf_counter() - start)
    return runtime
