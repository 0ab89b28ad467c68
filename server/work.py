"""What flows through the engine: a validated request, its samples (one per image), and the
events it gets back, in this order: StepOut..., ImageOut..., SummaryOut, or a Failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .encode import EncodedPicture
from .lcm import StepConstants


@dataclass(frozen=True)
class GenerationParams:
    """A validated request (server/validation.py makes these from GenerateRequest)."""

    prompt_ids: tuple[int, ...]  # CLIP ids, truncated and padded to 77
    negative_ids: tuple[int, ...]  # ids of the negative prompt ("" when none)
    num_steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    num_images: int
    output_format: str  # jpeg | png | webp | raw
    quality: int
    preview_mode: str  # none | approx | full
    include_latents: bool
    prompt_truncated: bool = False
    prompt_tokens: int = 0

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


# Events, in the order a request receives them: StepOut..., ImageOut..., SummaryOut, or Failure.
@dataclass(frozen=True)
class StepOut:
    image_index: int
    step: int
    num_steps: int
    timestep: int
    preview: EncodedPicture | None
    latents: Any  # None, or (4, h, w) float32 on the host: a tensor, a numpy array once sent to the edge


@dataclass(frozen=True)
class ImageOut:
    index: int
    seed: int
    picture: EncodedPicture
    latents: Any  # as StepOut.latents


@dataclass(frozen=True)
class SummaryOut:
    seed: int
    num_images: int
    prompt_truncated: bool
    prompt_tokens: int
    timings: dict[str, float]  # ms; complete once every earlier event of the request was read


@dataclass(frozen=True)
class Failure:
    code: str  # gRPC status code name, e.g. "INTERNAL"
    message: str


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


@dataclass(eq=False)
class Request:
    """One Generate call inside the engine. `sink` delivers events (or futures of events) in order."""

    params: GenerationParams
    sink: Callable[[Any], None]
    deadline: float | None = None  # time.monotonic() after which no more work is done for it
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the gRPC edge (any thread); read by the loop
    on_cancel: Callable[[], None] | None = None  # tells an engine in another process (engine_process.py)
    next_image: int = 0  # images [0, next_image) have been admitted
    unfinished: int = 0
    admitted_at: float | None = None
    failed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # encoders add to timings from the pool
    timings: dict[str, float] = field(default_factory=lambda: {
        "queue_ms": 0.0, "text_ms": 0.0, "unet_ms": 0.0, "vae_ms": 0.0, "encode_ms": 0.0, "total_ms": 0.0})

    def __post_init__(self) -> None:
        self.unfinished = self.params.num_images

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    @property
    def rows_per_image(self) -> int:
        return 2 if self.params.guided else 1


@dataclass(eq=False)
class Sample:
    """One image of a request, moving through its steps."""

    request: Request
    index: int  # image index within the request
    seed: int
    generator: torch.Generator  # CPU, seeded with `seed`: initial latents, then one renoise per step
    consts: list[StepConstants]
    latents: torch.Tensor  # (1, 4, h, w) float32 on the device: x_t at the current step
    cond: torch.Tensor  # (77, D) text embedding, model dtype
    uncond: torch.Tensor | None  # (77, D) negative-prompt embedding when guided
    step: int = 0

    @property
    def resolution(self) -> tuple[int, int]:
        return self.request.params.height, self.request.params.width
