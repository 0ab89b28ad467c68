"""The engine's own bookkeeping: a request inside the engine, its samples (one per image), and the
ordered hand-off of its events (server/protocol.py has the events themselves)."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from .lcm import Step
from ..model.adapters import SlotWeight
from ..protocol import TERMINAL, Event, Failure, GenerationParams, HostTensor, Picture, RequestTrace, Timings
from ..protocol import EngineStopped as EngineStopped  # (re-exported: one class, the edge raises it too)

log = logging.getLogger("lcmserve.engine")


@dataclass(frozen=True)
class Held:
    """A decoded candidate waiting for the others of its request."""

    seed: int
    pixels: torch.Tensor | Picture  # (H, W, 3) uint8 on the host, or its GPU JPEG
    latents: HostTensor | None
    score: float


EventSink = Callable[[int, Event], None]  # (rid, event), called in each request's order


class QueueFull(Exception):
    pass


class OrderedEvents:
    """One request's events, handed to the sink in the order the engine made them. An event behind a
    picture still being encoded (a Future from the encoder pool) waits for it, so a summary always
    leaves after its images, with their encode times in it."""

    def __init__(self, rid: int, sink: EventSink, on_encoded: Callable[[], None] | None) -> None:
        self._rid = rid
        self._sink = sink
        self._on_encoded = on_encoded  # e.g. send the encoded picture now, not at the iteration's end
        self._lock = threading.Lock()  # the engine thread and the encoder threads both call in
        self._pending: collections.deque[Event | concurrent.futures.Future[Event]] = collections.deque()
        self.closed = False  # a terminal event was handed on

    def put(self, item: Event | concurrent.futures.Future[Event]) -> None:
        with self._lock:
            self._pending.append(item)
        if isinstance(item, concurrent.futures.Future):
            item.add_done_callback(self._encoded)  # (at once, here, if it is done already)
        else:
            self._hand_on()

    def _encoded(self, _: concurrent.futures.Future[Event]) -> None:
        self._hand_on()
        if self._on_encoded is not None:
            self._on_encoded()

    def _hand_on(self) -> None:
        with self._lock:
            while self._pending and not self.closed:
                head = self._pending[0]
                if isinstance(head, concurrent.futures.Future):
                    if not head.done():
                        return
                    try:
                        event: Event = head.result()
                    except Exception as exc:  # noqa: BLE001 - the request fails; the server goes on
                        log.exception("encoding failed")
                        event = Failure(grpc.StatusCode.INTERNAL, f"encoding the image failed: {exc}")
                else:
                    event = head
                self._pending.popleft()
                self.closed = isinstance(event, TERMINAL)
                self._sink(self._rid, event)


@dataclass(eq=False)
class Request:
    """One Generate call inside the engine."""

    rid: int
    params: GenerationParams
    events: OrderedEvents
    deadline: float | None = None  # time.monotonic() after which no more work is done for it
    arrival: float = 0.0  # time.perf_counter() at the edge (same clock: one machine)
    cancelled: bool = False  # set by the pipe's receiver thread; read by the loop
    next_image: int = 0  # images [0, next_image) have been admitted
    unfinished: int = 0
    admitted_at: float | None = None
    failed: bool = False  # ended (failed, cancelled or expired): its samples leave the batch
    timings: Timings = field(default_factory=Timings)
    lock: threading.Lock = field(default_factory=threading.Lock)  # encoders add to timings from the pool
    # img2img / inpainting, made once for all its images at the first admission (server/engine/admission.py):
    init_moments: torch.Tensor | None = None  # (1, 8, h, w) VAE-encoder moments of the init image, model dtype
    latent_mask: torch.Tensor | None = None  # (1, 1, h, w) float32, 1 = repaint: the mask at latent size
    # Each image's generator draws, made when it reaches the engine (Engine.submit, off the loop
    # thread): (head + steps_run - 1, 4, h, w) host tensors in the model dtype (admission.draw_host);
    # an image's entry is emptied once its sample holds them on the device.
    draws: list[torch.Tensor] = field(default_factory=list)
    # Scoring and best-of-N (candidates.py): the prompt as the scorer's tokenizer reads it (made at
    # submit), and the decoded candidates held until the last of them is decoded.
    score_ids: tuple[int, ...] = ()
    held: list[Held] = field(default_factory=list)
    trace: RequestTrace | None = None  # its engine timestamps, when the edge traces it (Submit.trace)
    # Its adapters' slots and scales, resolved when it reaches the engine (Engine.submit); their slots stay
    # loaded while the engine holds the request (AdapterSlots.sweep).
    adapters: tuple[SlotWeight, ...] = ()

    def __post_init__(self) -> None:
        self.unfinished = self.params.samples  # num_images * candidates

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def add_encode_ms(self, ms: float, image: bool = False) -> None:
        """An encode of `ms` just ended (`image`: of a final image, not a preview)."""
        with self.lock:
            self.timings.encode_ms += ms
            if image and self.trace is not None:
                end = time.perf_counter()
                self.trace.encode = RequestTrace.widen(self.trace.encode, end - ms / 1e3, end)


@dataclass(frozen=True)
class Inpainting:
    """What an inpainting sample keeps (diffusers' StableDiffusionInpaintPipeline, 4-channel UNet):
    after every step, latents = (1 - mask) * init noised to the next timestep + mask * latents."""

    init: torch.Tensor  # (1, 4, h, w) float32: the init image's (scaled) latents, x0 of the kept region
    noise: torch.Tensor  # (1, 4, h, w) float32: the start noise, reused to noise `init` at every step
    mask: torch.Tensor  # (1, 1, h, w) float32, 1 = repaint, 0 = keep


@dataclass(eq=False)
class Sample:
    """One image of a request, moving through its steps."""

    request: Request
    index: int  # image index within the request
    seed: int  # request seed + index
    steps: list[Step]  # its schedule
    latents: torch.Tensor  # (1, 4, h, w) float32 on the device: x_t at the current step
    noise: torch.Tensor  # (num_steps - 1, 4, h, w) float32 on the device: each step's renoise noise
    cond: torch.Tensor  # (77, D) text embedding, model dtype
    uncond: torch.Tensor | None  # (77, D) negative-prompt embedding when guided
    step: int = 0
    # img2img / inpainting: (2, 4, h, w) float32, the VAE sample's noise then the start noise, until
    # admission.start_from_images turns them into `latents` (which is empty till then).
    image_noise: torch.Tensor | None = None
    inpaint: Inpainting | None = None  # inpainting: what every step blends the kept region back from

    @property
    def resolution(self) -> tuple[int, int]:
        return self.request.params.height, self.request.params.width

    @property
    def current(self) -> Step:
        return self.steps[self.step]
