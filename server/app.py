"""The server process: gRPC server, health, reflection, metrics, model loading, warm-up, drain.

Start-up order: the port opens first with health NOT_SERVING (Generate answers UNAVAILABLE while
the model loads), then the engine process (engine_process.py) loads the model and warms up, then
health turns SERVING and one line `listening on HOST:PORT` is printed. SIGTERM/SIGINT drain:
health NOT_SERVING, new calls get UNAVAILABLE, in-flight requests finish (up to the drain
timeout), then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]  # ships no type information
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc

from .config import EngineConfig, Limits, ServerConfig
from .engine_process import EngineProcess
from .metrics import Metrics
from .placement import describe
from .runtime import Runtime
from .service import GenerationService, ServingState

log = logging.getLogger("lcmserve.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


class App:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig, limits: Limits, version: str) -> None:
        self.config = config
        self.engine_config = engine_config
        self.state = ServingState(limits=limits, version=version,
                                  metrics=Metrics() if config.metrics_port is not None else None)
        self._starting: EngineProcess | None = None  # set as soon as the engine process starts
        self.metrics_port: int | None = None
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Open the port (health NOT_SERVING until `load` finishes). Returns the bound port."""
        limit = self.config.max_message_mb * 2**20
        self.server = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                               ("grpc.max_receive_message_length", limit)])
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationService(self.state), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"),
                                            self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await self.server.start()
        metrics = self.state.metrics
        if metrics is not None and self.config.metrics_port is not None:
            self.metrics_port = metrics.serve(self.config.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", self.metrics_port)
        return self.port

    async def load(self, make_runtime: Callable[[], Runtime]) -> None:
        """Start the engine process and wait (off the event loop: health keeps answering) until it has
        loaded the model, captured its CUDA graphs and warmed up; then SERVING."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        engine = EngineProcess(make_runtime, self.engine_config, self.state.metrics, threads=self.config.threads)

        def died(exc: BaseException) -> None:  # a dead engine must not look healthy
            self.state.serving = False
            asyncio.run_coroutine_threadsafe(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), loop)

        engine.on_death = died
        self._starting = engine
        info = await asyncio.to_thread(engine.start)
        self.state.engine = engine
        spec = info.spec
        if info.graphs:
            log.info("captured %d CUDA graphs for 512x512", info.graphs)
        log.info("model ready in %.1f s (%s, %s, %s, %s torch threads)", time.perf_counter() - start, spec.backend,
                 spec.device, spec.dtype, info.threads)
        if info.compute_cpus:
            log.info("engine process on CPUs %s; gRPC on CPUs %s", describe(info.compute_cpus),
                     describe(info.io_cpus))
        self.state.serving = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """Stop taking work, let in-flight requests finish (bounded), then stop."""
        state = self.state
        if state.draining:
            return
        state.draining = True
        state.serving = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (state.inflight or (state.engine and state.engine.busy)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._starting is not None:  # whatever is left now fails UNAVAILABLE through its handler
            await asyncio.to_thread(self._starting.stop, 10.0)
        if self.server is not None:
            await self.server.stop(grace=2.0)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


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
