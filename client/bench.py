"""`lcmserve bench`: load-test any lcmserve server, and optionally plain diffusers for comparison.

Load comes in levels, one after another:
  closed loop  `--concurrency 1,8,32`: that many clients, each sends its next request as soon as
               its last one finished (what the server sustains at a given number of users);
  open loop    `--rate 1,2,4`: Poisson arrivals at that many requests/s, whatever the server does,
               optionally capped at `--max-concurrency` requests in flight (what users see under a
               given offered load).
Each level runs for `--requests N` or `--duration S` seconds, after `--warmup` requests that are
not counted; one smoke request before everything must succeed. Every request's stream is read, so
besides end-to-end latency we measure the time to the first step event and the gaps between the
step events of image 0 (the cadence a client showing previews sees).

Only the SDK (grpcio, protobuf) and tqdm are imported here; matplotlib (`--plot`) and torch +
diffusers (`--baseline`, in `lcmserve.bench_baseline`) are imported only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

from . import AsyncClient
from .bench_report import (
    BaselineReport,
    BenchError,
    BenchReport,
    LevelReport,
    RequestResult,
    Stats,
    format_table,
    write_csv,
    write_json,
    write_plot,
)
from .errors import LcmServeError
from .types import Image, OutputFormat, PreviewMode, StepEvent, Summary

__all__ = [
    "DEFAULT_PROMPTS",
    "BaselineReport",
    "BenchConfig",
    "BenchError",
    "BenchReport",
    "Level",
    "LevelReport",
    "RequestResult",
    "RequestShape",
    "Stats",
    "add_arguments",
    "config_from_args",
    "format_table",
    "run",
    "run_bench",
    "run_level",
    "write_csv",
    "write_json",
    "write_plot",
]

# Cracks in concrete walls, the motivating use: many images of one domain, prompts that vary.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a hairline crack in a grey concrete wall, close-up photo",
    "a diagonal crack running through a weathered concrete wall, daylight",
    "a wide structural crack in a reinforced concrete wall with exposed rebar",
    "a network of fine shrinkage cracks on a smooth concrete surface",
    "a vertical crack in a concrete retaining wall, moss at the edges",
    "a spalled concrete wall with a deep crack and rust stains, overcast light",
    "a crack in a painted concrete basement wall, flash photo",
    "a stair-step crack along a concrete block wall, side light",
    "a repaired crack filled with epoxy in a concrete wall, close-up",
    "a map cracking pattern on an old concrete bridge pier",
    "a thin crack branching across a wet concrete wall after rain",
    "a crack near a window corner in a cast-in-place concrete wall",
)

# Called with each counted request as it finishes (run_level's on_result).
ResultCallback = Callable[["Level", RequestResult], None]

# Our own guard beyond the gRPC deadline, in case a stream hangs past it (seconds).
_TIMEOUT_SLACK_S = 5.0


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RequestShape:
    """What every request asks for (the server's defaults, written out so the baseline can match)."""

    num_inference_steps: int = 4
    width: int = 512
    height: int = 512
    num_images: int = 1
    output_format: OutputFormat = "jpeg"  # jpeg | png | webp | raw
    guidance_scale: float = 1.0
    preview_mode: PreviewMode = "none"  # none | approx | full


@dataclass(frozen=True)
class Level:
    """One load level: closed loop with `concurrency` clients, or open loop at `rate` requests/s."""

    concurrency: int | None = None
    rate: float | None = None
    max_concurrency: int | None = None  # open loop only: most requests in flight

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError(f"a level has a concurrency or a rate, not both or neither: {self}")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        cap = f" max {self.max_concurrency}" if self.max_concurrency else ""
        return f"r={self.rate:g}/s{cap}"

    def default_requests(self) -> int:
        """Requests when neither --requests nor --duration is given: enough to fill the level."""
        if self.concurrency is not None:
            return max(32, 4 * self.concurrency)
        return max(32, math.ceil(10 * (self.rate or 0.0)))


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run needs; filled by the CLI or by hand."""

    target: str | None  # HOST:PORT of the server; None: only the baseline runs
    levels: tuple[Level, ...] = (Level(concurrency=1),)
    requests: int | None = None  # per level; None and no duration: Level.default_requests()
    duration_s: float | None = None  # per level: send new requests for this long
    warmup: int = 4  # requests before each level, not counted
    timeout_s: float = 60.0  # gRPC deadline of each request
    shape: RequestShape = field(default_factory=RequestShape)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0  # request i gets seed + i * num_images (image j of it: + j, on the server)
    slo_ms: float | None = None  # goodput counts ok requests within this end-to-end latency
    secure: bool = False
    connections: int = 1  # gRPC channels, requests spread round-robin over them
    progress: bool = True
    baseline_model: str | None = None
    baseline_batches: tuple[int, ...] = ()  # empty: 1 and the largest concurrency
    baseline_iters: int = 3  # timed pipeline calls per batch size, after one warm-up call
    baseline_device: str | None = None  # None: cuda if available, else cpu
    baseline_dtype: str | None = None  # None: float16 on cuda, float32 on cpu

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("prompts is empty")
        if self.requests is not None and self.duration_s is not None:
            raise ValueError("give requests or duration_s, not both")

    def baseline_batch_sizes(self) -> tuple[int, ...]:
        if self.baseline_batches:
            return self.baseline_batches
        widest = max((lv.concurrency or lv.max_concurrency or 1 for lv in self.levels), default=1)
        return tuple(sorted({1, widest}))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["levels"] = [{k: v for k, v in lv.items() if v is not None} for lv in data["levels"]]
        data["prompts"] = len(self.prompts)  # how many, not the text
        return data


# ---------------------------------------------------------------- sending requests


@dataclass(frozen=True)
class _Request:
    prompt: str
    seed: int


class _RequestSource:
    """Prompts in turn from the list, and a seed no other request of the run uses."""

    def __init__(self, config: BenchConfig) -> None:
        self._prompts = config.prompts
        self._seed = config.seed
        self._stride = config.shape.num_images
        self._count = itertools.count()

    def next(self) -> _Request:
        i = next(self._count)
        return _Request(self._prompts[i % len(self._prompts)], (self._seed + i * self._stride) % 2**63)


class _Budget:
    """Whether a level may send one more request: a count, or a time window (seconds)."""

    def __init__(self, requests: int | None, duration_s: float | None) -> None:
        self._left = requests
        self._duration_s = duration_s

    def take(self, elapsed_s: float) -> bool:
        if self._duration_s is not None:
            return elapsed_s < self._duration_s
        if not self._left:
            return False
        self._left -= 1
        return True


def _code_name(code: object) -> str:
    name = getattr(code, "name", None)  # a grpc.StatusCode
    return str(name if isinstance(name, str) else code or "UNKNOWN")


async def _one_request(
    client: AsyncClient, config: BenchConfig, request: _Request, t0: float
) -> RequestResult:
    """Sends one request and reads its stream; never raises (but for cancellation)."""
    shape = config.shape
    start = time.perf_counter()
    first_step: float | None = None
    last_step: float | None = None  # of image 0
    gaps: list[float] = []
    images = 0
    finished = False

    async def read_stream() -> None:
        nonlocal first_step, last_step, images, finished
        # No early exit from this loop: a timeout or Ctrl-C cancels inside the SDK's generator,
        # whose `finally` cancels the call on the server.
        async for event in client.stream(
            request.prompt,
            num_inference_steps=shape.num_inference_steps,
            guidance_scale=shape.guidance_scale,
            seed=request.seed,
            width=shape.width,
            height=shape.height,
            num_images=shape.num_images,
            output_format=shape.output_format,
            preview_mode=shape.preview_mode,
            timeout=config.timeout_s,
        ):
            now = time.perf_counter()
            if isinstance(event, StepEvent):
                if first_step is None:
                    first_step = now - start
                if event.image_index == 0:
                    if last_step is not None:
                        gaps.append(now - last_step)
                    last_step = now
            elif isinstance(event, Image):
                images += 1
            elif isinstance(event, Summary):
                finished = True

    error: str | None = None
    detail = ""
    try:
        await asyncio.wait_for(read_stream(), config.timeout_s + _TIMEOUT_SLACK_S)
        if not finished:
            error, detail = "INCOMPLETE", "the stream ended without a summary"
    except LcmServeError as e:
        error, detail = _code_name(e.code), e.details or str(e)
    except grpc.RpcError as e:  # should come wrapped in LcmServeError; just in case
        error, detail = _code_name(e.code()), str(e.details()) if hasattr(e, "details") else str(e)
    except asyncio.TimeoutError:
        error, detail = (
            "DEADLINE_EXCEEDED",
            f"no end of stream {config.timeout_s + _TIMEOUT_SLACK_S:g} s after sending",
        )
    except Exception as e:  # noqa: BLE001 (a bug on either side must not stop the level: count it)
        error, detail = type(e).__name__, str(e)
    return RequestResult(
        start_s=start - t0,
        latency_s=time.perf_counter() - start,
        first_step_s=first_step,
        step_gaps_s=tuple(gaps),
        images=images,
        error=error,
        detail=detail,
    )


async def _closed_loop(
    clients: Sequence[AsyncClient],
    config: BenchConfig,
    concurrency: int,
    budget: _Budget,
    source: _RequestSource,
    t0: float,
    record: Callable[[RequestResult], None],
) -> None:
    async def user(index: int) -> None:
        client = clients[index % len(clients)]
        while budget.take(time.perf_counter() - t0):
            record(await _one_request(client, config, source.next(), t0))

    await asyncio.gather(*(user(i) for i in range(concurrency)))


async def _open_loop(
    clients: Sequence[AsyncClient],
    config: BenchConfig,
    level: Level,
    budget: _Budget,
    source: _RequestSource,
    t0: float,
    record: Callable[[RequestResult], None],
) -> None:
    rate = level.rate or 1.0
    slots = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None
    arrivals = random.Random(config.seed)  # the same arrival times every run
    in_flight: set[asyncio.Task[None]] = set()

    async def send(client: AsyncClient, request: _Request) -> None:
        # Latency counts from the send: with --max-concurrency, waiting for a slot is not included.
        if slots is None:
            record(await _one_request(client, config, request, t0))
            return
        async with slots:
            record(await _one_request(client, config, request, t0))

    arrival_s = 0.0
    try:
        for n in itertools.count():
            if not budget.take(arrival_s):
                break
            delay = t0 + arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(clients[n % len(clients)], source.next()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            arrival_s += arrivals.expovariate(rate)
        if in_flight:
            await asyncio.gather(*in_flight)
    finally:
        for task in in_flight:
            task.cancel()


async def _drive(
    clients: Sequence[AsyncClient],
    config: BenchConfig,
    level: Level,
    budget: _Budget,
    source: _RequestSource,
    t0: float,
    record: Callable[[RequestResult], None],
    stop: asyncio.Event,
) -> bool:
    """Sends one level's requests until its budget is spent; True when `stop` cut it short."""
    if level.concurrency is not None:
        body = asyncio.ensure_future(
            _closed_loop(clients, config, level.concurrency, budget, source, t0, record)
        )
    else:
        body = asyncio.ensure_future(_open_loop(clients, config, level, budget, source, t0, record))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({body, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if body.done():
        body.result()
        return False
    body.cancel()  # in-flight requests are cancelled (the SDK cancels their calls) and not counted
    with contextlib.suppress(asyncio.CancelledError):
        await body
    return True


async def run_level(
    clients: AsyncClient | Sequence[AsyncClient],
    config: BenchConfig,
    level: Level,
    *,
    stop: asyncio.Event | None = None,
    on_result: ResultCallback | None = None,
    source: _RequestSource | None = None,
) -> LevelReport:
    """Warms up, then runs one level and summarises it.

    `stop.set()` ends it early (requests in flight are cancelled and not counted); `on_result` is
    called with each counted request as it finishes (not the warm-up's).
    """
    pool = [clients] if isinstance(clients, AsyncClient) else list(clients)
    source = source or _RequestSource(config)
    stop = stop or asyncio.Event()
    if config.warmup > 0:
        width = min(config.warmup, level.concurrency or level.max_concurrency or config.warmup)
        t0 = time.perf_counter()
        warm = _Budget(config.warmup, None)
        if await _drive(pool, config, Level(concurrency=width), warm, source, t0, lambda r: None, stop):
            return LevelReport.from_results(level, [], 0.0, config.slo_ms, interrupted=True)

    requests = config.requests
    if requests is None and config.duration_s is None:
        requests = level.default_requests()
    results: list[RequestResult] = []
    failed = 0
    bar = tqdm(total=requests, desc=level.label, unit="req", file=sys.stderr, disable=not config.progress)

    def record(result: RequestResult) -> None:
        nonlocal failed
        results.append(result)
        if on_result is not None:
            on_result(level, result)
        bar.update(1)
        if not result.ok:
            failed += 1
            bar.set_postfix(failed=failed, refresh=False)

    t0 = time.perf_counter()
    try:
        interrupted = await _drive(
            pool, config, level, _Budget(requests, config.duration_s), source, t0, record, stop
        )
    finally:
        bar.close()
    return LevelReport.from_results(level, results, time.perf_counter() - t0, config.slo_ms, interrupted)


async def _smoke(client: AsyncClient, config: BenchConfig, source: _RequestSource) -> None:
    result = await _one_request(client, config, source.next(), time.perf_counter())
    if not result.ok:
        raise BenchError(
            f"the smoke request to {config.target} failed: {result.error}: {result.detail}"
            " (is the server up, and does it accept this request shape?)"
        )


async def _server_info(client: AsyncClient) -> dict[str, Any] | None:
    try:
        info = await client.model_info()
    except Exception:  # noqa: BLE001 (an older server without it: not needed to benchmark)
        return None
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        return dataclasses.asdict(info)
    return {"description": str(info)}


async def run_bench(
    config: BenchConfig, *, stop: asyncio.Event | None = None, on_result: ResultCallback | None = None
) -> BenchReport:
    """Smoke request, then every level in turn, then the baseline (if asked). Raises BenchError.

    `stop` and `on_result` as in run_level.
    """
    stop = stop or asyncio.Event()
    report = BenchReport(config)
    if config.target is not None:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(AsyncClient(config.target, secure=config.secure))
                for _ in range(config.connections)
            ]
            source = _RequestSource(config)
            await _smoke(clients[0], config, source)
            report.server = await _server_info(clients[0])
            for level in config.levels:
                if stop.is_set():
                    break
                report.levels.append(
                    await run_level(clients, config, level, stop=stop, on_result=on_result, source=source)
                )
    if config.baseline_model is not None and not stop.is_set():
        from .bench_baseline import run_baseline

        report.baseline = await asyncio.to_thread(run_baseline, config, stop.is_set)
    report.interrupted = stop.is_set()
    return report


# ---------------------------------------------------------------- output


# ---------------------------------------------------------------- command line


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0 or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lcmserve bench`."""
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="server to load; leave out with --baseline to time only diffusers",
    )
    parser.add_argument("--secure", action="store_true", help="TLS with the system's root certificates")
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_positive_ints,
        metavar="N[,N...]",
        help="closed-loop levels: that many clients sending back to back (default 1)",
    )
    load.add_argument(
        "--rate",
        type=_positive_floats,
        metavar="R[,R...]",
        help="open-loop levels: Poisson arrivals at R requests/s",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="with --rate: at most N requests in flight (latency counts from the send)",
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="requests per level (default: 4 x concurrency, or 10 s of arrivals; at least 32)",
    )
    span.add_argument("--duration", type=float, metavar="S", help="seconds per level to send requests for")
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        metavar="N",
        help="requests before each level, not counted (default 4)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="deadline of each request (default 60)"
    )
    parser.add_argument("--connections", type=int, default=1, metavar="N", help="gRPC channels (default 1)")
    shape = parser.add_argument_group("request shape")
    shape.add_argument("--steps", type=int, default=4, metavar="N", help="num_inference_steps (default 4)")
    shape.add_argument("--width", type=int, default=512, metavar="PX", help="pixels (default 512)")
    shape.add_argument("--height", type=int, default=512, metavar="PX", help="pixels (default 512)")
    shape.add_argument(
        "--num-images", type=int, default=1, metavar="N", help="images per request (default 1)"
    )
    shape.add_argument(
        "--format", choices=("jpeg", "png", "webp", "raw"), default="jpeg", help="(default jpeg)"
    )
    shape.add_argument(
        "--guidance", type=float, default=1.0, metavar="SCALE", help="guidance_scale (default 1.0: no CFG)"
    )
    shape.add_argument(
        "--preview-mode",
        choices=("none", "approx", "full"),
        default="none",
        help="preview in each step event (default none)",
    )
    shape.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="prompts, one a line (default: a built-in list of cracked concrete walls)",
    )
    shape.add_argument(
        "--seed", type=int, default=0, metavar="N", help="base seed: request i uses seed + i x num-images"
    )
    out = parser.add_argument_group("results")
    out.add_argument("--slo-ms", type=float, metavar="MS", help="goodput: ok requests/s within MS end to end")
    out.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    out.add_argument("--csv", type=Path, metavar="PATH", help="write one CSV row per level")
    out.add_argument(
        "--plot",
        type=Path,
        metavar="PATH.png",
        help="plot latency p50/p99 against images/s (needs the [plot] extra)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    base = parser.add_argument_group("baseline (plain diffusers in this process; needs the [server] extra)")
    base.add_argument(
        "--baseline",
        metavar="MODEL",
        help="time diffusers on MODEL (hub id, folder or preset such as tiny) for the same request shape",
    )
    base.add_argument(
        "--baseline-batch",
        type=_positive_ints,
        metavar="B[,B...]",
        help="batch sizes (default: 1 and the largest concurrency)",
    )
    base.add_argument(
        "--baseline-iters",
        type=int,
        default=3,
        metavar="N",
        help="timed calls per batch size, after one warm-up call (default 3)",
    )
    base.add_argument("--baseline-device", metavar="DEVICE", help="default: cuda if available, else cpu")
    base.add_argument(
        "--baseline-dtype",
        choices=("float16", "bfloat16", "float32"),
        help="default: float16 on cuda, float32 on cpu",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Checks the options and builds the config; raises BenchError naming the option."""
    if args.target is None and args.baseline is None:
        raise BenchError("give --target HOST:PORT (a server to load), --baseline MODEL, or both")
    if args.max_concurrency is not None and (args.rate is None or args.max_concurrency < 1):
        raise BenchError(f"--max-concurrency {args.max_concurrency}: needs --rate and a value >= 1")
    for name in ("requests", "connections", "steps", "width", "height", "num_images", "baseline_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    for name in ("duration", "timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise BenchError(f"--{name} {value}: must be > 0")
    if args.warmup < 0:
        raise BenchError(f"--warmup {args.warmup}: must be >= 0")
    prompts = DEFAULT_PROMPTS
    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise BenchError(f"--prompts {args.prompts}: {e.strerror}") from e
        prompts = tuple(line.strip() for line in lines if line.strip())
        if not prompts:
            raise BenchError(f"--prompts {args.prompts}: no prompts in the file")
    if args.rate is not None:
        levels = tuple(Level(rate=r, max_concurrency=args.max_concurrency) for r in args.rate)
    else:
        levels = tuple(Level(concurrency=c) for c in (args.concurrency or [1]))
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'lcmserve[plot]'")
    if args.baseline is not None:
        missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
        if missing:
            raise BenchError(
                f"--baseline runs diffusers in this process and needs the server extra "
                f"(missing {', '.join(missing)}): pip install 'lcmserve[server]'"
            )
    return BenchConfig(
        target=args.target,
        levels=levels,
        requests=args.requests,
        duration_s=args.duration,
        warmup=args.warmup,
        timeout_s=args.timeout,
        shape=RequestShape(
            num_inference_steps=args.steps,
            width=args.width,
            height=args.height,
            num_images=args.num_images,
            output_format=cast(OutputFormat, args.format),
            guidance_scale=args.guidance,
            preview_mode=cast(PreviewMode, args.preview_mode),
        ),
        prompts=prompts,
        seed=args.seed,
        slo_ms=args.slo_ms,
        secure=args.secure,
        connections=args.connections,
        progress=not args.no_progress,
        baseline_model=args.baseline,
        baseline_batches=tuple(args.baseline_batch or ()),
        baseline_iters=args.baseline_iters,
        baseline_device=args.baseline_device,
        baseline_dtype=args.baseline_dtype,
    )


async def _run_until_interrupted(config: BenchConfig) -> BenchReport:
    """run_bench, with the first Ctrl-C ending the current level early (a second one aborts)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        print("\ninterrupted: finishing with the results so far (Ctrl-C again to abort)", file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows' event loop
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    return await run_bench(config, stop=stop)


def run(args: argparse.Namespace) -> int:
    """`lcmserve bench`: 0 when every level ran (failed requests are results), 130 when interrupted,
    2 when it could not run (bad option, smoke request failed)."""
    try:
        config = config_from_args(args)
        report = asyncio.run(_run_until_interrupted(config))
    except BenchError as e:
        print(f"lcmserve bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the second Ctrl-C
        print("lcmserve bench: aborted", file=sys.stderr)
        return 130
    print(format_table(report))
    try:
        if args.json is not None:
            write_json(report, args.json)
        if args.csv is not None:
            write_csv(report, args.csv)
        if args.plot is not None:
            write_plot(report, args.plot)
    except (BenchError, OSError) as e:
        print(f"lcmserve bench: error: {e}", file=sys.stderr)
        return 2
    for path in (args.json, args.csv, args.plot):
        if path is not None:
            print(f"wrote {path}", file=sys.stderr)
    return 130 if report.interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcmserve bench", description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
