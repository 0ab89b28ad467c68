"""What a sample starts from: its generator's draws in diffusers' order, and, for img2img and
inpainting, the VAE-encoded init image noised to the sample's first timestep.

The reference for each image is diffusers itself with `torch.Generator("cpu").manual_seed(seed)`,
for a batch of one; every randn below is drawn in the same order, shape and dtype:

  text-to-image  StableDiffusionPipeline         initial latents, then each step's renoise
  img2img        StableDiffusionImg2ImgPipeline  the VAE-encoder sample of the init image, the
                                                 start noise, then each step's renoise
  inpainting     StableDiffusionInpaintPipeline  the same two, then the VAE-encoder sample of the
                                                 masked image (a 4-channel UNet never uses those
                                                 latents: drawn and dropped), then each renoise

(LCMScheduler.step draws at every step but the last.) All of it is drawn at admission and copied to
the device once, so the loop never waits for the host's random numbers.

With an init image a sample runs the last steps of its num_steps schedule (params.start_step on):
diffusers' `get_timesteps` slices the full schedule and sets the scheduler's begin index, so each
step keeps its row (timestep, coefficients) of the full schedule. Its start latents are
LCMScheduler.add_noise(init latents, start noise, first timestep); an inpainting sample at strength
1 starts from the start noise alone (the pipeline's `is_strength_max`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from .lcm import Coefficients, LcmSchedule, Step, add_noise, renoise
from ..protocol import GenerationParams
from ..model.runtime import ModelSpec
from .work import Inpainting, Request, Sample


def draw_noise(params: GenerationParams, seed: int, steps: list[Step], spec: ModelSpec, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One image's draws -> (initial latents or empty, (len(steps) - 1, 4, h, w) renoise noise,
    (2, 4, h, w) VAE-sample and start noise of an init image or None), float32 on the device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, spec.latent_channels, params.height // spec.vae_scale_factor, params.width // spec.vae_scale_factor)
    head = 1 if params.init_image is None else 3 if params.mask_image is not None else 2
    draws = [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(head + len(steps) - 1)]
    host = torch.cat(draws)  # (head + renoises, 4, h, w), each randn in the model dtype as diffusers draws it
    if device.type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True).float()
    if params.init_image is None:
        return on_device[:1], on_device[1:], None
    return torch.empty(0, device=device), on_device[head:], on_device[:2]


def start_from_images(samples: list[Sample], vae_encode: Callable[[torch.Tensor], torch.Tensor],
                      schedule: LcmSchedule, spec: ModelSpec, batch_size: int) -> None:
    """Give new img2img/inpainting samples their start latents: each request's init image is
    VAE-encoded once (batched per resolution across the requests admitted together), then each
    sample draws its own latents from the moments with its own noise."""
    pending = [s for s in samples if s.image_noise is not None]
    if not pending:
        return
    start = time.perf_counter()
    to_encode = list(dict.fromkeys(s.request for s in pending if s.request.init_moments is None))
    by_resolution: dict[tuple[int, int], list[Request]] = {}
    for request in to_encode:
        by_resolution.setdefault((request.params.height, request.params.width), []).append(request)
    for requests in by_resolution.values():
        pixels = torch.cat([init_pixels(r.params, spec) for r in requests])  # (N, 3, H, W) model dtype
        moments = torch.cat([vae_encode(chunk) for chunk in torch.split(pixels, batch_size)])  # (N, 8, h, w)
        for request, m in zip(requests, moments):
            request.init_moments = m[None]
            if request.params.mask_image is not None:
                request.latent_mask = latent_mask(request.params, spec)
    rows = torch.tensor([s.current.row for s in pending], dtype=torch.long).to(spec.device, non_blocking=True)
    coefficients = schedule.coefficients(rows)
    for j, s in enumerate(pending):
        assert s.image_noise is not None and s.request.init_moments is not None
        p = s.request.params
        init = spec.scaling_factor * latent_sample(s.request.init_moments, s.image_noise[:1].to(spec.dtype))
        init = init.float()  # (1, 4, h, w): x0 of the init image, scaled as diffusers scales it
        start_noise = s.image_noise[1:2]
        if s.request.latent_mask is not None:
            s.latents = start_noise if p.strength == 1.0 else add_noise(init, start_noise, coefficients.select([j]))
            s.inpaint = Inpainting(init=init, noise=start_noise, mask=s.request.latent_mask)
        else:
            s.latents = add_noise(init, start_noise, coefficients.select([j]))
        s.image_noise = None
    elapsed_ms = (time.perf_counter() - start) * 1e3
    for request in {s.request for s in pending}:
        request.timings.vae_ms += elapsed_ms


def latent_sample(moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B, 8, h, w) moments and (B, 4, h, w) noise -> a sample of the latent distribution, computed as
    diffusers' DiagonalGaussianDistribution.sample does (in the moments' dtype)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    return mean + std * noise


def init_pixels(params: GenerationParams, spec: ModelSpec) -> torch.Tensor:
    """The request's uint8 RGB (H, W, 3) -> (1, 3, H, W) in [-1, 1] on the device in the model dtype,
    as VaeImageProcessor.preprocess computes it (float32 / 255, then 2x - 1, in numpy)."""
    assert params.init_image is not None
    image = np.frombuffer(params.init_image, dtype=np.uint8).reshape(params.height, params.width, 3)
    unit = image.astype(np.float32) / 255.0
    normalized = 2.0 * unit - 1.0
    return torch.from_numpy(normalized.transpose(2, 0, 1)[None].copy()).to(spec.device, spec.dtype)


def latent_mask(params: GenerationParams, spec: ModelSpec) -> torch.Tensor:
    """The request's uint8 grey mask (H, W) -> (1, 1, h, w) float32 on the device: binarized at 0.5
    as the inpaint pipeline's mask processor does, then resized to the latents (nearest, as its
    prepare_mask_latents does) and cast to the model dtype (values stay 0 and 1)."""
    assert params.mask_image is not None
    grey = np.frombuffer(params.mask_image, dtype=np.uint8).reshape(params.height, params.width)
    mask = grey.astype(np.float32) / 255.0
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    size = (params.height // spec.vae_scale_factor, params.width // spec.vae_scale_factor)
    small = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=size)
    return small.to(spec.device, spec.dtype).float()


def keep_unmasked(samples: list[Sample], latents: torch.Tensor, c: Coefficients | None) -> torch.Tensor:
    """Inpainting, after a step: latents (B, 4, h, w) of `samples`, with each inpainting sample's kept
    region put back from its init latents, as the pipeline does for a 4-channel UNet:
    (1 - mask) * init_proper + mask * latents, where init_proper is the init latents noised with the
    start noise to the next timestep (`c`: the samples' Coefficients) or, after the last step and for
    what is shown (previews, the final image), the clean init latents (`c` None)."""
    rows = [i for i, s in enumerate(samples) if s.inpaint is not None]
    if not rows:
        return latents
    inpaints = [ip for ip in (samples[i].inpaint for i in rows) if ip is not None]
    init = torch.cat([ip.init for ip in inpaints])  # (R, 4, h, w)
    mask = torch.cat([ip.mask for ip in inpaints])  # (R, 1, h, w)
    if c is not None:
        init = renoise(init, torch.cat([ip.noise for ip in inpaints]), c.select(rows))
    out = latents.clone()
    out[rows] = (1 - mask) * init + mask * latents[rows]
    return out
