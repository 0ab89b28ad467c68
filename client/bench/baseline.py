"""`lcmserve bench --baseline MODEL`: plain diffusers in this process, for the same request shape.

The yardstick next to the server's levels: `StableDiffusionPipeline` + `LCMScheduler` on the same
model, called with a batch of `b` requests at a time (b = 1, and the largest concurrency), PIL
images out, then encoded to the requested format as the server would (so both do the same work:
text in, encoded bytes out; no previews). Needs the `[server]` extra (torch, diffusers, Pillow); it
is imported only here, and only when asked for.

On a CPU it runs as the server's engine process does (lcmserve.server.placement): torch threads one
per CPU but the first, the process pinned to those CPUs (the first is the gRPC edge's), unless
`baseline_threads` says how many threads. With torch's default (a thread per core, next to a server
and this tool's own threads) an OpenMP team stalls at every barrier: on 2 cores, b=1 took 1457 ms
where the same pipeline on one pinned thread took 102-123 ms. The report says what was used.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from .config import BenchConfig, BenchError, RequestShape
from .report import BaselineReport, Stats

_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def run_baseline(
    config: BenchConfig, should_stop: Callable[[], bool] = lambda: False
) -> list[BaselineReport]:
    """Times diffusers on config.baseline_model at each of config.baseline_batch_sizes().

    Per batch size: one warm-up call, then config.baseline_iters timed calls (fewer when
    should_stop() turns true). Raises BenchError when torch or diffusers is missing.
    """
    if config.baseline_model is None:
        return []
    try:
        import torch

        # lcmserve.export is its own folder (export/) in the distribution: imported by name.
        loading = importlib.import_module("lcmserve.export.loading")
    except ImportError as e:
        raise BenchError(
            f"--baseline runs diffusers in this process and needs the server extra (missing {e.name}): "
            "pip install 'lcmserve[server]'"
        ) from e
    device = config.baseline_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = config.baseline_dtype or ("float16" if device.startswith("cuda") else "float32")
    pipe = loading.load_pipeline(config.baseline_model, dtype=getattr(torch, dtype_name), device=device)
    pipe.set_progress_bar_config(disable=True)
    with _as_the_engine(torch, device, config.baseline_threads) as (threads, cpus):
        return _time_batches(config, config.baseline_model, pipe, torch, device, dtype_name, threads, cpus,
                             should_stop)


@contextlib.contextmanager
def _as_the_engine(torch: Any, device: str, threads: int | None) -> Iterator[tuple[int, str]]:
    """On a CPU device: torch threads and CPU affinity as the server's engine process gets them
    (server/placement.py and the engine's start-up), restored afterwards. Yields (torch threads,
    the CPUs used as "1" or "1-15 (15)", "" when not pinned)."""
    if not device.startswith("cpu"):
        if threads:
            torch.set_num_threads(threads)
        yield torch.get_num_threads(), ""
        return
    placement = importlib.import_module("lcmserve.server.placement")
    split = placement.cpu_split(True)  # (edge cpus, engine cpus), None on 1 CPU or without affinity
    saved_threads = torch.get_num_threads()
    saved_cpus = tuple(sorted(os.sched_getaffinity(0))) if split is not None else ()
    try:
        if split is not None:
            placement.pin_process(split[1])
        torch.set_num_threads(threads or (len(split[1]) if split else max(1, (os.cpu_count() or 2) - 1)))
        yield torch.get_num_threads(), placement.describe(split[1]) if split else ""
    finally:
        torch.set_num_threads(saved_threads)
        if split is not None:
            placement.pin_process(saved_cpus)


def _time_batches(config: BenchConfig, model: str, pipe: Any, torch: Any, device: str, dtype_name: str,
                  threads: int, cpus: str, should_stop: Callable[[], bool]) -> list[BaselineReport]:
    reports: list[BaselineReport] = []
    for batch_size in config.baseline_batch_sizes():
        if should_stop():
            break
        prompts = [config.prompts[i % len(config.prompts)] for i in range(batch_size)]
        seeds = [config.seed + i * config.shape.num_images for i in range(batch_size)]
        _timed_call(pipe, torch, device, config.shape, prompts, seeds)  # warm-up: allocator, kernels
        latencies: list[float] = []
        first_steps: list[float] = []
        gaps: list[float] = []
        for _ in range(config.baseline_iters):
            if should_stop():
                break
            latency, first_step, call_gaps = _timed_call(pipe, torch, device, config.shape, prompts, seeds)
            latencies.append(latency)
            first_steps.append(first_step)
            gaps.extend(call_gaps)
        duration = sum(latencies)
        images = len(latencies) * batch_size * config.shape.num_images
        reports.append(
            BaselineReport(
                model=model,
                device=device,
                dtype=dtype_name,
                threads=threads,
                cpus=cpus,
                batch_size=batch_size,
                calls=len(latencies),
                images=images,
                duration_s=duration,
                images_per_s=images / duration if duration > 0 else float("nan"),
                latency_ms=Stats.from_samples([t * 1e3 for t in latencies]),
                first_step_ms=Stats.from_samples([t * 1e3 for t in first_steps]),
                step_gap_ms=Stats.from_samples([t * 1e3 for t in gaps]),
            )
        )
    return reports


def _timed_call(
    pipe: Any, torch: Any, device: str, shape: RequestShape, prompts: list[str], seeds: list[int]
) -> tuple[float, float, list[float]]:
    """One pipeline call for len(prompts) requests: (latency, time to the first step's end, step gaps), s."""
    cuda = device.startswith("cuda")
    step_ends: list[float] = []

    def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if cuda:
            torch.cuda.synchronize(device)  # a step ends when the GPU is done with it
        step_ends.append(time.perf_counter())
        return kwargs

    # Image j of request r uses seed_r + j with its own CPU generator, as the server does; diffusers
    # orders a batch's images request by request (num_images_per_prompt repeats each prompt in place).
    generators = [
        torch.Generator("cpu").manual_seed(seed + j) for seed in seeds for j in range(shape.num_images)
    ]
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = pipe(
        prompt=prompts,
        num_inference_steps=shape.num_inference_steps,
        guidance_scale=shape.guidance_scale,
        width=shape.width,
        height=shape.height,
        num_images_per_prompt=shape.num_images,
        generator=generators,
        output_type="pil",
        callback_on_step_end=on_step_end,
    )
    for image in output.images:
        _encode(image, shape.output_format)
    end = time.perf_counter()
    first_step = (step_ends[0] if step_ends else end) - start
    gaps = [later - earlier for earlier, later in itertools.pairwise(step_ends)]
    return end - start, first_step, gaps


def _encode(image: Any, output_format: str) -> bytes:
    """PIL image -> bytes in the requested format (quality 90, the server's default)."""
    if output_format == "raw":
        return bytes(image.convert("RGB").tobytes())
    buffer = io.BytesIO()
    pil_format = _PIL_FORMATS[output_format]
    image.save(buffer, format=pil_format, **({} if pil_format == "PNG" else {"quality": 90}))
    return buffer.getvalue()
