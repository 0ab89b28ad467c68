"""The compiled-artifact contract that export/compile.py writes and server/compiled.py reads.

Layout of `compiled/<backend>/` (PARTS), the exported graphs' input / output names (IO_NAMES), the
adapters that give each part a plain tensor signature, the module rewrites applied before export or
compile (the server must apply the same ones for the compile backend's cache to hit), and how a
machine is identified (`device_arch`) so an artifact made elsewhere can be refused.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

MAX_BATCH = 63  # per call of an exported part; Dim("batch", max=64) fails a UNet guard (batch >= 64)
IMAGE_SIDE_RANGE = (64, 1024)  # pixels, as the request validation allows

# File names inside compiled/<backend>/, one per part.
PARTS: dict[str, dict[str, str]] = {
    "aoti": {"text_encoder": "text_encoder.pt2", "unet": "unet.pt2", "vae_decoder": "vae_decoder.pt2"},
    "onnx": {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx", "vae_decoder": "vae_decoder.onnx"},
    # torch.compiler.save_cache_artifacts() bytes, and the C++ kernels inductor built on the CPU
    # (the mega-cache bundles Triton kernels but not these: without them a CPU start rebuilds each).
    "compile": {"cache": "inductor_cache.bin", "cpp_kernels": "cpp_kernels"},
}
# Names of the exported inputs / outputs (ONNX graph names; the adapters' argument names).
IO_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "text_encoder": (("input_ids",), "hidden"),
    "unet": (("latents", "timesteps", "text"), "noise"),
    "vae_decoder": (("latents",), "pixels"),
}


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


def compile_settings(device: str | torch.device) -> dict[str, Any]:
    """torch.compile keyword arguments for the UNet and VAE decode on `device` (recorded in the manifest;
    the server compiles with the recorded ones).

    CUDA: mode "reduce-overhead", inductor's CUDA graphs: a batch-1 UNet step is launch-bound (25 ms
    eager, 8 ms replayed on an H100, DESIGN.md). CPU: the C++ wrapper (`cpp_wrapper`), one compiled
    library per graph: on tiny's UNet here it compiled in 108 s against 133 s with the default Python
    wrapper, and ran a step in 13 ms against 183 ms (eager: 26 ms).
    """
    if torch.device(device).type == "cuda":
        return {"mode": "reduce-overhead"}
    return {"options": {"cpp_wrapper": True}}


def compile_parts(unet: torch.nn.Module, vae: torch.nn.Module, optimizations: tuple[str, ...],
                  settings: dict[str, Any]) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """torch.compile'd UNetStep and VaeDecode. Export and server must build them identically (same
    rewrites, same settings), or the cache keys differ and the server compiles cold."""
    apply_optimizations(unet, optimizations)
    apply_optimizations(vae, optimizations)
    # fullgraph: a graph break would leave eager islands (and on CUDA split the CUDA graphs); fail instead.
    unet_c = torch.compile(UNetStep(unet).eval(), fullgraph=True, **settings)
    vae_c = torch.compile(VaeDecode(vae).eval(), fullgraph=True, **settings)
    return unet_c, vae_c


def warm_compiled(unet: Callable[..., torch.Tensor], vae: Callable[..., torch.Tensor],
                  shapes: dict[str, Any], *, device: torch.device, dtype: torch.dtype, latent_channels: int,
                  text_len: int, text_dim: int, cudagraphs: bool) -> None:
    """Run each [batch, latent_h, latent_w] of shapes["unet"] / shapes["vae_decoder"] once through its
    part: this compiles (export), or loads from the cache (server start)."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for part, fn in (("unet", unet), ("vae_decoder", vae)):
            for batch, h, w in shapes.get(part, ()):
                latents = torch.randn(batch, latent_channels, h, w, generator=gen).to(device, dtype)
                inputs: tuple[torch.Tensor, ...] = (latents,)
                if part == "unet":
                    timesteps = torch.randint(0, 1000, (batch,), generator=gen).to(device)
                    inputs = (latents, timesteps, torch.randn(batch, text_len, text_dim, generator=gen).to(device, dtype))
                for _ in range(2 if cudagraphs else 1):  # cudagraph trees record on the second call
                    if cudagraphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    fn(*inputs)


@contextlib.contextmanager
def inductor_cache_dir(path: Path) -> Iterator[Path]:
    """Point inductor's local caches at `path` for the block (it reads TORCHINDUCTOR_CACHE_DIR on each
    use), so what one compile builds can be collected from there."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def copy_cpp_kernels(src: Path, dest: Path) -> int:
    """Copy the compiled kernels (`*.so`, named by a hash of their source and compiler command, not of
    the cache folder) from one inductor cache tree to another, keeping relative paths; existing files
    are kept. Returns how many were copied."""
    copied = 0
    for so in Path(src).rglob("*.so"):
        target = Path(dest) / so.relative_to(src)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(so, tmp)
        os.replace(tmp, target)  # atomic: a concurrent reader never sees half a library
        copied += 1
    return copied
