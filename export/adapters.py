"""What export/compile.py and the server's compiled runtimes must build identically.

The adapters that give each part a plain tensor signature (so export and compile see one clean graph
each), the module rewrites applied before export or compile (the server applies the same ones, or
the compile backend's cache misses), the torch.compile settings, and the inductor cache plumbing.
The file layout and machine identity are the artifact contract, in artifact.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lcmserve.export.unet_call import INPUT_NAMES, UNetCall


class UNetStep(torch.nn.Module):
    """A UNetCall's tensors, positionally (`UNetCall.positional()`, export/unet_call.py) -> predicted noise
    (B, 4, h, w): diffusers' UNet2DConditionModel with the text as encoder_hidden_states. It reads no
    extras (a call with some is refused before it gets here)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(INPUT_NAMES):
            raise ValueError(f"the UNet takes {', '.join(INPUT_NAMES)}; got {len(inputs)} tensors")
        call = dict(zip(INPUT_NAMES, inputs))  # (a dict, not a UNetCall: plain to trace for export and compile)
        noise: torch.Tensor = self.unet(call["latents"], call["timesteps"], encoder_hidden_states=call["text"],
                                        return_dict=False)[0]
        return noise


class VaeDecode(torch.nn.Module):
    """Unscaled latents (B, 4, h, w) -> pixels (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        decode: Callable[..., Any] = getattr(self.vae, "decode")  # AutoencoderKL.decode; Module attrs type as Module
        pixels: torch.Tensor = decode(latents, return_dict=False)[0]
        return pixels


class VaeEncode(torch.nn.Module):
    """Pixels (B, 3, 8h, 8w) in [-1, 1] -> moments (B, 8, h, w): the mean and log-variance of the latent
    distribution (AutoencoderKL's encoder + quant_conv; diffusers' DiagonalGaussianDistribution.parameters)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        encode: Callable[..., Any] = getattr(self.vae, "encode")  # noqa: B009 - AutoencoderKL.encode
        moments: torch.Tensor = encode(pixels, return_dict=False)[0].parameters
        return moments


class TinyVaeDecode(torch.nn.Module):
    """Latents (B, 4, h, w) / the tiny autoencoder's scaling factor (TAESD: 1.0) -> pixels (B, 3, 8h, 8w)
    in [-1, 1]: AutoencoderTiny.decode (tanh clamp of the latents at +-3, the decoder, [0, 1] -> [-1, 1]),
    the tiny decoder of every backend (compiled, or this module run eagerly: server/model/eager.py)."""

    def __init__(self, tiny_vae: torch.nn.Module) -> None:
        super().__init__()
        self.tiny_vae = tiny_vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        decode: Callable[..., Any] = getattr(self.tiny_vae, "decode")  # noqa: B009 - AutoencoderTiny.decode
        pixels: torch.Tensor = decode(latents, return_dict=False)[0]
        return pixels


