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

(LCMScheduler.step draws at every step but the last.) All of it is drawn when the request reaches
the engine (`draw_host`, on the engine process's receiver thread, in Engine.submit) and copied to
the device once at admission (`to_device`, non-blocking from pinned memory), so the loop thread
neither draws random numbers nor waits for their copy.

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

from .lcm import LcmSchedule, add_noise
from ..protocol import GenerationParams
from ..model.runtime import ModelSpec
from .rows import index, to_device
from .work import Inpainting, Request, Sample


def _head(params: GenerationParams) -> int:
    """Draws before the renoise noise: the initial latents; or an init image's VAE sample and start
    noise (+ the masked image's VAE sample, drawn and dropped, for inpainting)."""
    return 1 if params.init_image is None else 3 if params.mask_image is not None else 2


def draw_host(params: GenerationParams, seed: int, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """One image's draws, in the reference pipeline's order -> (head + steps_run - 1, 4, h, w) on the
    host, each randn in the model dtype as diffusers draws it. Runs off the loop thread."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, spec.latent_channels, params.height // spec.vae_scale_factor, params.width // spec.vae_scale_factor)
    return torch.cat([torch.randn(shape, generator=generator, dtype=dtype)
                      for _ in range(_head(params) + params.steps_run - 1)])


def draws_to_device(params: GenerationParams, host: torch.Tensor, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """draw_host's tensor -> (initial latents or empty, (steps_run - 1, 4, h, w) renoise noise,
    (2, 4, h, w) VAE-sample and start noise of an init image or None), float32 on the device, from
    one non-blocking copy."""
    on_device = to_device(host, device).float()
    if params.init_image is None:
        return on_device[:1], on_device[1:], None
    return torch.empty(0, device=device), on_device[_head(params):], on_device[:2]


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
    coefficients = schedule.coefficients(index([s.current.row for s in pending], spec.device))
    for j, s in enumerate(pending):
        assert s.image_noise is not None and s.request.init_moments is not None
        p = s.request.params
        init = spec.scaling_factor * latent_sample(s.request.init_moments, s.image_noise[:1].to(spec.dtype))
        init = init.float()  # (1, 4, h, w): x0 of the init image, scaled as diffusers scales it
        start_noise = s.image_noise[1:2]
        if s.request.latent_mask is not None:
            s.latents = start_noise if p.strength == 1.0 else add_noise(init, start_noise, coefficients.select(slice(j, j + 1)))
            s.inpaint = Inpainting(init=init, noise=start_noise, mask=s.request.latent_mask)
        else:
            s.latents = add_noise(init, start_noise, coefficients.select(slice(j, j + 1)))
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
    return to_device(torch.from_numpy(normalized.transpose(2, 0, 1)[None].copy()).to(spec.dtype), spec.device)


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
    return to_device(small.to(spec.dtype), spec.device).float()

