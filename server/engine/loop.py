"""The engine: one loop per device owns the model; every image is a sample in one running batch.

Contract of the loop (`Engine._run`), one iteration (`Engine.iteration`):
  1. admit   : move waiting requests' images into the batch while rows are free (a guided image
               takes two rows: conditional + unconditional), in line order: a request that does not
               fit keeps its place at the head of the line; drop cancelled or expired ones.
               New samples get their text embeddings (one batched call, LRU cache: text.py) and
               their generator's draws, made when the request arrived (Engine.submit, on the
               receiver thread: admission.py), copied to the device. img2img and inpainting samples
               VAE-encode their init image (batched, once per request) and start at the step their
               strength gives.
  2. denoise : per resolution, ONE UNet call for every active sample, each at its own timestep,
               guidance, the LCM step, renoise and inpainting's blend: step.denoise (step.py), the
               function to read to understand denoising.
  3. events  : a step event per sample (with a preview if asked: latent->RGB projection, or a
               batched decode); samples at their last step go to their decoder in batches; pixels
               are encoded to JPEG/PNG/WEBP/RAW in a thread pool. Each request's events go to the
               sink in order (work.OrderedEvents).

Where the loop waits for the GPU, and nowhere else: the copies to the host of decoded pixels (final
images, full and tiny-VAE previews, or their GPU JPEG bytes: decoders.py), of approx previews
(encode.approx_preview) and of latents when a request asks for them (encode.host_tensors); the UNet timing
of a finished request (timing.py, after its decode has waited anyway); a CUDA graph capture of a new
size (cuda_graphs.py); and after a failed batch (empty_cache). Row positions reach the device as
index tensors from pinned memory, never as Python lists (rows.py), so the host queues the next step
while the GPU runs this one; UNet times come from CUDA events.

A cancelled or expired request's samples leave the batch at the next iteration; nothing else in the
batch notices: a sample's output depends only on its own inputs and generator. An exception inside
an iteration fails that batch's requests (out of memory: RESOURCE_EXHAUSTED, else INTERNAL) and the
loop goes on; a sticky device error (torch.AcceleratorError, "CUDA error: ...": every later call
would fail too) ends the loop, as any exception that escapes it does: `dead` is set and `on_death`
called (the engine process then reports LoopDied and exits: main.py). The engine runs in a process
of its own (main.py); tests may run it in-process (tests/engine_fixture.py).
"""

from __future__ import annotations

import concurrent.futures
import collections
import logging
import threading
import time
from collections.abc import Callable

import grpc
import torch

from ..config import EngineConfig
from .cuda_graphs import BucketedGraphs, graph_states, graphs_off
from .decoders import Decoders
from .encode import approx_preview, encode_image_event, encode_step_event, host_tensors, select_jpeg_encoder
from .admission import draw_host, draws_to_device, start_from_images
from .lcm import LcmSchedule, check_scheduler
from ..protocol import (
    AdapterRecord,
    Admitted,
    Event,
    Failure,
    BackendState,
    GraphStats,
    MetricUpdate,
    Picture,
    Queued,
    StepEvent,
    Summary,
    UNetTiming,
    VaeDecode,
)
from ..model.runtime import Runtime
from .device import bind_device as bind_device  # (re-exported: main.py imports it from here)
from .device import is_sticky_device_error
from .rows import pick
from .step import denoise
from .text import PromptEmbeddings
from . import candidates
from .timing import DeviceTimer
from .tracing import trace_decode, trace_step, trace_text
from .work import EngineStopped, QueueFull, Request, Sample
from .adapter_rows import adapter_slots, enable_adapters, resolve_adapters

