"""Compiled runtimes: the `Runtime` boundary of runtime.py served from an artifact's `compiled/<backend>/`.

    aoti     AOTInductor packages (`.pt2`, made by `torch.export` + `aoti_compile_and_package`) of the
             UNet, VAE decoder and text encoder. Loading unzips and dlopens them: seconds, no compiler.
    compile  torch.compile (inductor) of the UNet and VAE decode, started from the compile cache that
             the export saved (`torch.compiler.save_cache_artifacts`); the text encoder stays eager.
    onnx     ONNX files of the three parts served by ONNX Runtime: the CUDA execution provider with IO
             binding on a GPU, the CPU provider otherwise.

What each artifact serves (written by export/compile.py into manifest.json["compiled"][backend]):
  - batch 1..63 per call (a torch.export guard of the UNet rules out 64); larger batches run in chunks.
  - aoti / onnx UNet: latent sides that are a multiple of 2**(number of UNet upsamplers) (8 for SD v1.5:
    image sides that are multiples of 64, 128..1024 px), both sides dynamic. Other sides make the
    UNet take a shape-dependent branch that export cannot keep dynamic, so they run on the eager UNet,
    loaded from model/ the first time one comes (logged once per shape).
  - aoti / onnx VAE decoder: any latent side in the image range (64..1024 px).
  - compile: any shape; the shapes warmed at export start without a cold compile. Batches past 63
    run in chunks too (diffusers' upsampler branches on batch >= 64: one more graph otherwise).

An artifact is compiled for one kind of machine, so loading checks what the export recorded against
this machine and raises `ArtifactMismatchError` (saying what differs and how to re-export) when the
device architecture (CUDA capability `sm_90`, or `cpu-x86_64-avx2`: inductor's CPU code is built for
the host's vector ISA) or the torch version (aoti, compile) / onnxruntime version (onnx) differ.

What export/compile.py and this module must agree on (file layout, adapters, module rewrites, machine
identity) is in artifact.py; the ONNX Runtime backend is in compiled_onnx.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .artifact import (
    MAX_BATCH,
    TextEncode,
    UNetStep,
    VaeDecode,
    compile_parts,
    copy_cpp_kernels,
    device_arch,
    onnxruntime_version,
    warm_compiled,
)
from .runtime import ModelSpec, Runtime

log = logging.getLogger("lcmserve.compiled")

BACKEND_ORDER: tuple[str, ...] = ("aoti", "compile", "onnx")  # best first, for --backend auto


class ArtifactMismatchError(RuntimeError):
    """A compiled artifact made for another device architecture or library version than this machine's."""


def machine_identity(backend: str, device: str | torch.device) -> dict[str, str | None]:
    """What an artifact of `backend` must have been made for to run on `device` here.

    aoti / compile: the exact torch build (AOTInductor's ABI and inductor's generated code are tied to
    it) and device architecture. onnx: the onnxruntime version and the device kind and machine
    (an ONNX file has no ISA-specific code, so `cpu-x86_64` is enough there).
    """
    if backend == "onnx":
        return {"device_arch": _coarse_arch(device_arch(device)), "onnxruntime": onnxruntime_version()}
    return {"device_arch": device_arch(device), "torch": torch.__version__}


def _coarse_arch(arch: str) -> str:
    return "-".join(arch.split("-")[:2]) if arch.startswith("cpu-") else arch


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    path = Path(artifact_dir) / "manifest.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{path} cannot be read ({exc}): not an lcmserve export artifact") from exc


def compiled_info(artifact_dir: Path, backend: str) -> dict[str, Any]:
    """manifest.json["compiled"][backend], or FileNotFoundError saying how to make it."""
    compiled = read_manifest(artifact_dir).get("compiled") or {}
    info = compiled.get(backend)
    if not isinstance(info, dict):
        have = ", ".join(sorted(compiled)) or "none"
        raise FileNotFoundError(
            f"{artifact_dir} has no {backend!r} compiled artifact (compiled backends present: {have}): "
            f"make one with `lcmserve export --base {Path(artifact_dir) / 'model'} --backend {backend} "
            f"--out NEW_DIR`"
        )
    return info


