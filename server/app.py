"""The server process: gRPC server, health, reflection, metrics, model loading, warm-up, drain.

Start-up order: the port opens first with health NOT_SERVING (Generate answers UNAVAILABLE while
the model loads), then the model loads and warms up, then health turns SERVING and one line
`listening on HOST:PORT` is printed. SIGTERM/SIGINT drain: health NOT_SERVING, new calls get
UNAVAILABLE, in-flight requests finish (up to the drain timeout), then the process exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc

from .engine import Engine, EngineConfig
from .work import Failure, GenerationParams, Request, SummaryOut
from .metrics import Metrics
from .runtime import Runtime
from .service import GenerationService
from .validation import Limits, tokenize

log = logging.getLogger("lcmserve.server")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = 8002  # None: no metrics endpoint; 0 picks a free port
    drain_timeout_s: float = 30.0  # most time in-flight requests get to finish on SIGTERM
    max_message_mb: int = 64  # gRPC send/receive limit (RAW 1024x1024 images are 3 MiB)


class App:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig, limits: Limits, version: str) -> None:
        self.config = config
        self.engine_config = engine_config
        self.limits = limits
        self.version = version
        self.engine: Engine | None = None
        self.serving = False
        self.draining = False
        self.inflight = 0
        self.metrics = Metrics() if config.metrics_port is not None else None
        self.metrics_port: int | None = None
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Open the port (health NOT_SERVING until `load` finishes). Returns the bound port."""
        limit = self.config.max_message_mb * 2**20
        self.server = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                               ("grpc.max_receive_message_length", limit)])
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationService(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_name = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
        reflection.enable_server_reflection((service_name, reflection.SERVICE_NAME, "grpc.health.v1.Health"),
                                            self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await self.server.start()
        if self.metrics is not None and self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", self.metrics_port)
        return self.port

    async def load(self, make_runtime: Callable[[], Runtime]) -> None:
        """Load the model off the event loop (health keeps answering), warm up, then SERVING."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        runtime = await asyncio.to_thread(make_runtime)
        engine = Engine(runtime, self.engine_config, self.metrics)

        def died(exc: BaseException) -> None:  # a dead loop must not look healthy
            self.serving = False
            asyncio.run_coroutine_threadsafe(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), loop)

        engine.on_death = died
        graphs = await asyncio.to_thread(engine.capture_graphs, 512, 512)  # the default size; others lazily
        if graphs:
            log.info("captured %d CUDA graphs for 512x512 in %.1f s", graphs, time.perf_counter() - start)
        engine.start()
        self.engine = engine
        await asyncio.to_thread(warm_up, engine)
        log.info("model ready in %.1f s (%s, %s, %s)", time.perf_counter() - start, runtime.spec.backend,
                 runtime.spec.device, runtime.spec.dtype)
        self.serving = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """Stop taking work, let in-flight requests finish (bounded), then stop."""
        if self.draining:
            return
        self.draining = True
        self.serving = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (self.inflight or (self.engine and self.engine.busy)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine is not None:  # whatever is left now fails UNAVAILABLE through its handler
            await asyncio.to_thread(self.engine.stop, 10.0)
        if self.server is not None:
            await self.server.stop(grace=2.0)

    async def _set_health(self, status: int) -> None:
        for service in ("", pb.DESCRIPTOR.services_by_name["GenerationService"].full_name):
            await self.health.set(service, status)


def warm_up(engine: Engine) -> None:
    """One small generation through the whole path (allocator, kernels, CUDA graphs at batch 1)."""
    side = 512 if engine.device.type == "cuda" else 64
    ids, _, _ = tokenize(engine.runtime.tokenizer, "warm-up")
    params = GenerationParams(prompt_ids=ids, negative_ids=ids, num_steps=2, guidance_scale=1.0, seed=0, width=side,
                              height=side, num_images=1, output_format="jpeg", quality=90, preview_mode="approx",
                              include_latents=False)
    events: queue.Queue[object] = queue.Queue()
    engine.submit(Request(params=params, sink=events.put))
    while True:
        item = events.get(timeout=600)
        if isinstance(item, concurrent.futures.Future):
            item = item.result()
        if isinstance(item, Failure):
            raise RuntimeError(f"warm-up failed: {item.message}")
        if isinstance(item, SummaryOut):
            return


async def serve(make_runtime: Callable[[], Runtime], config: ServerConfig, engine_config: EngineConfig,
                limits: Limits, version: str) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    app = App(config, engine_config, limits, version)
    port = await app.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(app.load(make_runtime))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        loading.result()  # raise a load failure
        host = config.host if config.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        print(f"listening on {host}:{port}", flush=True)
        await stopped
    else:
        loading.cancel()
    log.info("draining")
    print("draining", file=sys.stderr, flush=True)
    await app.drain()