log = logging.getLogger("lcmserve.engine")


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
        check_scheduler(runtime.scheduler)
        self.schedule = LcmSchedule(runtime.scheduler, config.max_steps, self.device)
        # Per-request adapters (issue 21): slots in the model's layers, before any graph is captured.
        self.adapters = enable_adapters(runtime, config.adapters)
        self._sweep_due = False  # an adapter was unloaded: free its slot once no request holds it
        self.unet: Callable[..., torch.Tensor] = runtime.unet
        # Backends that record their own graphs or sync the host (ONNX Runtime) say so in the spec;
        # eager, AOTInductor and torch.compile (default mode) callables are capturable.
        graphs = self.device.type == "cuda" and config.cuda_graphs and runtime.spec.graph_capturable
        if graphs:
            # with adapters a resolution's calls come in more shapes: no extras, and K = 1, 2, 4... (adapter_rows.py)
            most = config.adapters.max_adapters_per_request
            shapes = 1 + ((most - 1).bit_length() + 1 if self.adapters is not None else 0)
            self.unet = BucketedGraphs(runtime.unet, config.buckets, name="unet", max_resolutions=4 * shapes)
            if self.adapters is not None:  # a graph keeps the layers it recorded: every slot layer computes
                self.adapters.keep_all_live()
        # vae (+ tiny_vae), CUDA graphs per bucket; JPEG on the GPU when torchvision can (encode.py)
        self.decoders = Decoders(runtime, config, graphs, select_jpeg_encoder(self.device))
        self.scorer = runtime.scorer  # CLIPScore of every final image, best-of-N (candidates.py); None without one
        self._graphs = [fn for fn in (self.unet, *self.decoders.callables) if isinstance(fn, BucketedGraphs)]
        self.jpeg_encoder = self.decoders.jpeg_encoder  # "gpu" | "host": a fact of this engine (GetModelInfo)
        log.info("decoders %s (default %s); JPEG encoder: %s", ", ".join(self.decoders.names),
                 runtime.spec.default_decoder, self.decoders.jpeg_encoder)
        self.timer = DeviceTimer(self.device)
        self.texts = PromptEmbeddings(runtime.encode_text, self.device, self.dtype, config.text_cache_size)
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Sample] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(config.encode_threads, thread_name_prefix="lcmserve-encode")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None  # set if the loop itself died
        self.on_death: Callable[[BaseException], None] | None = None
        self.after_iteration: Callable[[], None] | None = None
        self._backend_state = self.backend_state()

    # ---- the receiver's side -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lcmserve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull at once when max_queued_requests requests already wait
        beyond what the batch takes in at its next admission (free rows are not a queue). Draws
        every image's random numbers here, in the caller's thread (the receiver's), not the loop's."""
        with self._cond:
            self._check_room(request)
        p = request.params
        request.draws = [draw_host(p, p.seed + i, self.runtime.spec, self.dtype) for i in range(p.samples)]
        candidates.prepare(self.scorer, request)  # the prompt for the scorer's tokenizer
        with self._cond:
            if self._stopping or self.dead is not None:
                raise EngineStopped("the engine is not running")
            if p.adapters:  # AdapterError: unknown names, a backend without adapters (INVALID_ARGUMENT)
                request.adapters = resolve_adapters(self.adapters, p.adapters, self.runtime.spec.backend)
            self._waiting.append(request)
            self._cond.notify()
        self.record(Queued(1))

    def _check_room(self, request: Request) -> None:
        if self._stopping or self.dead is not None:
            raise EngineStopped("the engine is not running")
        # Free rows at the next admission go to waiting requests in line order (head of line); only
        # those beyond count. (_active belongs to the loop thread: a snapshot one iteration stale
        # only moves the line by that iteration.)
        free = self.config.max_batch_size - sum(s.request.params.rows_per_image for s in list(self._active))
        beyond = 0
        for waiting in self._waiting:
            rows = (waiting.params.samples - waiting.next_image) * waiting.params.rows_per_image
            if beyond or rows > free:
                beyond += 1
            else:
                free -= rows
        fits = not beyond and request.params.samples * request.params.rows_per_image <= free
        if not fits and beyond >= self.config.max_queued_requests:
            raise QueueFull(f"{beyond} requests are waiting beyond the next batch (max_queued_requests="
                            f"{self.config.max_queued_requests})")

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
                while self._wait_for_work():
                    self.iteration()
                    if self.after_iteration:
                        self.after_iteration()
                if self.after_iteration:  # the failures of what was abandoned
                    self.after_iteration()
        except BaseException as exc:
            self.dead = exc
            log.critical("engine loop died: %r", exc)
            if self.on_death:
                self.on_death(exc)
            raise

    def _wait_for_work(self) -> bool:
        """Block until a request waits or samples are active; False when stopping (what is still
        here has failed UNAVAILABLE: the edge drained what it could)."""
        with self._cond:
            while not self._waiting and not self._active and not self._stopping and not self._sweep_due:
                self._cond.wait()
            if self._stopping:
                self._abandon_all()
                return False
        if not self._active and self.config.batch_wait_ms > 0:
            time.sleep(self.config.batch_wait_ms / 1e3)  # let company arrive for an idle batch
        return True

    def iteration(self) -> None:
        """One iteration (the loop thread runs these; an in-process test may call it itself instead
        of start()). A failed batch fails its requests; a sticky device error is raised."""
        try:
            self._iteration()
        except Exception as exc:
            if is_sticky_device_error(exc):
                raise  # the device is unusable: the loop dies of it, the process exits (main.py)
            log.exception("engine iteration failed")
            if isinstance(exc, torch.OutOfMemoryError):  # this batch did not fit now: retryable
                failure = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"the device ran out of memory for this batch ({exc})")
            else:
                failure = Failure(grpc.StatusCode.INTERNAL, f"generation failed: {type(exc).__name__}: {exc}")
            for failed in {s.request for s in self._active}:
                if not failed.failed:
                    self._end(failed, failure)
            self._active = []
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give back what the failed batch held

    def _iteration(self) -> None:
        # 1. admit
        self._admit(time.monotonic())
        # 2-3. one step per resolution (step.py), then its events
        by_resolution: dict[tuple[int, int], list[Sample]] = {}
        for sample in self._active:
            by_resolution.setdefault(sample.resolution, []).append(sample)
        for group in by_resolution.values():
            start = time.perf_counter()
            denoised = denoise(group, self.unet, self.schedule, self.dtype, self.timer)  # (B, 4, h, w)
            trace_step(group, start, time.perf_counter())
            self._step_events(group, denoised)
            finished = [i for i, s in enumerate(group) if s.current.is_last]
            for s in group:
                s.step += 1
            if finished:
                self._finish([group[i] for i in finished], pick(denoised, finished))
        self._active = [s for s in self._active if s.step < len(s.steps) and not s.request.failed]
        if self._sweep_due:
            self._sweep_adapters()
        self._record_unet_times(wait=False)
        for fn in self._graphs:  # CUDA graph captures, evictions and eager fallbacks, for /metrics
            self.record(GraphStats(fn.name, tuple(fn.stats().items())))
        state = self.backend_state()
        if state != self._backend_state:  # graphs switched off, a compiled part ran a shape eagerly
            self._backend_state = state
            self.record(state)

    def backend_state(self) -> BackendState:
        """Each callable's CUDA-graph state and each compiled part's eager-fallback count (GetModelInfo)."""
        off = graphs_off(self.device, self.config.cuda_graphs, self.runtime.spec.graph_capturable)
        callables = {"unet": self.unet, **dict(zip(self.decoders.names, self.decoders.callables, strict=True))}
        return BackendState(tuple((s.name, str(s)) for s in graph_states(callables, off)),
                            tuple(sorted(self.runtime.fallbacks().items())))

    def _record_unet_times(self, wait: bool) -> None:
        """Metrics and request timings of the UNet calls the device has finished (all, when `wait`)."""
        for seconds, rows, requests in self.timer.finished(wait):
            self.record(UNetTiming(seconds, rows))
            for request in requests:
                request.timings.unet_ms += seconds * 1e3

    # ---- adapters (the receiver thread loads and unloads; the loop frees unloaded slots) -----------

    def load_adapter(self, name: str, source: str, scale: float) -> AdapterRecord:
        """Into a free slot, now (the slot is referenced by no request: the batch is unaffected)."""
        return adapter_slots(self.adapters, self.runtime.spec.backend).load(name, source, scale)

    def unload_adapter(self, name: str) -> None:
        """New requests naming it are refused from now on; its slot is freed once no request holds it."""
        slots = adapter_slots(self.adapters, self.runtime.spec.backend)
        with self._cond:
            slots.unload(name)
            self._sweep_due = True
            self._cond.notify()

    def _sweep_adapters(self) -> None:
        with self._cond:
            self._sweep_due = False
            held = [r for r in self._waiting if not r.failed] + [s.request for s in self._active]
            if self.adapters is not None:
                self.adapters.sweep(a.slot for r in held for a in r.adapters)
                self._sweep_due = self.adapters.unloading()

    # ---- admission ---------------------------------------------------------------------------

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
                while request.next_image < request.params.samples and rows + per_image <= self.config.max_batch_size:
                    new.append(self._new_sample(request, request.next_image))
                    request.next_image += 1
                    rows += per_image
                if request.next_image < request.params.samples:
                    break  # batch full; this request keeps its place at the head of the line
                self._waiting.popleft()
                self.record(Queued(-1))
        if new:
            start = time.perf_counter()
            self.texts.embed(new)
            trace_text(new, start, time.perf_counter())
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
        steps = self.schedule.steps[p.num_steps][p.start_step:]  # img2img: the schedule's last steps
        # Every draw of its generator, made at submit in diffusers' order (admission.py); an init
        # image's latents come after the batched VAE encode (start_from_images).
        latents, noise, image_noise = draws_to_device(p, request.draws[index], self.device)
        request.draws[index] = torch.empty(0)  # the host copy is not needed any more
        return Sample(request=request, index=index, seed=p.seed + index, steps=steps, latents=latents, noise=noise,
                      cond=torch.empty(0), uncond=None, image_noise=image_noise)

    # ---- events ------------------------------------------------------------------------------

    def _step_events(self, group: list[Sample], denoised: torch.Tensor) -> None:
        approx = [i for i, s in enumerate(group) if s.request.params.preview_mode == "approx"]
        pixels: dict[int, torch.Tensor | Picture] = {}
        if approx:
            pixels.update(zip(approx, approx_preview(pick(denoised, approx))))
        for mode, decoder in (("full", "vae"), ("tiny_vae", "tiny_vae")):  # full-size previews, per decoder
            rows = [i for i, s in enumerate(group) if s.request.params.preview_mode == mode]
            if rows:
                pixels.update(zip(rows, self._decode(pick(denoised, rows), [group[i].request for i in rows], decoder)))
        want_latents = [i for i, s in enumerate(group) if s.request.params.include_latents]
        host_latents = dict(zip(want_latents, host_tensors(pick(denoised, want_latents)))) if want_latents else {}
        for i, s in enumerate(group):
            event = StepEvent(image_index=s.index, step=s.step, num_steps=len(s.steps), timestep=s.current.timestep,
                              preview=None, latents=host_latents.get(i),
                              candidate=s.index if s.request.params.candidates > 1 else 0)
            if i in pixels:
                s.request.events.put(self._pool.submit(encode_step_event, s.request, pixels[i], event))
            else:
                s.request.events.put(event)

    def _finish(self, samples: list[Sample], denoised: torch.Tensor) -> None:
        images: list[torch.Tensor | Picture] = [torch.empty(0)] * len(samples)  # (H, W, 3) uint8 or a GPU JPEG
        by_decoder: dict[str, list[int]] = {}
        for j, s in enumerate(samples):
            by_decoder.setdefault(self.decoders.resolve(s.request.params.decoder), []).append(j)
        scores = candidates.ScoreBatch(self.scorer, samples) if self.scorer is not None else None  # candidates.py
        start = time.perf_counter()
        for decoder, rows in by_decoder.items():  # one batched decode per (resolution, decoder)
            on_pixels = scores.collect(rows) if scores is not None else None
            decoded = self._decode(pick(denoised, rows), [samples[k].request for k in rows], decoder, on_pixels)
            for j, pixels in zip(rows, decoded):
                images[j] = pixels
        trace_decode(samples, start, time.perf_counter())
        values = scores.values() if scores is not None else [None] * len(samples)
        latents = host_tensors(denoised) if any(s.request.params.include_latents for s in samples) else None
        for j, s in enumerate(samples):
            request = s.request
            lat = latents[j] if latents is not None and request.params.include_latents else None
            if request.params.candidates > 1:  # best-of-N: held until its last candidate is decoded
                candidates.hold(request, s, images[j], lat, values[j])
            else:
                request.events.put(self._pool.submit(encode_image_event, request, images[j], s.index, s.seed, lat,
                                                     values[j]))
            request.unfinished -= 1
            if request.unfinished == 0:
                p = request.params
                ranked = candidates.release(request, self._pool) if p.candidates > 1 else ()
                self._record_unet_times(wait=True)  # its UNet times, complete
                request.events.put(Summary(seed=p.seed, num_images=p.num_images, prompt_truncated=p.prompt_truncated,
                                           prompt_tokens=p.prompt_tokens, timings=request.timings,
                                           num_steps=p.steps_run, trace=request.trace, candidates=ranked))

    def _decode(self, denoised: torch.Tensor, requests: list[Request], decoder: str,
                on_pixels: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor | Picture]:
        """Denoised latents (B, 4, h, w), one request per row -> per row (H, W, 3) uint8 on the host, or
        its JPEG already encoded on the GPU, with `decoder` (vae | tiny_vae), in batches (decoders.py;
        this waits for the GPU). GPU JPEG time, and scoring (`on_pixels`), count in vae_ms."""
        start = time.perf_counter()
        jpeg = [r.params.quality if r.params.output_format == "jpeg" else None for r in requests]
        pixels = self.decoders(decoder, denoised, self.dtype, jpeg, on_pixels)
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
                for k in (0, 1) if self.adapters is not None else (0,):  # without adapters; one per row
                    self.unet(self.runtime.example_unet_call(bucket, h, w, adapters=k))
                    count += 1
            count += self.decoders.capture((spec.latent_channels, h, w), self.device, self.dtype)
        torch.cuda.synchronize()
        return count