def check_compiled(artifact_dir: Path, info: dict[str, Any], *, backend: str, device: str | torch.device) -> None:
    """Raise ArtifactMismatchError unless `info` (one manifest["compiled"] entry) was made for this machine."""
    expected = machine_identity(backend, device)
    found = dict(info)
    if backend == "onnx" and isinstance(found.get("device_arch"), str):
        found["device_arch"] = _coarse_arch(found["device_arch"])
    diffs = [f"{key} {found.get(key)!r} (this machine: {want!r})" for key, want in expected.items()
             if found.get(key) != want]
    if diffs:
        dev = torch.device(device).type
        raise ArtifactMismatchError(
            f"{artifact_dir}: the {backend} artifact was made for {', '.join(diffs)}. Compiled code only "
            f"runs where it was built: re-export on this machine, e.g. `lcmserve export --base "
            f"{Path(artifact_dir) / 'model'} --backend {backend} --device {dev} --out NEW_DIR` "
            f"(model/ already has the LoRAs fused), or serve this one with --backend eager."
        )
    for name in _files(info).values():
        if not (Path(artifact_dir) / name).exists():
            raise FileNotFoundError(f"{artifact_dir}: {name} listed in manifest.json is missing: re-export")


def _files(info: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (info.get("files") or {}).items()}


def available_backends(artifact_dir: Path) -> list[str]:
    """Backends this artifact can be served with, best first: its compiled ones (whatever machine they
    were made for), then "eager" (model/ is always there)."""
    try:
        compiled = read_manifest(artifact_dir).get("compiled") or {}
    except FileNotFoundError:
        return ["eager"]
    return [b for b in BACKEND_ORDER if isinstance(compiled.get(b), dict)] + ["eager"]


def pick_backend(artifact_dir: Path, device: str | torch.device) -> str:
    """`--backend auto`: the best compiled backend (aoti > compile > onnx) whose artifact was made for
    this machine and whose runtime is installed, else "eager". Logs why each candidate was passed over."""
    for backend in available_backends(artifact_dir):
        if backend == "eager":
            break
        try:
            check_compiled(artifact_dir, compiled_info(artifact_dir, backend), backend=backend, device=device)
            if backend == "onnx":
                from .compiled_onnx import onnx_providers

                onnx_providers(torch.device(device))
        except (ArtifactMismatchError, FileNotFoundError, ImportError, RuntimeError) as exc:
            log.info("backend auto: not %s: %s", backend, exc)
            continue
        return backend
    return "eager"


# --- loading ------------------------------------------------------------------------------------------


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
    if backend not in BACKEND_ORDER:
        raise ValueError(f"backend {backend!r} is not a compiled backend: one of {', '.join(BACKEND_ORDER)}")
    info = compiled_info(artifact_dir, backend)
    check_compiled(artifact_dir, info, backend=backend, device=dev)
    start = time.perf_counter()
    cls: type[_CompiledRuntime]
    if backend == "onnx":
        from .compiled_onnx import OnnxRuntime

        cls = OnnxRuntime
    else:
        cls = AOTIRuntime if backend == "aoti" else TorchCompileRuntime
    runtime = cls(artifact_dir, info, dev, warmup=warmup)
    runtime.spec.extra["load_seconds"] = round(time.perf_counter() - start, 3)
    log.info("loaded %s artifact %s on %s in %.1f s", backend, artifact_dir, dev, time.perf_counter() - start)
    return runtime


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in manifest.json")
    return dtype


