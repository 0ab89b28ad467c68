"""The engine: one loop per device owns the model; every image is a sample in one running batch.

Contract of the loop (`Engine._run`), one iteration:
  1. admit   : move waiting requests' images into the batch while rows are free (a guided image
               takes two rows: conditional + unconditional); drop cancelled or expired ones.
               New samples get their text embeddings (one batched call, LRU cache) and their
               initial latents from their own CPU generator (seed + image index).
  2. denoise : per resolution, ONE UNet call for every active sample, each at its own timestep;
               then the vectorized LCM step (server/lcm.py) and each sample's renoise noise from
               its own generator, consumed exactly as diffusers does for a batch of one.
  3. events  : a step event per sample (with a preview if asked: latent->RGB projection, or a
               batched VAE decode); samples at their last step go to the VAE in batches; pixels
               are encoded to JPEG/PNG/WEBP/RAW in a thread pool.
The engine runs in a process of its own (server/engine_process.py): gRPC handlers, in the edge
process, only validate, `submit()` through a pipe and read their request's events in order. A cancelled or
expired request's samples leave the batch at the next iteration; nothing else in the batch
notices: a sample's output depends only on its own inputs and generator.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .encode import approx_preview, encode, to_uint8
from .lcm import LcmSchedule, lcm_step, renoise
from .runtime import Runtime
from .work import (
    EngineStopped,
    Failure,
    GenerationParams,
    ImageOut,
    QueueFull,
    Request,
    Sample,
    StepOut,
    SummaryOut,
)

log = logging.getLogger("lcmserve.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # most rows in one UNet call (a guided image takes two)
    max_queued_requests: int = 256  # waiting requests before submit() refuses (RESOURCE_EXHAUSTED)
    batch_wait_ms: float = 0.0  # wait this long for company before starting an idle batch; 0: never delay
    vae_batch_size: int = 8  # most images in one VAE decode
    text_cache_size: int = 1024  # prompt embeddings kept (LRU)
    encode_threads: int = 4  # host image encoders
    max_steps: int = 8
    cuda_graphs: bool = True  # capture/replay UNet and VAE per (bucket, resolution) on CUDA
    buckets: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # padded batch sizes on CUDA
    pin_cpus: bool = True  # on a CPU device: the engine process on its own cores (engine_process.py)


class Engine:
    """Owns the runtime on one device; runs the loop in its own thread."""

    def __init__(self, runtime: Runtime, config: EngineConfig = EngineConfig(), metrics: Any = None) -> None:
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        self.device = runtime.spec.device
        self.dtype = runtime.spec.dtype
        self.schedule = LcmSchedule(runtime.scheduler, config.max_steps)
        self._check_scheduler()
        self.unet: Callable[..., torch.Tensor] = runtime.unet
        self.vae_decode: Callable[[torch.Tensor], torch.Tensor] = runtime.vae_decode
        # Backends that record their own graphs (torch.compile reduce-overhead) or sync the host
        # (ONNX Runtime) say so in spec.extra; eager and AOTInductor callables are capturable.
        capturable = runtime.spec.extra.get("cuda_graph_capturable", True)
        if self.device.type == "cuda" and config.cuda_graphs and capturable:
            from .cuda_graphs import BucketedGraphs

            self.unet = BucketedGraphs(runtime.unet, config.buckets, name="unet")
            self.vae_decode = BucketedGraphs(runtime.vae_decode, tuple(b for b in config.buckets
                                                                       if b <= config.vae_batch_size), name="vae")
        self._text_cache: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Sample] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(config.encode_threads, thread_name_prefix="lcmserve-encode")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None  # set if the loop itself died
        self.on_death: Callable[[BaseException], None] | None = None
        self.after_iteration: Callable[[], None] | None = None  # e.g. send this iteration's events at once

    # ---- the edge's side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lcmserve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull at once when max_queued_requests are waiting."""
        with self._cond:
            if self._stopping or self.dead is not None:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) >= self.config.max_queued_requests:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queued_requests="
                                f"{self.config.max_queued_requests})")
            self._waiting.append(request)
            self._cond.notify()
        if self.metrics:
            self.metrics.queued(1)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    @property
    def busy(self) -> bool:
        return bool(self._active or self._waiting)

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True)

    # ---- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._waiting and not self._active and not self._stopping:
                            self._cond.wait()
                        stopping = self._stopping
                        if stopping:  # the edge drained what it could; abandon the rest
                            self._abandon_all()
                    if stopping:
                        if self.after_iteration:
                            self.after_iteration()
                        return
                    if not self._active and self.config.batch_wait_ms > 0:
                        time.sleep(self.config.batch_wait_ms / 1e3)  # let company arrive for an idle batch
                    try:
                        self._iteration()
                    except Exception as exc:  # a bad batch fails its requests, not the server
                        log.exception("engine iteration failed")
                        self._fail_active(f"{type(exc).__name__}: {exc}")
                    if self.after_iteration:
                        self.after_iteration()
        except BaseException as exc:
            self.dead = exc
            log.critical("engine loop died: %r", exc)
            if self.on_death:
                self.on_death(exc)
            raise

    def _iteration(self) -> None:
        # 1. admit
        self._admit(time.monotonic())
        if not self._active:
            return
        # 2-3. one UNet call per resolution, then the LCM step and events
        by_resolution: dict[tuple[int, int], list[Sample]] = {}
        for sample in self._active:
            by_resolution.setdefault(sample.resolution, []).append(sample)
        for group in by_resolution.values():
            self._denoise_step(group)
        self._active = [s for s in self._active if s.step < len(s.consts) and not s.request.failed]

    def _admit(self, now: float) -> None:
        # Samples of cancelled or expired requests leave the batch here, before any more work.
        kept = []
        for sample in self._active:
            if self._gone(sample.request, now):
                continue
            kept.append(sample)
        self._active = kept
        rows = sum(s.request.rows_per_image for s in self._active)
        new: list[Sample] = []
        with self._cond:
            if any(r.cancelled for r in self._waiting):  # a cancelled request gives up its place at once
                for r in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(r)
                    self._gone(r, now)
                    if self.metrics:
                        self.metrics.queued(-1)
            while self._waiting:
                request = self._waiting[0]
                if self._gone(request, now):
                    self._waiting.popleft()
                    if self.metrics:
                        self.metrics.queued(-1)
                    continue
                per_image = request.rows_per_image
                while request.next_image < request.params.num_images and rows + per_image <= self.config.max_batch_size:
                    new.append(self._new_sample(request, request.next_image))
                    request.next_image += 1
                    rows += per_image
                if request.next_image < request.params.num_images:
                    break  # batch full; this request keeps its place at the head of the line
                self._waiting.popleft()
                if self.metrics:
                    self.metrics.queued(-1)
        if new:
            self._prepare(new)
            self._active.extend(new)

    def _gone(self, request: Request, now: float) -> bool:
        """Cancelled or past its deadline: tell the edge (if it still listens) and forget it."""
        if request.failed:
            return True
        if request.expired(now):  # (gRPC also cancels the call at its deadline: report it as expired)
            request.failed = True
            request.sink(Failure("DEADLINE_EXCEEDED", "the request's deadline passed before it finished"))
            if self.metrics:
                self.metrics.request_done("DEADLINE_EXCEEDED")
            return True
        if request.cancelled:
            request.failed = True
            if self.metrics:
                self.metrics.request_done("CANCELLED")
            return True
        return False

    def _new_sample(self, request: Request, index: int) -> Sample:
        if request.admitted_at is None:
            request.admitted_at = time.perf_counter()
            request.timings["queue_ms"] = (request.admitted_at - request.arrival) * 1e3
            if self.metrics:
                self.metrics.admitted(request.admitted_at - request.arrival)
        p = request.params
        seed = p.seed + index
        generator = torch.Generator("cpu").manual_seed(seed)
        return Sample(request=request, index=index, seed=seed, generator=generator,
                      consts=self.schedule.steps[p.num_steps], latents=torch.empty(0),
                      cond=torch.empty(0), uncond=None)

    def _prepare(self, samples: list[Sample]) -> None:
        """Text embeddings (batched, cached) and initial latents of newly admitted samples."""
        start = time.perf_counter()
        wanted: list[tuple[int, ...]] = []
        for s in samples:
            wanted.append(s.request.params.prompt_ids)
            if s.request.params.guided:
                wanted.append(s.request.params.negative_ids)
        missing = list(dict.fromkeys(ids for ids in wanted if ids not in self._text_cache))
        if missing:
            ids = torch.tensor(missing, dtype=torch.long, device=self.device)  # (N, 77)
            embeddings = self.runtime.encode_text(ids)  # (N, 77, D)
            for key, emb in zip(missing, embeddings):
                self._text_cache[key] = emb
            while len(self._text_cache) > self.config.text_cache_size:
                self._text_cache.popitem(last=False)
        text_ms = (time.perf_counter() - start) * 1e3 if missing else 0.0
        for request in {s.request for s in samples}:
            request.timings["text_ms"] += text_ms
        for s in samples:
            p = s.request.params
            s.cond = self._text_cache[p.prompt_ids]
            self._text_cache.move_to_end(p.prompt_ids)
            if p.guided:
                s.uncond = self._text_cache[p.negative_ids]
            # As diffusers' prepare_latents: randn on the generator's device (CPU) in the model dtype.
            shape = (1, self.runtime.spec.latent_channels, p.height // self.runtime.spec.vae_scale_factor,
                     p.width // self.runtime.spec.vae_scale_factor)
            s.latents = torch.randn(shape, generator=s.generator, dtype=self.dtype).to(self.device).float()

    def _denoise_step(self, group: list[Sample]) -> None:
        # Rows of the UNet call: each sample's conditional row, then the unconditional rows of guided ones.
        latents = torch.cat([s.latents for s in group])  # (B, 4, h, w) float32
        guided = [i for i, s in enumerate(group) if s.uncond is not None]
        rows = latents if not guided else torch.cat([latents, latents[guided]])
        texts = [s.cond for s in group] + [group[i].uncond for i in guided]  # type: ignore[misc]
        timesteps = [s.consts[s.step].timestep for s in group]
        timesteps += [timesteps[i] for i in guided]
        start = time.perf_counter()
        noise_pred = self.unet(
            rows.to(self.dtype),  # (R, 4, h, w)
            torch.tensor(timesteps, dtype=torch.long, device=self.device),  # (R,)
            torch.stack(texts),  # (R, 77, D)
        ).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # honest timings; the step below needs the result anyway
        unet_s = time.perf_counter() - start
        if self.metrics:
            self.metrics.unet_step(unet_s, len(timesteps))
        for request in {s.request for s in group}:
            request.timings["unet_ms"] += unet_s * 1e3
        if guided:
            # As diffusers: uncond + scale * (cond - uncond), for the guided samples only.
            cond = noise_pred[guided]
            uncond = noise_pred[len(group):]
            scale = torch.tensor([group[i].request.params.guidance_scale for i in guided],
                                 dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
            noise_pred = noise_pred[: len(group)].clone()
            noise_pred[guided] = uncond + scale * (cond - uncond)
        consts = [s.consts[s.step] for s in group]
        denoised = lcm_step(latents, noise_pred[: len(group)], consts)  # (B, 4, h, w) float32

        going_on = [i for i, c in enumerate(consts) if not c.is_last]
        if going_on:
            # Each sample's own generator, as LCMScheduler.step draws it (model dtype, CPU).
            noise = torch.cat([torch.randn(group[i].latents.shape, generator=group[i].generator, dtype=self.dtype)
                               for i in going_on]).to(self.device).float()
            renoised = renoise(denoised[going_on], noise, [consts[i] for i in going_on])
            for j, i in enumerate(going_on):
                group[i].latents = renoised[j: j + 1]

        self._step_events(group, denoised)
        finished = [i for i, c in enumerate(consts) if c.is_last]
        for s in group:
            s.step += 1
        if finished:
            self._finish([group[i] for i in finished], denoised[finished])

    def _step_events(self, group: list[Sample], denoised: torch.Tensor) -> None:
        approx = [i for i, s in enumerate(group) if s.request.params.preview_mode == "approx"]
        full = [i for i, s in enumerate(group) if s.request.params.preview_mode == "full"]
        pixels: dict[int, torch.Tensor] = {}
        if approx:
            for i, img in zip(approx, approx_preview(denoised[approx])):
                pixels[i] = img
        if full:
            for i, img in zip(full, self._decode(denoised[full], [group[i].request for i in full])):
                pixels[i] = img
        want_latents = [i for i, s in enumerate(group) if s.request.params.include_latents]
        host_latents = dict(zip(want_latents, denoised[want_latents].cpu())) if want_latents else {}
        for i, s in enumerate(group):
            p = s.request.params
            c = s.consts[s.step]
            meta = {"image_index": s.index, "step": s.step, "num_steps": p.num_steps, "timestep": c.timestep,
                        "latents": host_latents.get(i)}
            if i in pixels:
                s.request.sink(self._pool.submit(_encode_step, s.request, pixels[i], p, meta))
            else:
                s.request.sink(StepOut(preview=None, **meta))

    def _finish(self, samples: list[Sample], denoised: torch.Tensor) -> None:
        images = self._decode(denoised, [s.request for s in samples])
        latents = denoised.cpu() if any(s.request.params.include_latents for s in samples) else None
        for j, s in enumerate(samples):
            request = s.request
            request.sink(self._pool.submit(_encode_image, request, images[j], s,
                                           latents[j] if latents is not None and request.params.include_latents
                                           else None))
            request.unfinished -= 1
            if request.unfinished == 0:
                p = request.params
                request.sink(SummaryOut(seed=p.seed, num_images=p.num_images, prompt_truncated=p.prompt_truncated,
                                        prompt_tokens=p.prompt_tokens, timings=request.timings))
                if self.metrics:
                    self.metrics.request_done("OK")

    def _decode(self, denoised: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Denoised latents (B, 4, h, w) -> (B, H, W, 3) uint8 on the host, in VAE batches."""
        start = time.perf_counter()
        scaled = (denoised / self.runtime.spec.scaling_factor).to(self.dtype)  # as diffusers: latents / scaling
        chunks = [to_uint8(self.vae_decode(chunk)) for chunk in scaled.split(self.config.vae_batch_size)]
        elapsed = time.perf_counter() - start
        if self.metrics:
            self.metrics.vae(elapsed)
        for request in set(requests):
            request.timings["vae_ms"] += elapsed * 1e3
        return torch.cat(chunks)

    def _abandon_all(self) -> None:
        """Called with the lock held when stopping: every request still here fails UNAVAILABLE."""
        requests = list(dict.fromkeys([s.request for s in self._active] + list(self._waiting)))
        self._active = []
        self._waiting.clear()
        for request in requests:
            if not request.failed:
                request.failed = True
                request.sink(Failure("UNAVAILABLE", "the server is shutting down"))

    def _fail_active(self, message: str) -> None:
        requests = {s.request for s in self._active}
        self._active = []
        for request in requests:
            if not request.failed:
                request.failed = True
                request.sink(Failure("INTERNAL", f"generation failed: {message}"))
                if self.metrics:
                    self.metrics.request_done("INTERNAL")

    # ---- start-up ----------------------------------------------------------------------------

    def capture_graphs(self, height: int, width: int) -> int:
        """Before start(): capture the CUDA graphs of every bucket for one resolution, so that no
        request pays a capture (about a second each) mid-traffic. Returns how many; 0 off CUDA."""
        if not hasattr(self.unet, "buckets"):
            return 0
        spec = self.runtime.spec
        h, w = height // spec.vae_scale_factor, width // spec.vae_scale_factor
        count = 0
        with torch.inference_mode():
            for bucket in [b for b in self.unet.buckets if b <= self.config.max_batch_size]:  # type: ignore[attr-defined]
                self.unet(torch.randn(bucket, spec.latent_channels, h, w, device=self.device, dtype=self.dtype),
                          torch.full((bucket,), 999, dtype=torch.long, device=self.device),
                          torch.zeros(bucket, spec.text_max_length, spec.text_hidden_size, device=self.device,
                                      dtype=self.dtype))
                count += 1
            for bucket in self.vae_decode.buckets:  # type: ignore[attr-defined]
                self.vae_decode(torch.randn(bucket, spec.latent_channels, h, w, device=self.device, dtype=self.dtype))
                count += 1
        torch.cuda.synchronize()
        return count

    def _check_scheduler(self) -> None:
        config = self.runtime.scheduler.config
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"prediction_type {config.prediction_type!r} is not supported (SD v1.5 is 'epsilon')")
        if config.get("thresholding") or config.get("clip_sample"):
            raise ValueError("LCM with thresholding or clip_sample is not supported (SD v1.5 + LCM uses neither)")


def _encode_step(request: Request, pixels: torch.Tensor, p: GenerationParams, meta: dict[str, Any]) -> StepOut:
    picture = encode(pixels.numpy(), p.output_format, p.quality)
    with request.lock:
        request.timings["encode_ms"] += picture.encode_ms
    return StepOut(preview=picture, **meta)


def _encode_image(request: Request, pixels: torch.Tensor, sample: Sample, latents: torch.Tensor | None) -> ImageOut:
    p = request.params
    picture = encode(pixels.numpy(), p.output_format, p.quality)
    with request.lock:
        request.timings["encode_ms"] += picture.encode_ms
    return ImageOut(index=sample.index, seed=sample.seed, picture=picture, latents=latents)
