"""The server process: gRPC server, health, reflection, metrics, model loading, warm-up, drain.

Start-up order: the port opens first with health NOT_SERVING (Generate answers UNAVAILABLE while
the model loads), then the engine process (engine_process.py) loads the model and warms up, then
health turns SERVING and one line `listening on HOST:PORT` is printed.

How it ends, and the exit code `serve` returns (a supervisor reads it):
  0  SIGTERM/SIGINT (to this process, the engine's, or the whole group: the engine process ignores
     them, the edge alone decides): health NOT_SERVING, new calls UNAVAILABLE, every in-flight
     request finished within --drain-timeout.
  1  the same, but the drain timed out: requests still in flight were failed UNAVAILABLE.
  3  the engine process or its loop died: in-flight requests failed UNAVAILABLE, health turned
     NOT_SERVING; after `death_linger_s` (probes and clients see why) the process exits, so that
     the supervisor restarts it. Never healthy-but-dead.
  StartupError (the CLI prints its one line and exits 2): a port in use, bad TLS files, a model
  that does not load.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]  # ships no type information

from ..config import EngineConfig, Limits, ServerConfig
from ..placement import describe
from .core import EdgeCore
from .metrics import Metrics, MetricsBindError
from .pool import EnginePool, EngineSlot
from .adapter_service import SERVICE_NAME as ADAPTER_SERVICE_NAME
from .adapter_service import AdapterService
from .adapters import AdapterRegistry
from .service import SERVICE_NAME, GenerationService, TokenAuth
from .tracing import tracer_from_config

if TYPE_CHECKING:
    from .http.server import HttpServer

log = logging.getLogger("lcmserve.server")

EXIT_OK, EXIT_DROPPED, EXIT_ENGINE_DIED = 0, 1, 3


class StartupError(Exception):
    """The server cannot start; the message is one line naming what and what to change."""


class App:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig, limits: Limits, version: str) -> None:
        self.config = config
        self.engine_config = engine_config
        self.core = EdgeCore(limits=limits, version=version,
                             metrics=Metrics() if config.metrics_port is not None else None)
        self._starting: EnginePool | None = None  # set as soon as the engine processes start
        self.metrics_port: int | None = None
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.engine_died = asyncio.Event()  # set (on the event loop) when the engine process or loop dies
        self.core.tracer = tracer_from_config(config.otlp_endpoint, version)  # None unless configured
        self.http: HttpServer | None = None  # the HTTP front door (--http-port), beside gRPC

    def server_options(self) -> list[tuple[str, Any]]:
        """gRPC server arguments: message limits from the largest valid request/response, no shared
        ports, a keepalive policy, and connection ageing for rebalancing behind a load balancer."""
        c, limits = self.config, self.core.limits
        ping_ms = int(c.keepalive_min_ping_s * 1e3)
        options: list[tuple[str, Any]] = [
            ("grpc.so_reuseport", 0),  # a second server on this port must fail, not split its connections
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", limits.max_response_bytes),
            ("grpc.max_concurrent_streams", c.max_concurrent_rpcs),  # per connection; the rest wait
            ("grpc.keepalive_permit_without_calls", 1),  # client pings without calls are fine...
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ping_ms),  # ...every ping_ms, no GOAWAY
            ("grpc.http2.min_ping_interval_without_data_ms", ping_ms),
            ("grpc.keepalive_time_ms", 60_000),  # and ours find dead peers: ping an idle connection each minute
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if c.max_connection_age_s is not None:
            options += [("grpc.max_connection_age_ms", int(c.max_connection_age_s * 1e3)),
                        ("grpc.max_connection_age_grace_ms", int(c.drain_timeout_s * 1e3))]  # streams finish
        return options

    async def start(self) -> int:
        """Open the port (health NOT_SERVING until `load` finishes). Returns the bound port."""
        c = self.config
        interceptors = [TokenAuth(c.auth_tokens, self.core.metrics)] if c.auth_tokens else []
        self.server = grpc.aio.server(options=self.server_options(), interceptors=interceptors,
                                      maximum_concurrent_rpcs=c.max_concurrent_rpcs)
        self.core.adapters = AdapterRegistry(self.engine_config.adapters, self.core.metrics)
        self.server.add_generic_rpc_handlers((GenerationService(self.core).handler(),
                                              AdapterService(self.core, self.engine_config.adapters).handler()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if c.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, ADAPTER_SERVICE_NAME, reflection.SERVICE_NAME,
                                                 "grpc.health.v1.Health"),
                                                self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{c.host}:{c.port}"
        _check_port_free(c.host, c.port, "--port")
        try:
            if c.tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials([(c.tls.private_key, c.tls.cert_chain)],
                                                          root_certificates=c.tls.client_ca,
                                                          require_client_auth=c.tls.client_ca is not None)
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {address} (in use, or not an address of this machine); "
                               "choose another with --port (0 picks a free one) or --host")
        await self.server.start()
        metrics = self.core.metrics
        if metrics is not None and c.metrics_port is not None:
            host = c.metrics_host or c.host
            _check_port_free(host, c.metrics_port, "--metrics-port")
            try:
                self.metrics_port = metrics.serve(c.metrics_port, host)
            except MetricsBindError as exc:
                raise StartupError(str(exc)) from None
            log.info("metrics on http://%s:%d/metrics", _url_host(host), self.metrics_port)
        if c.http_port is not None:
            await self._start_http(c.http_host or c.host, c.http_port)
        return self.port

    async def _start_http(self, host: str, port: int) -> None:
        """The HTTP front door (server/edge/http/) on host:port, over the same core, TLS and tokens."""
        from .http.server import HttpServer  # (Starlette and uvicorn: only when asked for)

        _check_port_free(host, port, "--http-port")
        self.http = HttpServer(self.core, host, port, tokens=self.config.auth_tokens, tls=self.config.tls)
        try:
            await self.http.start()
        except OSError as exc:
            self.http = None
            raise StartupError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror or exc}; choose another "
                               "port with --http-port (0 picks a free one) or --http-host") from None

    async def load(self, slots: Sequence[EngineSlot]) -> None:
        """Start the engine processes (one per device, pool.py) and wait (off the event loop: health
        keeps answering) until every one has loaded the model, captured its CUDA graphs and warmed
        up; then SERVING."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        engine = EnginePool(slots, self.engine_config, self.core.metrics, threads=self.config.threads)

        def died(exc: BaseException) -> None:  # (reader thread) a dead engine must not look healthy
            self.core.serving = False
            asyncio.run_coroutine_threadsafe(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), loop)
            loop.call_soon_threadsafe(self.engine_died.set)

        engine.on_death = died
        self._starting = engine
        info = await asyncio.to_thread(engine.start)
        self.core.engine = engine
        if self.core.adapters is not None:  # those serve --adapter loaded (every engine the same)
            self.core.adapters.started(info.adapters)
        if self.core.metrics is not None:
            self.core.metrics.engine_processes.watch(engine.processes)
        model = info.model
        if info.graphs:
            log.info("captured %d CUDA graphs for 512x512", info.graphs)
        log.info("model ready in %.1f s (%s, %s, %s, %s torch threads)", time.perf_counter() - start, model.backend,
                 ",".join(engine.devices), model.dtype, info.threads)
        if info.compute_cpus:
            log.info("engine process on CPUs %s; gRPC on CPUs %s", " | ".join(describe(i.compute_cpus) for i in
                     engine.infos), describe(info.io_cpus) or "any (no CPU left for it alone)")
        if engine.dead is not None:  # died between Ready and now
            return
        self.core.serving = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> int:
        """Stop taking work, let in-flight requests finish (bounded), then stop. Returns how many
        requests were still in flight when the drain timeout ended (failed UNAVAILABLE)."""
        core = self.core
        if core.draining:
            return 0
        core.draining = True
        core.serving = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (core.inflight or (core.engine and core.engine.busy)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        dropped = max(core.inflight, core.engine.outstanding if core.engine else 0)
        if dropped:
            log.error("drain timed out after %g s: %d requests still in flight fail UNAVAILABLE",
                      self.config.drain_timeout_s, dropped)
        await self.close()
        return dropped

    async def close(self, grace: float = 2.0) -> None:
        """Stop the engine process (what is left fails UNAVAILABLE through its handler) and the gRPC server."""
        if self._starting is not None:
            await asyncio.to_thread(self._starting.stop, 10.0)
        if self.server is not None:
            await self.server.stop(grace=grace)
            self.server = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.core.tracer is not None:  # export what is left
            await asyncio.to_thread(self.core.tracer.shutdown)
            self.core.tracer = None

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


async def serve(slots: Sequence[EngineSlot], config: ServerConfig, engine_config: EngineConfig, limits: Limits,
                version: str) -> int:
    """Run until SIGTERM/SIGINT (then drain) or the engine's death; returns the exit code (module doc).
    Raises StartupError when the server cannot start; the gRPC server is stopped on every way out."""
    app = App(config, engine_config, limits, version)
    try:
        return await _run(app, slots, config)
    finally:
        if app.server is not None:  # (a start-up failure: stop it here, not in __del__ after the loop closed)
            await app.server.stop(None)
            app.server = None
        if app.http is not None:
            await app.http.stop()
            app.http = None


async def _run(app: App, slots: Sequence[EngineSlot], config: ServerConfig) -> int:
    port = await app.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(app.load(slots))
    stopped = asyncio.create_task(stop.wait())
    died = asyncio.create_task(app.engine_died.wait())
    await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        try:
            loading.result()
        except Exception as exc:  # noqa: BLE001 - one line for the CLI, whatever the loader raised
            stopped.cancel()
            died.cancel()
            await app.close(grace=0)
            ours = type(exc).__module__.startswith("lcmserve")  # our errors' messages say it all
            text = str(exc) if ours else f"{type(exc).__name__}: {exc}"
            raise StartupError(f"could not load the model: {text}") from exc
        host = config.host if config.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        if app.http is not None:  # (first: a reader that waits for the gRPC line has both then)
            http_host = config.http_host or config.host
            http_host = http_host if http_host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
            print(f"http listening on {_url_host(http_host)}:{app.http.port}", flush=True)
        print(f"listening on {host}:{port}", flush=True)
        await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
    else:
        loading.cancel()
    if died.done() and not stopped.done():
        stopped.cancel()
        engine = app.core.engine
        reason = engine.dead if engine is not None else "unknown"
        log.critical("exiting in %g s with code %d: %s", config.death_linger_s, EXIT_ENGINE_DIED, reason)
        print(f"lcmserve serve: the engine died ({reason}); exiting with code {EXIT_ENGINE_DIED}",
              file=sys.stderr, flush=True)
        await asyncio.sleep(config.death_linger_s)  # health says NOT_SERVING, Generate says why
        await app.close(grace=1.0)
        return EXIT_ENGINE_DIED
    died.cancel()
    log.info("draining")
    print("draining", file=sys.stderr, flush=True)
    dropped = await app.drain()
    if app.core.engine is not None and app.core.engine.dead is not None:  # it died while draining
        log.critical("the engine died while draining: %s", app.core.engine.dead)
        return EXIT_ENGINE_DIED
    return EXIT_DROPPED if dropped else EXIT_OK


def _check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse a TCP port some process listens on, naming the address and the flag to change (gRPC's
    own bind failure also logs a C-level line; this probe says it in one line first)."""
    if port == 0:
        return
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is no clash
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"cannot listen on {host}:{port}: the address is already in use; choose "
                                       f"another port with {flag} (0 picks a free one)") from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise StartupError(f"cannot listen on {host}:{port}: not an address of this machine; "
                                       "check --host") from None
                raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
