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
  - compile: any shape; the shapes warmed at export start without a cold compile.

An artifact is compiled for one kind of machine, so loading checks what the export recorded against
this machine and raises `ArtifactMismatchError` (saying what differs and how to re-export) when the
device architecture (CUDA capability `sm_90`, or `cpu-x86_64-avx2`: inductor's CPU code is built for
the host's vector ISA) or the torch version (aoti, compile) / onnxruntime version (onnx) differ.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .runtime import ModelSpec, Runtime

log = logging.getLogger("lcmserve.compiled")

BACKEND_ORDER: tuple[str, ...] = ("aoti", "compile", "onnx")  # best first, for --backend auto
MAX_BATCH = 63  # per call of an exported part; Dim("batch", max=64) fails a UNet guard (batch >= 64)
IMAGE_SIDE_RANGE = (64, 1024)  # pixels, as the request validation allows

# File names inside compiled/<backend>/, one per part.
PARTS: dict[str, dict[str, str]] = {
    "aoti": {"text_encoder": "text_encoder.pt2", "unet": "unet.pt2", "vae_decoder": "vae_decoder.pt2"},
    "onnx": {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx", "vae_decoder": "vae_decoder.onnx"},
    "compile": {"cache": "inductor_cache.bin"},
}
# Names of the exported inputs / outputs (ONNX graph names; the adapters' argument names).
IO_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "text_encoder": (("input_ids",), "hidden"),
    "unet": (("latents", "timesteps", "text"), "noise"),
    "vae_decoder": (("latents",), "pixels"),
}


class ArtifactMismatchError(RuntimeError):
    """A compiled artifact made for another device architecture or library version than this machine's."""


# --- adapters: plain tensor signatures, so export and compile see one clean graph each ---------------


class UNetStep(torch.nn.Module):
    """(latents (B, 4, h, w), timesteps (B,) int64, text (B, 77, D)) -> predicted noise (B, 4, h, w)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]


class VaeDecode(torch.nn.Module):
    """Unscaled latents (B, 4, h, w) -> pixels (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


class TextEncode(torch.nn.Module):
    """Token ids (B, 77) int64 -> last hidden state (B, 77, D), as StableDiffusionPipeline.encode_prompt."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


def optimizations_for(device: str | torch.device) -> tuple[str, ...]:
    """Module rewrites applied before export / compile (attention is SDPA in every case: diffusers'
    default AttnProcessor2_0, and transformers' CLIP "sdpa" attention).

    fused_qkv: one matmul for q, k, v in self-attention (k, v in cross-attention): fewer, larger GEMMs
      on both devices.
    channels_last: NHWC convolutions. On CUDA the tensor-core conv kernels are NHWC (fp16/bf16), so it
      pays there; on the CPU inductor lowers convs to oneDNN, which picks its own blocked layout, and a
      channels-last UNet measured no faster here, so it is left off.
    """
    return ("fused_qkv", "channels_last") if torch.device(device).type == "cuda" else ("fused_qkv",)


def apply_optimizations(module: torch.nn.Module, optimizations: tuple[str, ...] | list[str]) -> torch.nn.Module:
    """Rewrite a diffusers UNet / VAE in place (callers pass a copy: fusing adds `to_qkv` weights that
    must not reach the saved model/ folder)."""
    if "fused_qkv" in optimizations and hasattr(module, "fuse_qkv_projections"):
        module.fuse_qkv_projections()
    if "channels_last" in optimizations:
        module.to(memory_format=torch.channels_last)
    return module


# --- machine identity and the refusal of foreign artifacts ----------------------------------------


def device_arch(device: str | torch.device) -> str:
    """`sm_90` for a CUDA device (its compute capability), `cpu-x86_64-avx2` for the CPU (machine and
    the vector ISA that inductor's C++ code and ATen's kernels are built for here)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} asked for, but this torch {torch.__version__} sees no CUDA device")
        major, minor = torch.cuda.get_device_capability(dev)
        return f"sm_{major}{minor}"
    isa = torch.backends.cpu.get_cpu_capability().lower()  # "avx2", "avx512", "default", ...
    return f"cpu-{platform.machine().lower()}-{isa}"


def device_name(device: str | torch.device) -> str:
    """For people reading the manifest: "NVIDIA H100 80GB HBM3", "AMD EPYC 7B13"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


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
                _onnx_providers(torch.device(device))
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
    cls: type[_CompiledRuntime] = {"aoti": AOTIRuntime, "compile": TorchCompileRuntime,
                                    "onnx": OnnxRuntime}[backend]
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
    """fn over batch chunks of at most MAX_BATCH rows (the exported batch range), concatenated."""
    n = inputs[0].shape[0]
    if n <= MAX_BATCH:
        return fn(*inputs)
    return torch.cat([fn(*(x[i:i + MAX_BATCH] for x in inputs)) for i in range(0, n, MAX_BATCH)])


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

    On CUDA the mode is "reduce-overhead": inductor records its own CUDA graphs (one per shape), so
    these callables must not be captured again by the engine (`spec.extra["cuda_graph_capturable"]`
    is False), and outputs are cloned because the next replay overwrites them.
    """

    backend = "compile"

    def __init__(self, artifact_dir: Path, info: dict[str, Any], device: torch.device, *, warmup: bool) -> None:
        self.mode = str(info.get("mode", "default"))
        self._cudagraphs = self.mode == "reduce-overhead"
        self.graph_capturable = not self._cudagraphs
        super().__init__(artifact_dir, info, device, warmup=warmup)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        cache = artifact_dir / _files(info)["cache"]
        t0 = time.perf_counter()
        torch.compiler.load_cache_artifacts(cache.read_bytes())
        log.info("loaded compile cache %s (%.1f MB) in %.1f s", cache, cache.stat().st_size / 1e6,
                 time.perf_counter() - t0)
        opts = tuple(info.get("optimizations", ()))
        unet = UNet2DConditionModel.from_pretrained(self.model_dir, subfolder="unet", dtype=self.dtype)
        vae = AutoencoderKL.from_pretrained(self.model_dir, subfolder="vae", dtype=self.dtype)
        text = CLIPTextModel.from_pretrained(self.model_dir, subfolder="text_encoder", dtype=self.dtype)
        self._text = TextEncode(text.to(device)).eval()
        self._unet, self._vae = compile_parts(unet.to(device).eval(), vae.to(device).eval(), opts, self.mode)
        if warmup:
            t0 = time.perf_counter()
            warm_compiled(self._unet, self._vae, info.get("warm_shapes", ()), device=device, dtype=self.dtype,
                          latent_channels=self.spec.latent_channels, text_len=self.spec.text_max_length,
                          text_dim=self.spec.text_hidden_size, cudagraphs=self._cudagraphs)
            self.spec.extra["warmup_seconds"] = round(time.perf_counter() - t0, 3)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text(input_ids)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._unet(latents, _timesteps(timesteps, latents.shape[0]), text).clone()
        return self._unet(latents, _timesteps(timesteps, latents.shape[0]), text)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._vae(latents).clone()
        return self._vae(latents)


def compile_parts(unet: torch.nn.Module, vae: torch.nn.Module, optimizations: tuple[str, ...],
                  mode: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """torch.compile'd UNetStep and VaeDecode. Export and server must build them identically (same
    rewrites, same mode), or the cache keys differ and the server compiles cold."""
    apply_optimizations(unet, optimizations)
    apply_optimizations(vae, optimizations)
    # fullgraph: a graph break would leave eager islands (and on CUDA split the CUDA graphs); fail instead.
    unet_c = torch.compile(UNetStep(unet).eval(), mode=mode, fullgraph=True)
    vae_c = torch.compile(VaeDecode(vae).eval(), mode=mode, fullgraph=True)
    return unet_c, vae_c


def warm_compiled(unet: Callable[..., torch.Tensor], vae: Callable[..., torch.Tensor],
                  shapes: Any, *, device: torch.device, dtype: torch.dtype, latent_channels: int,
                  text_len: int, text_dim: int, cudagraphs: bool) -> None:
    """Run each (batch, latent_h, latent_w) once through both parts: compiles, or loads from cache."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch, h, w in shapes:
            latents = torch.randn(batch, latent_channels, h, w, generator=gen).to(device, dtype)
            timesteps = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            text = torch.randn(batch, text_len, text_dim, generator=gen).to(device, dtype)
            for _ in range(2 if cudagraphs else 1):  # cudagraph trees record on the second call
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                unet(latents, timesteps, text)
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                vae(latents)


# --- ONNX Runtime -----------------------------------------------------------------------------------


def _onnx_providers(device: torch.device) -> list[Any]:
    """Execution providers for `device`, or an error saying what to install."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                           f"(providers: {ort.get_available_providers()}): install onnxruntime-gpu")
    options = {
        "device_id": device.index or 0,
        # ORT enqueues on torch's stream, so its kernels are ordered after the torch work that made
        # the inputs and before the torch work that reads the outputs.
        "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    }
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


_ORT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


class OnnxRuntime(_CompiledRuntime):
    """ONNX Runtime sessions, fed through IO binding. On CUDA ORT runs on torch's current stream;
    `run_with_iobinding` waits for its work before returning (a host sync), so these calls cannot sit
    inside a CUDA graph capture (`cuda_graph_capturable` False)."""

    backend = "onnx"
    graph_capturable = False

    def __init__(self, artifact_dir: Path, info: dict[str, Any], device: torch.device, *, warmup: bool) -> None:
        import onnxruntime as ort

        super().__init__(artifact_dir, info, device, warmup=warmup)
        providers = _onnx_providers(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the CPU provider warns about every fp16 cast
        files = _files(info)
        self._sessions = {part: ort.InferenceSession(str(artifact_dir / files[part]), options, providers=providers)
                          for part in ("text_encoder", "unet", "vae_decoder")}
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def _run(self, part: str, inputs: tuple[torch.Tensor, ...], out_shape: tuple[int, ...],
             out_dtype: torch.dtype) -> torch.Tensor:
        """One session run with IO binding: ORT reads the torch inputs and writes a torch output in place
        (device memory on CUDA, host memory on the CPU), no copies either way."""
        import numpy as np

        session = self._sessions[part]
        in_names, out_name = IO_NAMES[part]
        kind, index = self.device.type, self.device.index or 0
        if kind == "cuda" and torch.cuda.current_stream(self.device) != self._stream:
            torch.cuda.current_stream(self.device).synchronize()  # ORT is bound to another stream
        binding = session.io_binding()
        inputs = tuple(x.contiguous() for x in inputs)  # keeps them alive until the run returns
        for name, x in zip(in_names, inputs):
            binding.bind_input(name, kind, index, np.dtype(_ORT_TYPES[x.dtype]), tuple(x.shape), x.data_ptr())
        out = torch.empty(out_shape, dtype=out_dtype, device=self.device)
        binding.bind_output(out_name, kind, index, np.dtype(_ORT_TYPES[out_dtype]), out_shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        def run(ids: torch.Tensor) -> torch.Tensor:
            shape = (ids.shape[0], ids.shape[1], self.spec.text_hidden_size)
            return self._run("text_encoder", (ids.to(torch.int64),), shape, self.dtype)

        return _chunked(run, input_ids)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        timesteps = _timesteps(timesteps, latents.shape[0])
        if not self._unet_serves(latents):
            return self._eager_part("unet", tuple(latents.shape))(latents, timesteps, text)

        def run(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self._run("unet", (x, t, c), tuple(x.shape), self.dtype)

        return _chunked(run, latents, timesteps, text)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self._vae_serves(latents):
            return self._eager_part("vae_decoder", tuple(latents.shape))(latents)
        f = self.spec.vae_scale_factor

        def run(x: torch.Tensor) -> torch.Tensor:
            shape = (x.shape[0], 3, x.shape[2] * f, x.shape[3] * f)
            return self._run("vae_decoder", (x,), shape, self.dtype)

        return _chunked(run, latents)
