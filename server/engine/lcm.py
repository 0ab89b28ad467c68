"""The LCM sampler, vectorized over samples that sit at different steps.

diffusers' `LCMScheduler.step` works on one batch that shares one timestep. Here every sample of
the running batch has its own step index, so its own timestep and coefficients; the arithmetic is
the same elementwise formula, so it vectorizes. The constants are read from the scheduler itself
(timesteps, alphas_cumprod, boundary scalings) so that a sample's latents follow diffusers'
float32 computation exactly, whatever else is in the batch.

Every (step count, step index) pair is one row of a table that lives on the device, so a batch's
coefficients are one gather by row index: no per-step host tensors, no per-sample copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from diffusers.schedulers.scheduling_lcm import LCMScheduler

# Columns of LcmSchedule.table.
_SQRT_ALPHA, _SQRT_BETA, _C_SKIP, _C_OUT, _SQRT_ALPHA_NEXT, _SQRT_BETA_NEXT = range(6)


@dataclass(frozen=True)
class Step:
    """Host-side facts of one step of a `num_steps`-step schedule."""

    row: int  # row of LcmSchedule.table / .timesteps
    timestep: int  # diffusion timestep, 0..999
    is_last: bool  # the last step returns the denoised sample, no renoise


@dataclass(frozen=True)
class Coefficients:
    """The LCM step's per-sample coefficients, each (B, 1, 1, 1) float32 on the device."""

    sqrt_alpha: torch.Tensor  # sqrt(alpha_cumprod[t])
    sqrt_beta: torch.Tensor  # sqrt(1 - alpha_cumprod[t])
    c_skip: torch.Tensor  # consistency boundary scalings at t
    c_out: torch.Tensor
    sqrt_alpha_next: torch.Tensor  # sqrt(alpha_cumprod[t_next]): the renoise towards the next step
    sqrt_beta_next: torch.Tensor

    def select(self, rows: torch.Tensor | slice) -> Coefficients:
        """The coefficients of some of the samples: `rows` a (N,) int64 index on the device (rows.py)
        or a slice; never a Python list, whose copy to the device would make the host wait."""
        if isinstance(rows, slice):
            return Coefficients(*(getattr(self, f.name)[rows] for f in fields(self)))
        return Coefficients(*(getattr(self, f.name).index_select(0, rows) for f in fields(self)))


class LcmSchedule:
    """Timesteps and step constants for every step count 1..max_steps, computed once at start."""

    def __init__(self, scheduler: LCMScheduler, max_steps: int = 8, device: torch.device | str = "cpu") -> None:
        self.max_steps = max_steps
        self.steps: dict[int, list[Step]] = {}
        rows: list[list[float]] = []
        timesteps: list[int] = []
        for num_steps in range(1, max_steps + 1):
            s = fresh_scheduler(scheduler)
            s.set_timesteps(num_steps, device="cpu")
            ts = s.timesteps  # int64, descending
            steps = []
            for index, t in enumerate(ts):
                # As LCMScheduler.step: the "previous" (next in sampling order) timestep.
                t_next = ts[index + 1] if index + 1 < len(ts) else t
                alpha = s.alphas_cumprod[t]
                alpha_next = s.alphas_cumprod[t_next] if t_next >= 0 else s.final_alpha_cumprod
                c_skip, c_out = s.get_scalings_for_boundary_condition_discrete(t)
                steps.append(Step(row=len(rows), timestep=int(t), is_last=index == len(ts) - 1))
                # float32 arithmetic as the scheduler's (alphas_cumprod is float32).
                rows.append([float(alpha.sqrt()), float((1 - alpha).sqrt()), float(c_skip), float(c_out),
                             float(alpha_next.sqrt()), float((1 - alpha_next).sqrt())])
                timesteps.append(int(t))
            self.steps[num_steps] = steps
        self.table = torch.tensor(rows, dtype=torch.float32, device=device)  # (K, 6)
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)  # (K,)

    def coefficients(self, rows: torch.Tensor) -> Coefficients:
        """rows (B,) int64 on the device -> each sample's coefficients, (B, 1, 1, 1)."""
        c = self.table[rows].view(-1, 6, 1, 1, 1)  # (B, 6, 1, 1, 1)
        return Coefficients(*(c[:, i] for i in range(6)))


def scheduler_config(scheduler: LCMScheduler) -> Mapping[str, Any]:
    """The scheduler's config (diffusers' FrozenDict; its ConfigMixin attribute carries no type)."""
    return cast(Mapping[str, Any], getattr(scheduler, "config"))  # noqa: B009


def check_scheduler(scheduler: LCMScheduler) -> None:
    """Refuse a scheduler whose step this module does not compute (ValueError, at start)."""
    config = scheduler_config(scheduler)
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"prediction_type {config['prediction_type']!r} is not supported (SD v1.5 is 'epsilon')")
    if config.get("thresholding") or config.get("clip_sample"):
        raise ValueError("LCM with thresholding or clip_sample is not supported (SD v1.5 + LCM uses neither)")


def fresh_scheduler(scheduler: LCMScheduler) -> LCMScheduler:
    """A new LCMScheduler with the same config (set_timesteps changes a scheduler's state)."""
    make = cast(Any, LCMScheduler).from_config  # untyped in diffusers
    return cast(LCMScheduler, make(scheduler_config(scheduler)))


def lcm_step(
    sample: torch.Tensor,  # (B, 4, h, w) float32: x_t of each sample
    noise_pred: torch.Tensor,  # (B, 4, h, w) float32: the UNet's epsilon (guided)
    c: Coefficients,  # (B, 1, 1, 1) each
) -> torch.Tensor:
    """Denoise every sample to its x0 estimate, as LCMScheduler.step does (epsilon prediction)."""
    # 1. predicted original sample from the noise prediction
    predicted_original = (sample - c.sqrt_beta * noise_pred) / c.sqrt_alpha
    # 2. consistency boundary condition
    return c.c_out * predicted_original + c.c_skip * sample  # denoised, (B, 4, h, w)


def add_noise(
    clean: torch.Tensor,  # (B, 4, h, w) float32: x0, e.g. an init image's latents
    noise: torch.Tensor,  # (B, 4, h, w) float32
    c: Coefficients,  # of the timestep to noise to
) -> torch.Tensor:
    """The forward process to each sample's current timestep, as LCMScheduler.add_noise (img2img's start)."""
    return c.sqrt_alpha * clean + c.sqrt_beta * noise


def renoise(
    denoised: torch.Tensor,  # (B, 4, h, w) float32, only samples that have a next step
    noise: torch.Tensor,  # (B, 4, h, w) float32, from each sample's own generator
    c: Coefficients,  # of the same samples
) -> torch.Tensor:
    """Noise the x0 estimate back to the next step's timestep (skipped after the last step)."""
    return c.sqrt_alpha_next * denoised + c.sqrt_beta_next * noise