def _chunked(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn over the batch in near-equal chunks of at most MAX_BATCH rows (the exported batch range),
    concatenated: 64 rows run as 32 + 32, not 63 + 1."""
    n = inputs[0].shape[0]
    if n <= MAX_BATCH:
        return fn(*inputs)
    chunks = -(-n // MAX_BATCH)
    size = -(-n // chunks)
    return torch.cat([fn(*(x[i:i + size] for x in inputs)) for i in range(0, n, size)])


class _CompiledRuntime:
    """What every compiled backend shares: tokenizer, scheduler, spec, served shapes, eager fallback."""

    backend = ""
    graph_capturable = True  # may the engine capture these callables in its own CUDA graphs?

    def __init__(self, artifact_dir: Path, info: dict[str, Any], device: torch.device, *, warmup: bool) -> None:
        import transformers
        from diffusers import LCMScheduler

        self.artifact_dir = artifact_dir
        self.model_dir = artifact_dir / "model"
        self.info = info
        self.device = device
        self.dtype = _dtype(info["dtype"])
        manifest = read_manifest(artifact_dir)
        index = _read_json(self.model_dir / "model_index.json")
        tokenizer_cls = getattr(transformers, index.get("tokenizer", ["", "CLIPTokenizer"])[1])
        self.tokenizer = tokenizer_cls.from_pretrained(self.model_dir / "tokenizer")
        self.scheduler = LCMScheduler.from_pretrained(self.model_dir / "scheduler")
        unet_cfg = _read_json(self.model_dir / "unet" / "config.json")
        vae_cfg = _read_json(self.model_dir / "vae" / "config.json")
        text_cfg = _read_json(self.model_dir / "text_encoder" / "config.json")
        self.spec = ModelSpec(
            base=str(manifest.get("base", artifact_dir)),
            dtype=self.dtype,
            device=device,
            backend=self.backend,
            loras=tuple(manifest.get("loras") or ()),
            latent_channels=int(unet_cfg.get("in_channels", 4)),
            vae_scale_factor=2 ** (len(vae_cfg.get("block_out_channels", (0,) * 4)) - 1),
            scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
            text_max_length=int(self.tokenizer.model_max_length),
            text_hidden_size=int(text_cfg.get("hidden_size", 768)),
            extra={"artifact": str(artifact_dir), "compiled": info,
                   "cuda_graph_capturable": self.graph_capturable},
        )
        shapes = info.get("served", {})
        self._unet_multiple = int(shapes.get("unet_latent_multiple", 1))
        self._unet_range = tuple(shapes.get("unet_latent_range", (1, 1 << 30)))
        self._vae_range = tuple(shapes.get("vae_latent_range", (1, 1 << 30)))
        self._eager: dict[str, torch.nn.Module] = {}
        self._warned: set[tuple[str, tuple[int, ...]]] = set()

    # Shapes outside what the exported graphs hold run on the eager modules of model/.
    def _unet_serves(self, latents: torch.Tensor) -> bool:
        lo, hi = self._unet_range
        return all(lo <= s <= hi and s % self._unet_multiple == 0 for s in latents.shape[-2:])

    def _vae_serves(self, latents: torch.Tensor) -> bool:
        lo, hi = self._vae_range
        return all(lo <= s <= hi for s in latents.shape[-2:])

    def _eager_part(self, part: str, shape: tuple[int, ...]) -> torch.nn.Module:
        key = (part, shape[-2:])
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: latent size %s is not served by the %s artifact (served: %s); running it eagerly",
                        part, "x".join(map(str, shape[-2:])), self.backend, self.info.get("served"))
        if part not in self._eager:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            if part == "unet":
                module: torch.nn.Module = UNetStep(UNet2DConditionModel.from_pretrained(
                    self.model_dir, subfolder="unet", dtype=self.dtype))
            else:
                module = VaeDecode(AutoencoderKL.from_pretrained(self.model_dir, subfolder="vae", dtype=self.dtype))
            self._eager[part] = module.to(self.device).eval()
        return self._eager[part]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _timesteps(timesteps: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) int64, also from a scalar timestep."""
    return timesteps.to(torch.int64).reshape(-1).expand(batch).contiguous()


class AOTIRuntime(_CompiledRuntime):
    """AOTInductor packages; every call runs compiled code on the current stream (no host syncs with
    static-range shapes), so the engine may capture them in CUDA graphs."""

    backend = "aoti"

    def __init__(self, artifact_dir: Path, info: dict[str, Any], device: torch.device, *, warmup: bool) -> None:
        super().__init__(artifact_dir, info, device, warmup=warmup)
        files = _files(info)
        index = device.index if device.type == "cuda" and device.index is not None else -1
        self._parts = {part: torch._inductor.aoti_load_package(str(artifact_dir / files[part]), device_index=index)
                       for part in ("text_encoder", "unet", "vae_decoder")}

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _chunked(self._parts["text_encoder"], input_ids.to(torch.int64).contiguous())

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        timesteps = _timesteps(timesteps, latents.shape[0])
        if not self._unet_serves(latents):
            return self._eager_part("unet", tuple(latents.shape))(latents, timesteps, text)
        return _chunked(self._parts["unet"], latents.contiguous(), timesteps, text.contiguous())

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self._vae_serves(latents):
            return self._eager_part("vae_decoder", tuple(latents.shape))(latents)
        return _chunked(self._parts["vae_decoder"], latents.contiguous())


class TorchCompileRuntime(_CompiledRuntime):
    """torch.compile of the UNet and VAE decode from the artifact's compile cache.

    Settings as recorded at export (`compile_settings`): the C++ wrapper on the CPU; on CUDA mode
    "reduce-overhead": inductor records its own CUDA graphs (one per shape), so
    these callables must not be captured again by the engine (`spec.extra["cuda_graph_capturable"]`
    is False), and outputs are cloned because the next replay overwrites them.
    """

    backend = "compile"

    def __init__(self, artifact_dir: Path, info: dict[str, Any], device: torch.device, *, warmup: bool) -> None:
        self.settings = dict(info.get("torch_compile") or {})
        self._cudagraphs = self.settings.get("mode") == "reduce-overhead"
        self.graph_capturable = not self._cudagraphs
        super().__init__(artifact_dir, info, device, warmup=warmup)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        files = _files(info)
        cache = artifact_dir / files["cache"]
        t0 = time.perf_counter()
        torch.compiler.load_cache_artifacts(cache.read_bytes())
        kernels = 0
        if "cpp_kernels" in files:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            kernels = copy_cpp_kernels(artifact_dir / files["cpp_kernels"], Path(cache_dir()))
        log.info("loaded compile cache %s (%.1f MB, %d C++ kernels installed) in %.1f s", cache,
                 cache.stat().st_size / 1e6, kernels, time.perf_counter() - t0)
        opts = tuple(info.get("optimizations", ()))
        unet = UNet2DConditionModel.from_pretrained(self.model_dir, subfolder="unet", dtype=self.dtype)
        vae = AutoencoderKL.from_pretrained(self.model_dir, subfolder="vae", dtype=self.dtype)
        text = CLIPTextModel.from_pretrained(self.model_dir, subfolder="text_encoder", dtype=self.dtype)
        self._text = TextEncode(text.to(device)).eval()
        self._unet, self._vae = compile_parts(unet.to(device).eval(), vae.to(device).eval(), opts,
                                                 self.settings)
        if warmup:
            t0 = time.perf_counter()
            warm_compiled(self._unet, self._vae, info.get("warm_shapes", {}), device=device, dtype=self.dtype,
                          latent_channels=self.spec.latent_channels, text_len=self.spec.text_max_length,
                          text_dim=self.spec.text_hidden_size, cudagraphs=self._cudagraphs)
            self.spec.extra["warmup_seconds"] = round(time.perf_counter() - t0, 3)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text(input_ids)

    # Chunks of at most 63 as for aoti: a batch of 64 or more would fail a guard (diffusers' upsampler
    # checks batch >= 64) and compile one more graph.
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return _chunked(self._run_unet, latents, _timesteps(timesteps, latents.shape[0]), text)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return _chunked(self._run_vae, latents)

    def _run_unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._unet(latents, timesteps, text).clone()
        return self._unet(latents, timesteps, text)

    def _run_vae(self, latents: torch.Tensor) -> torch.Tensor:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._vae(latents).clone()
        return self._vae(latents)
