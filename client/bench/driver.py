"""The load driver of `lcmserve bench`: sends the requests of each level and times their streams.

Closed loop: `concurrency` users, each sending its next request when its last one ended. Open
loop: Poisson arrivals at `rate` requests/s (seeded: the same arrival times every run), at most
`max_concurrency` in flight. Every stream is read to its end: time to the first step event,
the gaps between image 0's step events, and end-to-end latency, per request (RequestResult).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

from .._connection import unavailable_hint
from ..aio import AsyncClient
from ..errors import LcmServeError
from ..types import Image, StepEvent, Summary
from .._convert import adapter_weights
from .config import AdapterSet, BenchConfig, BenchError, Level, adapter_set_label
from .http import HttpClient, is_http_target
from .report import BenchReport, LevelReport, RequestResult

# Called with each counted request as it finishes (run_level's on_result).
ResultCallback = Callable[[Level, RequestResult], None]

# A gRPC client, or the HTTP driver's (--target http://HOST:PORT): the same stream() and model_info().
BenchClient = AsyncClient | HttpClient

# Our own guard beyond the gRPC deadline, in case a stream hangs past it (seconds).
_TIMEOUT_SLACK_S = 5.0


@dataclass(frozen=True)
class _Request:
    prompt: str
    seed: int
    adapters: AdapterSet = ()  # its per-request adapters


class _RequestSource:
    """Prompts in turn from the list, a seed no other request of the run uses, and the adapters:
    with an adapter mix a set drawn at random (seeded: the same sets every run), else the shape's."""

    def __init__(self, config: BenchConfig) -> None:
        self._prompts = config.prompts
        self._seed = config.seed
        self._stride = config.shape.num_images * config.shape.candidates  # every candidate's seed its own
        self._count = itertools.count()
        self._mix = config.adapter_mix
        self._draw = random.Random(config.seed)
        self._adapters: AdapterSet = adapter_weights(config.shape.adapters)

    def next(self) -> _Request:
        i = next(self._count)
        adapters = self._draw.choice(self._mix) if self._mix else self._adapters
        return _Request(self._prompts[i % len(self._prompts)], (self._seed + i * self._stride) % 2**63, adapters)


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
    client: BenchClient, config: BenchConfig, request: _Request, t0: float
) -> RequestResult:
    """Sends one request and reads its stream; never raises (but for cancellation)."""
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
            request.prompt, config.shape, seed=request.seed, timeout=config.timeout_s,
            adapters=request.adapters or None,
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
        adapters=adapter_set_label(request.adapters),
    )


async def _closed_loop(
    clients: Sequence[BenchClient],
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
    clients: Sequence[BenchClient],
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

    async def send(client: BenchClient, request: _Request) -> None:
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
    clients: Sequence[BenchClient],
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
    clients: BenchClient | Sequence[BenchClient],
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
    pool = [clients] if isinstance(clients, AsyncClient | HttpClient) else list(clients)
    source = source or _RequestSource(config)
    stop = stop or asyncio.Event()
    if config.warmup > 0:
        width = min(config.warmup, level.concurrency or level.max_concurrency or config.warmup)
        t0 = time.perf_counter()
        warm = _Budget(config.warmup, None)
        if await _drive(pool, config, Level(concurrency=width), warm, source, t0, lambda r: None, stop):
            return LevelReport.from_results(level, [], 0.0, config.slo_ms, interrupted=True,
                                            candidates=config.shape.candidates)

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
    return LevelReport.from_results(level, results, time.perf_counter() - t0, config.slo_ms, interrupted,
                                    candidates=config.shape.candidates)


async def _smoke(client: BenchClient, config: BenchConfig, source: _RequestSource) -> None:
    result = await _one_request(client, config, source.next(), time.perf_counter())
    if not result.ok:
        if result.error == "UNAVAILABLE" and config.target is not None:
            tls = bool(config.secure or config.root_certificates or config.client_cert)
            why = unavailable_hint(config.target, result.detail or "", tls=tls, client_cert=bool(config.client_cert))
        else:
            why = "does the server accept this request shape?"
        raise BenchError(f"the smoke request to {config.target} failed: {result.error}: {result.detail} ({why})")


async def _server_info(client: BenchClient) -> dict[str, Any] | None:
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
            clients: list[BenchClient] = [await stack.enter_async_context(HttpClient(
                config.target, root_certificates=config.root_certificates, client_cert=config.client_cert,
                client_key=config.client_key, token=config.token))] if is_http_target(config.target) else [
                # retries=0: a load tester reports overload as failures, not as latency of retried calls.
                await stack.enter_async_context(AsyncClient(
                    config.target, secure=config.secure, root_certificates=config.root_certificates,
                    client_cert=config.client_cert, client_key=config.client_key, token=config.token,
                    retries=0,
                ))
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
        from .baseline import run_baseline  # torch and diffusers: only when asked for

        report.baseline = await asyncio.to_thread(run_baseline, config, stop.is_set)
    report.interrupted = stop.is_set()
    return report
