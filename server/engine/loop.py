"""The engine: one loop per device owns the model; every image is a sample in one running batch.

Contract of the loop (`Engine._run`), one iteration:
  1. admit   : move waiting requests' images into the batch while rows are free (a guided image
               takes two rows: conditional + unconditional); drop cancelled or expired ones.
               New samples get their text embeddings (one batched call, LRU cache), and draw from
               their own CPU generator (seed + image index) their initial latents and then the
               renoise noise of every step, in that order: exactly what diffusers' pipeline and
               LCMScheduler draw for a batch of one, so the seed contract holds. img2img and
               inpainting samples (admission.py) draw as diffusers' img2img/inpaint pipelines do,
               VAE-encode their init image (batched, once per request) and start at the step their
               strength gives; inpainting samples blend their kept region back after every step.
  2. denoise : per resolution, ONE UNet call for every active sample, each at its own timestep;
               then the vectorized LCM step (server/engine/lcm.py) with coefficients gathered on the device.
  3. events  : a step event per sample (with a preview if asked: latent->RGB projection, or a
               batched VAE decode); samples at their last step go to the VAE in batches; pixels
               are encoded to JPEG/PNG/WEBP/RAW in a thread pool. Each request's events go to the
               sink in order (work.OrderedEvents).
Nothing in the hot loop waits for the GPU except the copies of decoded pixels (and latents, when
asked for) to the host, so the host queues the next step while the GPU runs this one; UNet times
come from CUDA events (timing.py). A cancelled or expired request's samples leave the batch at the
next iteration; nothing else in the batch notices: a sample's output depends only on its own
inputs and generator. The engine runs in a process of its own (engine_main.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

import grpc
import torch

from ..config import EngineConfig
from .cuda_graphs import BucketedGraphs
from .decoders import Decoders
from .encode import approx_preview, encode, select_jpeg_encoder
from .admission import draw_noise, keep_unmasked, start_from_images
from .lcm import LcmSchedule, lcm_step, renoise, scheduler_config
from ..protocol import (
    Admitted,
    Event,
    Failure,
    GraphStats,
    HostTensor,
    ImageEvent,
    MetricUpdate,
    Picture,
    Queued,
    StepEvent,
    Summary,
    UNetCall,
    VaeDecode,
)
from ..model.runtime import Runtime
from .timing import DeviceTimer
from .work import EngineStopped, QueueFull, Request, Sample

log = logging.getLogger("lcmserve.engine")


class InjectedLoopDeath(BaseException):
    """Raised by FaultInjection.loop_death_seed; a BaseException so that no handler in the loop keeps it."""


def bind_device(device: torch.device) -> bool:
    """Make `device` the current CUDA device of the calling thread (graph pools, side streams and
    captures land on the current device, whatever device the tensors are on: without this a model on
    cuda:1 captures empty graphs on cuda:0). Returns whether a device was set (False off CUDA)."""
    if device.type != "cuda":
        return False
    torch.cuda.set_device(device)
    return True


class Engine:
    """Owns the runtime on one device; runs the loop in its own thread.

    `sink(rid, event)` receives each request's events in order (from the loop thread and the
    encoder threads); `record(update)` receives metric updates; `after_iteration()`, when set, runs
    at the end of every iteration (the engine process sends that iteration's events then).
    """

    def __init__(self, runtime: Runtime, config: EngineConfig, sink: Callable[[int, Event], None],
                 record: Callable[[MetricUpdate], None] = lambda update: None) -> None:
        self.runtime = runtime
        self.config = config
        self.device = runtime.spec.device
        self.dtype = runtime.spec.dtype
        self.sink = sink
        self.record = record
        self.schedule = LcmSchedule(runtime.scheduler, config.max_steps, self.device)
        self._check_scheduler()
        self.unet: Callable[..., torch.Tensor] = runtime.unet
        # Backends that record their own graphs or sync the host (ONNX Runtime) say so in
        # spec.extra; eager, AOTInductor and torch.compile (default mode) callables are capturable.
        capturable = runtime.spec.extra.get("cuda_graph_capturable", True)
        graphs = self.device.type == "cuda" and config.cuda_graphs and capturable
        if graphs:
            self.unet = BucketedGraphs(runtime.unet, config.buckets, name="unet")
        # vae (+ tiny_vae), CUDA graphs per bucket; JPEG on the GPU when torchvision can (encode.py)
        self.decoders = Decoders(runtime, config, graphs, select_jpeg_encoder(self.device))
        self._graphs = [fn for fn in (self.unet, *self.decoders.callables) if isinstance(fn, BucketedGraphs)]
        runtime.spec.extra["jpeg_encoder"] = self.decoders.jpeg_encoder  # for GetModelInfo and the log
        log.info("decoders %s (default %s); JPEG encoder: %s", ", ".join(self.decoders.names),
                 runtime.spec.default_decoder, self.decoders.jpeg_encoder)
        self.timer = DeviceTimer(self.device)
        self._text_cache: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Sample] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(config.encode_threads, thread_name_prefix="lcmserve-encode")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None  # set if the loop itself died
        self.on_death: Callable[[BaseException], None] | None = None
        self.after_iteration: Callable[[], None] | None = None

    # ---- the receiver's side -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lcmserve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull at once when max_queued_requests requests already wait
        beyond what the batch takes in at its next admission (free rows are not a queue)."""
        with self._cond:
            if self._stopping or self.dead is not None:
                raise EngineStopped("the engine is not running")
            # Free rows at the next admission go to waiting requests in line order (head of line);
            # only those beyond count. (_active belongs to the loop thread: a snapshot one iteration
            # stale only moves the line by that iteration.)
            free = self.config.max_batch_size - sum(s.request.params.rows_per_image for s in list(self._active))
            beyond = 0
            for waiting in self._waiting:
                rows = (waiting.params.num_images - waiting.next_image) * waiting.params.rows_per_image
                if beyond or rows > free:
                    beyond += 1
                else:
                    free -= rows
            fits = not beyond and request.params.num_images * request.params.rows_per_image <= free
            if not fits and beyond >= self.config.max_queued_requests:
                raise QueueFull(f"{beyond} requests are waiting beyond the next batch (max_queued_requests="
                                f"{self.config.max_queued_requests})")
            self._waiting.append(request)
            self._cond.notify()
        self.record(Queued(1))

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
            bind_device(self.device)  # the current device is per thread
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._waiting and not self._active and not self._stopping:
                            self._cond.wait()
                        stopping = self._stopping
                        if stopping:  # the edge drained what it could; abandon the rest
                            self._abandon_all()
                        self._check_loop_fault()
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
                        if isinstance(exc, torch.OutOfMemoryError):  # this batch did not fit now: retryable
                            failure = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              f"the device ran out of memory for this batch ({exc})")
                        else:
                            failure = Failure(grpc.StatusCode.INTERNAL,
                                              f"generation failed: {type(exc).__name__}: {exc}")
                        for failed in {s.request for s in self._active}:
                            if not failed.failed:
                                self._end(failed, failure)
                        self._active = []
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()  # give back what the failed batch held
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
        faults, seeds = self.config.faults, {s.request.params.seed for s in self._active}  # test hooks (config.py)
        if faults.iteration_fault_seed in seeds:
            raise RuntimeError(f"injected iteration fault (seed {faults.iteration_fault_seed})")
        if faults.iteration_oom_seed in seeds:
            raise torch.OutOfMemoryError(f"injected CUDA out of memory (seed {faults.iteration_oom_seed})")
        # 2-3. one UNet call per resolution, then the LCM step and events
        by_resolution: dict[tuple[int, int], list[Sample]] = {}
        for sample in self._active:
            by_resolution.setdefault(sample.resolution, []).append(sample)
        for group in by_resolution.values():
            self._denoise_step(group)
        self._active = [s for s in self._active if s.step < len(s.steps) and not s.request.failed]
        self._record_unet_times(wait=False)
        for fn in self._graphs:  # CUDA graph captures, evictions and eager fallbacks, for /metrics
            self.record(GraphStats(fn.name, tuple(fn.stats().items())))

    def _record_unet_times(self, wait: bool) -> None:
        """Metrics and request timings of the UNet calls the device has finished (all, when `wait`)."""
        for seconds, rows, requests in self.timer.finished(wait):
            self.record(UNetCall(seconds, rows))
            for request in requests:
                request.timings.unet_ms += seconds * 1e3

    def _check_loop_fault(self) -> None:
        seed = self.config.faults.loop_death_seed
        if seed is not None and any(r.params.seed == seed for r in self._waiting):
            raise InjectedLoopDeath(f"injected loop death (seed {seed})")

    def _admit(self, now: float) -> None:
        # Samples of cancelled or expired requests leave the batch here, before any more work.
        self._active = [s for s in self._active if not self._gone(s.request, now)]
        rows = sum(s.request.params.rows_per_image for s in self._active)
        new: list[Sample] = []
        with self._cond:
            if any(r.cancelled for r in self._waiting):  # a cancelled request gives up its place at once
                for r in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(r)
                    self._gone(r, now)
                    self.record(Queued(-1))
            while self._waiting:
                request = self._waiting[0]
                if self._gone(request, now) or self._refused(request):
                    self._waiting.popleft()
                    self.record(Queued(-1))
                    continue
                per_image = request.params.rows_per_image
                while request.next_image < request.params.num_images and rows + per_image <= self.config.max_batch_size:
                    new.append(self._new_sample(request, request.next_image))
                    request.next_image += 1
                    rows += per_image
                if request.next_image < request.params.num_images:
                    break  # batch full; this request keeps its place at the head of the line
                self._waiting.popleft()
                self.record(Queued(-1))
        if new:
            self._encode_prompts(new)
            start_from_images(new, self.runtime.vae_encode, self.schedule, self.runtime.spec, self.config.vae_batch_size)
            self._active.extend(new)

    def _gone(self, request: Request, now: float) -> bool:
        """Cancelled or past its deadline: tell the edge (if it still listens) and forget it."""
        if request.failed:
            return True
        if request.expired(now):  # (gRPC also cancels the call at its deadline: report it as expired)
            self._end(request, Failure(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       "the request's deadline passed before it finished"))
            return True
        if request.cancelled:
            request.failed = True
            return True
        return False

    def _refused(self, request: Request) -> bool:
        """A decoder this model lacks (the edge checks it too, when it knows the model): INVALID_ARGUMENT."""
        problem = self.decoders.missing(request.params.decoder, request.params.preview_mode)
        if problem is not None and request.next_image == 0:
            self._end(request, Failure(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {' '.join(problem)}"))
        return problem is not None

    def _end(self, request: Request, failure: Failure) -> None:
        request.failed = True
        request.events.put(failure)

    def _new_sample(self, request: Request, index: int) -> Sample:
        if request.admitted_at is None:
            request.admitted_at = time.perf_counter()
            request.timings.queue_ms = (request.admitted_at - request.arrival) * 1e3
            self.record(Admitted(request.admitted_at - request.arrival))
        p = request.params
        seed = p.seed + index
        spec = self.runtime.spec
        steps = self.schedule.steps[p.num_steps][p.start_step:]  # img2img: the schedule's last steps
        # Every draw of its generator, in diffusers' order (admission.py); an init image's latents come
        # after the batched VAE encode (start_from_images).
        latents, noise, image_noise = draw_noise(p, seed, steps, spec, self.dtype, self.device)
        return Sample(request=request, index=index, seed=seed, steps=steps, latents=latents, noise=noise,
                      cond=torch.empty(0), uncond=None, image_noise=image_noise)

    def _encode_prompts(self, samples: list[Sample]) -> None:
        """Text embeddings (batched, cached) of newly admitted samples."""
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
            request.timings.text_ms += text_ms
        for s in samples:
            p = s.request.params
            s.cond = self._text_cache[p.prompt_ids]
            self._text_cache.move_to_end(p.prompt_ids)
            if p.guided:
                s.uncond = self._text_cache[p.negative_ids]

    def _denoise_step(self, group: list[Sample]) -> None:
        # Rows of the UNet call: each sample's conditional row, then the unconditional rows of guided ones.
        latents = torch.cat([s.latents for s in group])  # (B, 4, h, w) float32
        guided = [i for i, s in enumerate(group) if s.uncond is not None]
        rows = latents if not guided else torch.cat([latents, latents[guided]])
        texts = [s.cond for s in group] + [s.uncond for s in group if s.uncond is not None]
        steps = [s.current for s in group]
        table_rows = torch.tensor([st.row for st in steps] + [steps[i].row for i in guided],
                                  dtype=torch.long).to(self.device, non_blocking=True)  # (R,)
        with self.timer.measure(len(table_rows), {s.request for s in group}):
            noise_pred = self.unet(
                rows.to(self.dtype),  # (R, 4, h, w)
                self.schedule.timesteps[table_rows],  # (R,) int64
                torch.stack(texts),  # (R, 77, D)
            ).float()
        if guided:
            # As diffusers: uncond + scale * (cond - uncond), for the guided samples only.
            cond = noise_pred[guided]
            uncond = noise_pred[len(group):]
            scale = torch.tensor([group[i].request.params.guidance_scale for i in guided],
                                 dtype=torch.float32).to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            noise_pred = noise_pred[: len(group)].clone()
            noise_pred[guided] = uncond + scale * (cond - uncond)
        coefficients = self.schedule.coefficients(table_rows[: len(group)])
        denoised = lcm_step(latents, noise_pred[: len(group)], coefficients)  # (B, 4, h, w) float32

        going_on = [i for i, st in enumerate(steps) if not st.is_last]
        if going_on:
            noise = torch.cat([group[i].noise[group[i].step: group[i].step + 1] for i in going_on])
            c = self.schedule.coefficients(table_rows[going_on])
            renoised = renoise(denoised[going_on], noise, c)
            renoised = keep_unmasked([group[i] for i in going_on], renoised, c)  # inpainting's kept region
            for j, i in enumerate(going_on):
                group[i].latents = renoised[j: j + 1]

        denoised = keep_unmasked(group, denoised, None)  # shown and final: the kept region is the init image's
        self._step_events(group, denoised)
        finished = [i for i, st in enumerate(steps) if st.is_last]
        for s in group:
            s.step += 1
        if finished:
            self._finish([group[i] for i in finished], denoised[finished])

    def _step_events(self, group: list[Sample], denoised: torch.Tensor) -> None:
        approx = [i for i, s in enumerate(group) if s.request.params.preview_mode == "approx"]
        pixels: dict[int, torch.Tensor | Picture] = {}
        if approx:
            pixels.update(zip(approx, approx_preview(denoised[approx])))
        for mode, decoder in (("full", "vae"), ("tiny_vae", "tiny_vae")):  # full-size previews, per decoder
            rows = [i for i, s in enumerate(group) if s.request.params.preview_mode == mode]
            if rows:
                pixels.update(zip(rows, self._decode(denoised[rows], [group[i].request for i in rows], decoder)))
        want_latents = [i for i, s in enumerate(group) if s.request.params.include_latents]
        host_latents = dict(zip(want_latents, _host_tensors(denoised[want_latents]))) if want_latents else {}
        for i, s in enumerate(group):
            event = StepEvent(image_index=s.index, step=s.step, num_steps=len(s.steps), timestep=s.current.timestep,
                              preview=None, latents=host_latents.get(i))
            if i in pixels:
                s.request.events.put(self._pool.submit(_encode_step, s.request, pixels[i], event))
            else:
                s.request.events.put(event)

    def _finish(self, samples: list[Sample], denoised: torch.Tensor) -> None:
        images: list[torch.Tensor | Picture] = [torch.empty(0)] * len(samples)  # (H, W, 3) uint8 or a GPU JPEG
        by_decoder: dict[str, list[int]] = {}
        for j, s in enumerate(samples):
            by_decoder.setdefault(self.decoders.resolve(s.request.params.decoder), []).append(j)
        for decoder, rows in by_decoder.items():  # one batched decode per (resolution, decoder)
            for j, pixels in zip(rows, self._decode(denoised[rows], [samples[k].request for k in rows], decoder)):
                images[j] = pixels
        latents = _host_tensors(denoised) if any(s.request.params.include_latents for s in samples) else None
        for j, s in enumerate(samples):
            request = s.request
            lat = latents[j] if latents is not None and request.params.include_latents else None
            request.events.put(self._pool.submit(_encode_image, request, images[j], s.index, s.seed, lat))
            request.unfinished -= 1
            if request.unfinished == 0:
                p = request.params
                self._record_unet_times(wait=True)  # its UNet times, complete
                request.events.put(Summary(seed=p.seed, num_images=p.num_images, prompt_truncated=p.prompt_truncated,
                                           prompt_tokens=p.prompt_tokens, timings=request.timings,
                                           num_steps=p.steps_run))

    def _decode(self, denoised: torch.Tensor, requests: list[Request], decoder: str) -> list[torch.Tensor | Picture]:
        """Denoised latents (B, 4, h, w), one request per row -> per row (H, W, 3) uint8 on the host, or
        its JPEG already encoded on the GPU, with `decoder` (vae | tiny_vae), in batches (decoders.py;
        this waits for the GPU). GPU JPEG time counts in vae_ms."""
        start = time.perf_counter()
        jpeg = [r.params.quality if r.params.output_format == "jpeg" else None for r in requests]
        pixels = self.decoders(decoder, denoised, self.dtype, jpeg)
        elapsed = time.perf_counter() - start
        self.record(VaeDecode(elapsed))
        for request in set(requests):
            request.timings.vae_ms += elapsed * 1e3
        return pixels

    def _abandon_all(self) -> None:
        """Called with the lock held when stopping: every request still here fails UNAVAILABLE."""
        requests = list(dict.fromkeys([s.request for s in self._active] + list(self._waiting)))
        self._active = []
        self._waiting.clear()
        for request in requests:
            if not request.failed:
                request.failed = True
                request.events.put(Failure(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))

    # ---- start-up ----------------------------------------------------------------------------

    def capture_graphs(self, height: int, width: int) -> int:
        """Before start(): capture the CUDA graphs of every bucket for one resolution, so that no
        request pays a capture (about a second each) mid-traffic. Returns how many; 0 off CUDA."""
        if not isinstance(self.unet, BucketedGraphs):
            return 0
        spec = self.runtime.spec
        h, w = height // spec.vae_scale_factor, width // spec.vae_scale_factor
        count = 0
        with torch.inference_mode():
            for bucket in [b for b in self.unet.buckets if b <= self.config.max_batch_size]:
                self.unet(torch.randn(bucket, spec.latent_channels, h, w, device=self.device, dtype=self.dtype),
                          torch.full((bucket,), 999, dtype=torch.long, device=self.device),
                          torch.zeros(bucket, spec.text_max_length, spec.text_hidden_size, device=self.device,
                                      dtype=self.dtype))
                count += 1
            count += self.decoders.capture((spec.latent_channels, h, w), self.device, self.dtype)
        torch.cuda.synchronize()
        return count

    def _check_scheduler(self) -> None:
        config = scheduler_config(self.runtime.scheduler)
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"prediction_type {config['prediction_type']!r} is not supported (SD v1.5 is 'epsilon')")
        if config.get("thresholding") or config.get("clip_sample"):
            raise ValueError("LCM with thresholding or clip_sample is not supported (SD v1.5 + LCM uses neither)")


def _host_tensors(latents: torch.Tensor) -> list[HostTensor]:
    """(B, ...) on the device -> B float32 host tensors (one copy off the device for the batch)."""
    host = latents.float().contiguous().cpu()
    return [HostTensor(tuple(row.shape), row.numpy().astype("<f4").tobytes()) for row in host]


def _encode_step(request: Request, pixels: torch.Tensor | Picture, event: StepEvent) -> StepEvent:
    p = request.params
    picture, ms = (pixels, 0.0) if isinstance(pixels, Picture) else encode(pixels.numpy(), p.output_format, p.quality)
    request.add_encode_ms(ms)
    return StepEvent(event.image_index, event.step, event.num_steps, event.timestep, picture, event.latents)


def _encode_image(request: Request, pixels: torch.Tensor | Picture, index: int, seed: int,
                  latents: HostTensor | None) -> ImageEvent:
    p = request.params
    picture, ms = (pixels, 0.0) if isinstance(pixels, Picture) else encode(pixels.numpy(), p.output_format, p.quality)
    request.add_encode_ms(ms)
    return ImageEvent(index, seed, picture, latents)
