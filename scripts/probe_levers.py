"""Issue 18 item 7: eager speed levers, measured before any is kept (a part of gpu_probe.py).

Each lever runs on a copy of the module (the probe's own modules stay as loaded), against the
module as the server runs it, their calls interleaved (gpu_probe.Probe.timed_pair), at the buckets
the engine pads to: the UNet at --buckets, the VAE decode at --vae-buckets (1, 2, 4, 8: its batches
are at most EngineConfig.vae_batch_size = 8). One row per (lever, bucket): base ms, lever ms, the
speed-up, and max |lever - base| on the same inputs (a lever must not change the images beyond
fp16 noise).
  unet_channels_last   UNet weights in channels_last (NHWC convolutions; inputs as the engine gives them)
  unet_fused_qkv       diffusers' fuse_qkv_projections(): one matmul for q, k, v (k, v in cross-attention)
  unet_both            the two together
  vae_channels_last    the VAE decode with channels_last weights
  vae_batch16          one decode of 16 latents against the engine's two decodes of 8 (ms per call of 16)
On a CPU (the dry run) the same rows at the tiny preset's shapes: the code runs, the numbers mean little.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch


def channels_last(module: torch.nn.Module) -> None:
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # nn.Module.to accepts it


def fused_qkv(module: Any) -> None:
    module.fuse_qkv_projections()  # diffusers' AttentionMixin: FusedAttnProcessor2_0 on every attention


def both(module: Any) -> None:
    channels_last(module)
    fused_qkv(module)


UNET_LEVERS: dict[str, Callable[[Any], None]] = {
    "unet_channels_last": channels_last, "unet_fused_qkv": fused_qkv, "unet_both": both}
VAE_LEVERS: dict[str, Callable[[Any], None]] = {"vae_channels_last": channels_last}


def _compare(probe: Any, name: str, bucket: int, base: Callable[[], Any], lever: Callable[[], Any],
             iters: int, **extra: Any) -> float:
    """One row: interleaved timings and the max |diff| of the outputs; returns the speed-up."""
    diff = float((lever().float() - base().float()).abs().max())
    base_ms, lever_ms = probe.timed_pair(base, lever, iters)
    speedup = round(base_ms / lever_ms, 3) if lever_ms else 0.0
    probe.row("levers", variant=name, bucket=bucket, base_ms=base_ms, lever_ms=lever_ms, speedup=speedup,
              max_abs_diff=diff, **extra)
    return speedup


def levers(probe: Any) -> dict[str, Any]:
    """The gpu_probe part: every lever at every bucket; returns each lever's speed-ups by bucket."""
    pipe = probe.pipe
    unet_buckets = [int(b) for b in probe.args.buckets.split(",")]
    vae_buckets = [int(b) for b in probe.args.vae_buckets.split(",")]
    found: dict[str, str] = {}
    with torch.inference_mode():
        for name, apply in UNET_LEVERS.items():
            variant = copy.deepcopy(pipe.unet)
            apply(variant)
            speedups = []
            for bucket in unet_buckets:
                latents, timesteps, text = probe.unet_inputs(bucket, 5)

                def base(latents: Any = latents, timesteps: Any = timesteps, text: Any = text) -> Any:
                    return pipe.unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]

                def lever(latents: Any = latents, timesteps: Any = timesteps, text: Any = text,
                          variant: Any = variant) -> Any:
                    return variant(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]

                iters = probe.iters if bucket <= 8 else max(2, probe.iters // 2)
                speedups.append(f"{_compare(probe, name, bucket, base, lever, iters)}x@{bucket}")
            found[name] = " ".join(speedups)
            del variant
            probe.free()
        for name, apply in VAE_LEVERS.items():
            variant = copy.deepcopy(pipe.vae)
            apply(variant)
            speedups = []
            for bucket in vae_buckets:
                (latents,) = probe.vae_inputs(bucket, 6)

                def base_vae(latents: Any = latents) -> Any:
                    return pipe.vae.decode(latents, return_dict=False)[0]

                def lever_vae(latents: Any = latents, variant: Any = variant) -> Any:
                    return variant.decode(latents, return_dict=False)[0]

                speedups.append(f"{_compare(probe, name, bucket, base_vae, lever_vae, probe.iters)}x@{bucket}")
            found[name] = " ".join(speedups)
            del variant
            probe.free()
        (latents,) = probe.vae_inputs(16, 7)

        def two_of_eight() -> Any:
            return torch.cat([pipe.vae.decode(half, return_dict=False)[0] for half in latents.split(8)])

        def one_of_sixteen() -> Any:
            return pipe.vae.decode(latents, return_dict=False)[0]

        speedup = _compare(probe, "vae_batch16", 16, two_of_eight, one_of_sixteen, probe.iters,
                           how="base: two decodes of 8, lever: one of 16")
        found["vae_batch16"] = f"{speedup}x@16"
    return found
