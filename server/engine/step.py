"""One denoising step for every sample of one resolution: the function to read to understand denoising.

`denoise(group, ...)` does, top to bottom, for samples that each sit at their own step:

  1. rows      the UNet call's rows: each sample's latents (its conditional row), then again the
               latents of the guided samples (their unconditional rows); each row's timestep comes
               from the schedule table (lcm.py), by its row there
  2. UNet      ONE call for the whole group, every row at its own timestep and with its own adapters
  3. guidance  as diffusers: uncond + scale * (cond - uncond), for the guided samples only
  4. LCM step  x_t -> the denoised estimate x0 (lcm.lcm_step), vectorized over the samples
  5. renoise   samples with a next step: x0 noised to the next timestep with the sample's own noise
               (lcm.renoise); this is the sample's x_t for its next step
  6. inpaint   an inpainting sample's kept region is put back from its init latents: noised to the
               next timestep for its next step, clean for what is shown and decoded

and returns the denoised estimates (what step events show and finished samples decode). The row
positions (guided, going on, inpainting) go to the device once per call as index tensors (rows.py):
no Python list indexes a device tensor here, so the host never waits for the GPU in this function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.runtime import UNetCall
from .adapter_rows import adapter_extras
from .lcm import Coefficients, LcmSchedule, lcm_step, renoise
from .rows import indices, to_device
from .timing import DeviceTimer
from .work import Sample

UNetFn = Callable[[UNetCall], torch.Tensor]  # (R, 4, h, w) predicted noise


def denoise(group: list[Sample], unet: UNetFn, schedule: LcmSchedule, dtype: torch.dtype,
            timer: DeviceTimer) -> torch.Tensor:
    """One step of every sample in `group` (one resolution) -> their denoised latents (B, 4, h, w)
    float32. Sets each sample that has a next step to its next x_t (`Sample.latents`); the caller
    moves `Sample.step` on after the step's events."""
    device = schedule.table.device
    steps = [s.current for s in group]
    size = len(group)  # B
    guided = [i for i, s in enumerate(group) if s.uncond is not None]
    going_on = [i for i, step in enumerate(steps) if not step.is_last]
    going_on_samples = [group[i] for i in going_on]

    # 1. rows, and every row position this step needs, on the device in one copy
    table_rows, guided_at, going_on_at, inpainting_at, inpainting_going_on_at = indices(
        device,
        [step.row for step in steps] + [steps[i].row for i in guided],  # (R,) R = B + guided
        guided,
        going_on,
        [i for i, s in enumerate(group) if s.inpaint is not None],
        [j for j, s in enumerate(going_on_samples) if s.inpaint is not None],
    )
    latents = torch.cat([s.latents for s in group])  # (B, 4, h, w) float32
    rows = torch.cat([latents, latents.index_select(0, guided_at)]) if guided else latents  # (R, 4, h, w)
    texts = torch.stack([s.cond for s in group] + [s.uncond for s in group if s.uncond is not None])  # (R, 77, D)
    # each row's own adapters (an unconditional row those of its conditional row, as diffusers): none -> no extras
    extras = adapter_extras([s.request.adapters for s in group] + [group[i].request.adapters for i in guided],
                            device, dtype)  # (R, K) slots and scales

    # 2. one UNet call
    with timer.measure(len(texts), {s.request for s in group}):
        call = UNetCall(rows.to(dtype), schedule.timesteps[table_rows], texts, extras)
        noise_pred = unet(call).float()  # (R, 4, h, w)

    # 3. classifier-free guidance, for the guided samples only
    if guided:
        scale = to_device(torch.tensor([group[i].request.params.guidance_scale for i in guided],
                                       dtype=torch.float32), device).view(-1, 1, 1, 1)  # (G, 1, 1, 1)
        cond = noise_pred.index_select(0, guided_at)  # (G, 4, h, w)
        uncond = noise_pred[size:]
        noise_pred = noise_pred[:size].index_copy(0, guided_at, uncond + scale * (cond - uncond))

    # 4. the LCM step: every sample's x0 estimate
    c = schedule.coefficients(table_rows[:size])  # (B, 1, 1, 1) each
    denoised = lcm_step(latents, noise_pred[:size], c)  # (B, 4, h, w) float32

    # 5. renoise towards the next step (not after the last), and 6. inpainting's kept region
    if going_on:
        noise = torch.cat([s.noise[s.step: s.step + 1] for s in going_on_samples])  # (N, 4, h, w)
        c_next = c.select(going_on_at)
        renoised = renoise(denoised.index_select(0, going_on_at), noise, c_next)
        renoised = keep_unmasked(going_on_samples, renoised, inpainting_going_on_at, c_next)
        for j, s in enumerate(going_on_samples):
            s.latents = renoised[j: j + 1]
    return keep_unmasked(group, denoised, inpainting_at, None)  # shown and final: the init image's kept region


def keep_unmasked(samples: list[Sample], latents: torch.Tensor, at: torch.Tensor,
                  c: Coefficients | None) -> torch.Tensor:
    """Inpainting, after a step: latents (B, 4, h, w) of `samples`, with each inpainting sample
    (positions `at`, a device index) given back its kept region, as diffusers' inpaint pipeline does
    for a 4-channel UNet: (1 - mask) * init_proper + mask * latents, where init_proper is the init
    latents noised with the start noise to the next timestep (`c`: the samples' Coefficients) or,
    after the last step and for what is shown (previews, the final image), the clean init latents
    (`c` None)."""
    inpaints = [s.inpaint for s in samples if s.inpaint is not None]
    if not inpaints:
        return latents
    init = torch.cat([ip.init for ip in inpaints])  # (P, 4, h, w)
    mask = torch.cat([ip.mask for ip in inpaints])  # (P, 1, h, w), 1 = repaint
    if c is not None:
        init = renoise(init, torch.cat([ip.noise for ip in inpaints]), c.select(at))
    blended = (1 - mask) * init + mask * latents.index_select(0, at)
    return latents.index_copy(0, at, blended)