class TextEncode(torch.nn.Module):
    """Token ids (B, 77) int64 -> last hidden state (B, 77, D), as StableDiffusionPipeline.encode_prompt."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.text_encoder(input_ids)[0]
        return hidden


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


def apply_optimizations(module: torch.nn.Module, optimizations: Sequence[str]) -> torch.nn.Module:
    """Rewrite a diffusers UNet / VAE in place (callers pass a copy: fusing adds `to_qkv` weights that
    must not reach the saved model/ folder)."""
    fuse = getattr(module, "fuse_qkv_projections", None)
    if "fused_qkv" in optimizations and callable(fuse):
        fuse()
    if "channels_last" in optimizations:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented; not in torch's stubs
    return module


def compile_settings(device: str | torch.device) -> dict[str, Any]:
    """torch.compile keyword arguments for the UNet and VAE decode on `device` (recorded in the manifest;
    the server compiles with the recorded ones).

    CUDA: the default mode, not "reduce-overhead". The engine captures its own CUDA graphs, one per
    padded batch bucket and resolution (server/engine/cuda_graphs.py), around whatever callables the runtime
    gives it, and they capture default-mode inductor code as well as eager code: the launch overhead
    that reduce-overhead would remove (a batch-1 UNet step: 25 ms eager, 8 ms replayed on an H100) is
    removed by the engine's graphs instead. reduce-overhead would also break serving: its cudagraph
    trees keep thread-local state that torch (before pytorch PR #184357) sets up only in the thread
    that compiled, while warm-up runs in the engine process's main thread and serving in the engine
    thread, so the first unseen batch size raises AssertionError in cudagraph_trees; and graphs
    recorded inside the engine's capture would nest two graph managers.
    CPU: the C++ wrapper (`cpp_wrapper`), one compiled library per graph: on tiny's UNet here it
    compiled in 108 s against 133 s with the default Python wrapper, and ran a step in 13 ms against
    183 ms (eager: 26 ms).
    """
    if torch.device(device).type == "cuda":
        return {}
    return {"options": {"cpp_wrapper": True}}


def compile_parts(unet: torch.nn.Module, vae: torch.nn.Module, optimizations: Sequence[str],
                  settings: Mapping[str, Any]) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """torch.compile'd UNetStep and VaeDecode. Export and server must build them identically (same
    rewrites, same settings), or the cache keys differ and the server compiles cold."""
    apply_optimizations(unet, optimizations)
    apply_optimizations(vae, optimizations)
    # fullgraph: a graph break would leave eager islands between compiled pieces; fail instead.
    unet_c: Callable[..., torch.Tensor] = torch.compile(UNetStep(unet).eval(), fullgraph=True, **settings)
    vae_c: Callable[..., torch.Tensor] = torch.compile(VaeDecode(vae).eval(), fullgraph=True, **settings)
    return unet_c, vae_c


def compile_tiny_vae_decoder(tiny_vae: torch.nn.Module, optimizations: Sequence[str],
                             settings: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    """torch.compile'd TinyVaeDecode (the compile backend's tiny decoder), built as compile_parts builds
    the VAE decode: same rewrites, same settings, fullgraph; export and server must match here too."""
    apply_optimizations(tiny_vae, optimizations)
    tiny_c: Callable[..., torch.Tensor] = torch.compile(TinyVaeDecode(tiny_vae).eval(), fullgraph=True, **settings)
    return tiny_c


def warm_compiled(unet: Callable[..., torch.Tensor], vae: Callable[..., torch.Tensor],
                  shapes: Mapping[str, Sequence[Sequence[int]]], *, device: torch.device, dtype: torch.dtype,
                  latent_channels: int, text_len: int, text_dim: int) -> None:
    """Run each (batch, latent_h, latent_w) of shapes["unet"] / shapes["vae_decoder"] once through its
    part: this compiles (export), or loads from the cache (server start)."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch, h, w in shapes.get("unet", ()):
            latents = torch.randn(batch, latent_channels, h, w, generator=gen).to(device, dtype)
            timesteps = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            text = torch.randn(batch, text_len, text_dim, generator=gen).to(device, dtype)
            unet(*UNetCall(latents, timesteps, text).positional())
    warm_decoder(vae, shapes.get("vae_decoder", ()), device=device, dtype=dtype, latent_channels=latent_channels)


def warm_decoder(decode: Callable[..., torch.Tensor], shapes: Sequence[Sequence[int]], *, device: torch.device,
                 dtype: torch.dtype, latent_channels: int) -> None:
    """Run each (batch, latent_h, latent_w) of `shapes` once through a compiled decoder (the VAE's, or the
    tiny autoencoder's at the VAE's warm shapes): compiles at export, loads from the cache at serve."""
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for batch, h, w in shapes:
            decode(torch.randn(batch, latent_channels, h, w, generator=gen).to(device, dtype))


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
