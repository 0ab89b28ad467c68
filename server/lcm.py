"""The LCM sampler, vectorized over samples that sit at different steps.

diffusers' `LCMScheduler.step` works on one batch that shares one timestep. Here every sample of
the running batch has its own step index, so its own timestep and coefficients; the arithmetic is
the same elementwise formula, so it vectorizes. The constants are read from the scheduler itself
(timesteps, alphas_cumprod, boundary scalings) so that a sample's latents follow diffusers'
float32 computation exactly, whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import LCMScheduler


@dataclass(frozen=True)
class StepConstants:
    """Constants of step `index` of an `num_steps`-step LCM schedule (float32 0-d tensors, CPU)."""

    timestep: int  # diffusion timestep, 0..999
    sqrt_alpha: torch.Tensor  # sqrt(alpha_cumprod[t])
    sqrt_beta: torch.Tensor  # sqrt(1 - alpha_cumprod[t])
    c_skip: torch.Tensor  # consistency boundary scalings at t
    c_out: torch.Tensor
    sqrt_alpha_next: torch.Tensor  # sqrt(alpha_cumprod[t_next]): the renoise of the next step
    sqrt_beta_next: torch.Tensor
    is_last: bool  # the last step returns the denoised sample, no renoise


class LcmSchedule:
    """Timesteps and step constants for every step count 1..max_steps, computed once at start."""

    def __init__(self, scheduler: LCMScheduler, max_steps: int = 8) -> None:
        self.max_steps = max_steps
        self.steps: dict[int, list[StepConstants]] = {}
        for num_steps in range(1, max_steps + 1):
            s = LCMScheduler.from_config(scheduler.config)
            s.set_timesteps(num_steps, device="cpu")
            timesteps = s.timesteps  # int64, descending
            consts = []
            for index, t in enumerate(timesteps):
                # As LCMScheduler.step: the "previous" (next in sampling order) timestep.
                t_next = timesteps[index + 1] if index + 1 < len(timesteps) else t
                alpha = s.alphas_cumprod[t]
                alpha_next = s.alphas_cumprod[t_next] if t_next >= 0 else s.final_alpha_cumprod
                c_skip, c_out = s.get_scalings_for_boundary_condition_discrete(t)
                consts.append(StepConstants(
                    timestep=int(t), sqrt_alpha=alpha.sqrt(), sqrt_beta=(1 - alpha).sqrt(),
                    c_skip=torch.as_tensor(c_skip, dtype=torch.float32),
                    c_out=torch.as_tensor(c_out, dtype=torch.float32),
                    sqrt_alpha_next=alpha_next.sqrt(), sqrt_beta_next=(1 - alpha_next).sqrt(),
                    is_last=index == len(timesteps) - 1,
                ))
            self.steps[num_steps] = consts

    def constants(self, num_steps: int, index: int) -> StepConstants:
        return self.steps[num_steps][index]


def stack(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-sample 0-d constants -> a (B, 1, 1, 1) float32 tensor that broadcasts over latents."""
    return torch.stack(values).view(-1, 1, 1, 1).to(device, non_blocking=True)


def lcm_step(
    sample: torch.Tensor,  # (B, 4, h, w) float32: x_t of each sample
    noise_pred: torch.Tensor,  # (B, 4, h, w) float32: the UNet's epsilon (guided)
    consts: list[StepConstants],  # one per sample
) -> torch.Tensor:
    """Denoise every sample to its x0 estimate, as LCMScheduler.step does (epsilon prediction)."""
    device = sample.device
    sqrt_alpha = stack([c.sqrt_alpha for c in consts], device)
    sqrt_beta = stack([c.sqrt_beta for c in consts], device)
    c_skip = stack([c.c_skip for c in consts], device)
    c_out = stack([c.c_out for c in consts], device)
    # 1. predicted original sample from the noise prediction
    predicted_original = (sample - sqrt_beta * noise_pred) / sqrt_alpha
    # 2. consistency boundary condition
    return c_out * predicted_original + c_skip * sample  # denoised, (B, 4, h, w)


def renoise(
    denoised: torch.Tensor,  # (B, 4, h, w) float32, only samples that have a next step
    noise: torch.Tensor,  # (B, 4, h, w) float32, from each sample's own generator
    consts: list[StepConstants],
) -> torch.Tensor:
    """Noise the x0 estimate back to the next step's timestep (skipped after the last step)."""
    device = denoised.device
    sqrt_alpha_next = stack([c.sqrt_alpha_next for c in consts], device)
    sqrt_beta_next = stack([c.sqrt_beta_next for c in consts], device)
    return sqrt_alpha_next * denoised + sqrt_beta_next * noise
