"""Prometheus metrics, named in the style of Triton's `nv_inference_*`, on their own HTTP port.

Each server gets its own registry (no module globals), so several servers can live in one process.

Counting contract: every Generate RPC is counted exactly once in `lcmserve_inference_request_total`,
under the status the client saw and its transport (`grpc`, or `http` for the HTTP front door's generate
routes, server/edge/http/) (status.Status, by name), at one place, the edge core (core.py; a
call its transport refused itself, such as UNAUTHENTICATED by service.py's TokenAuth, through it too).
The engine process measures times and batch sizes and sends them as MetricUpdates; it does not
count requests, and the warm-up is never counted. On CUDA it also reports each graphed callable's
captures, evictions and eager fallbacks (`lcmserve_cuda_graph_events`, cuda_graphs.py).
Per-request adapters (adapters.py): `lcmserve_adapter_requests` by adapter named (bounded by the slots:
an unloaded adapter's series goes), `lcmserve_adapter_loads`/`_unloads` by status, `lcmserve_adapters_loaded`.
Process metrics: `process_*` for the edge, `lcmserve_engine_process_*` for the engine processes
(prometheus_client's ProcessCollector reading /proc on Linux; absent elsewhere). With one engine its
series have no labels; with several (`--devices`), each engine's are labelled {engine="0",
device="cuda:0"} (the engine's index in --devices order, and its device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, ProcessCollector, start_http_server
from prometheus_client.registry import Collector

from ..protocol import (
    Admitted,
    BackendState,
    DeviceMemory,
    GraphStats,
    MetricUpdate,
    Queued,
    UNetTiming,
    VaeDecode,
)
from .status import Status

_MS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The statuses a Generate call can end with; all are exported from the start (at 0), so that a
# dashboard's rate() sees a series before its first increment.
STATUSES = (Status.OK, Status.INVALID_ARGUMENT, Status.UNAUTHENTICATED, Status.RESOURCE_EXHAUSTED,
            Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED, Status.INTERNAL)
TRANSPORTS = ("grpc", "http")  # the `transport` label of the request counter: the front door a call came in by


NO_ADAPTER = "(none)"  # lcmserve_adapter_requests' label of requests naming no adapter (no adapter can be so named)


class MetricsBindError(OSError):
    """The /metrics port could not be bound; the message names the address and the flag."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # this (edge) process: CPU seconds, RSS, open fds
        self.engine_processes = EngineProcesses()  # told the engines once they run (app.py)
        r.register(self.engine_processes)
        self.requests = Counter("lcmserve_inference_request", "Generate requests finished, by final gRPC status "
                                "and transport (grpc, or http: serve --http-port)", ["status", "transport"], registry=r)
        for status in STATUSES:
            for transport in TRANSPORTS:
                self.requests.labels(status=status.name, transport=transport)
        self.unauthenticated = Counter("lcmserve_unauthenticated_request",
                                       "RPCs refused for a missing or wrong token, by method", ["method"], registry=r)
        self.images = Counter("lcmserve_inference_images", "Images generated", registry=r)
        self.queue_time = Histogram("lcmserve_inference_queue_duration_seconds",
                                    "From arrival to the first step of a request", buckets=_MS_BUCKETS, registry=r)
        self.first_step = Histogram("lcmserve_inference_first_step_duration_seconds",
                                    "From arrival to the first step event sent", buckets=_MS_BUCKETS, registry=r)
        self.request_time = Histogram("lcmserve_inference_request_duration_seconds",
                                      "From arrival to the last image sent", buckets=_MS_BUCKETS, registry=r)
        self.batch_size = Histogram("lcmserve_inference_batch_size", "Rows in one UNet call",
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128), registry=r)
        self.unet_time = Histogram("lcmserve_inference_unet_step_duration_seconds", "One UNet call",
                                   buckets=_MS_BUCKETS, registry=r)
        self.vae_time = Histogram("lcmserve_inference_vae_duration_seconds", "One batched VAE decode",
                                  buckets=_MS_BUCKETS, registry=r)
        self.pending = Gauge("lcmserve_inference_pending_request_count", "Requests waiting for a batch slot",
                             registry=r)
        self.graph_events = Gauge("lcmserve_cuda_graph_events", "Per graphed callable (CUDA only): captures, "
                                  "evictions, eager_calls (no graph for that batch or resolution), replays",
                                  ["callable", "counter"], registry=r)
        self.graph_enabled = Gauge("lcmserve_cuda_graph_enabled", "1 while a callable (unet, vae, tiny_vae) runs "
                                   "from CUDA graphs, 0 when off (GetModelInfo's backend_details says why)",
                                   ["callable"], registry=r)
        self.eager_fallbacks = Gauge("lcmserve_eager_fallback_calls", "Calls a compiled part ran eagerly because "
                                     "its compiled form did not serve their shape (since start)", ["part"], registry=r)
        # GPU memory per CUDA device (an engine's, engine/memory.py); no series on a CPU server.
        self.gpu_memory = {kind: Gauge(f"lcmserve_gpu_memory_{kind}_bytes", what, ["device"], registry=r)
                           for kind, what in (("allocated", "Device memory held by tensors"),
                                              ("reserved", "Device memory held by the caching allocator"),
                                              ("peak", "The most device memory ever held by tensors"))}

        # Per-request adapters (issue 21). Requests by adapter: one series per adapter loaded now and one for
        # requests naming none; an adapter's series is removed when it is unloaded, so there are at most
        # --max-adapters + 1 of them however many adapters come and go.
        self.adapter_served = Counter("lcmserve_adapter_requests", "Generate requests served (OK) by adapter they "
                                      "named (a request naming two counts under both); '(none)': no adapter",
                                      ["adapter"], registry=r)
        self.adapter_served.labels(adapter=NO_ADAPTER)
        self.adapter_loads = Counter("lcmserve_adapter_loads", "Adapter loads (serve --adapter at start and "
                                     "LoadAdapter calls), by final status", ["status"], registry=r)
        self.adapter_unloads = Counter("lcmserve_adapter_unloads", "UnloadAdapter calls, by final status",
                                       ["status"], registry=r)
        for counter in (self.adapter_loads, self.adapter_unloads):
            counter.labels(status=Status.OK.name)
        self.adapters_loaded = Gauge("lcmserve_adapters_loaded", "Per-request adapters loaded now", registry=r)

    def adapter_requests(self, names: Iterable[str]) -> None:
        """A request named these adapters and was served."""
        named = False
        for name in names:
            self.adapter_served.labels(adapter=name).inc()
            named = True
        if not named:
            self.adapter_served.labels(adapter=NO_ADAPTER).inc()

    def adapter_unloaded(self, name: str) -> None:
        """Its series goes (a later adapter of that name starts from 0)."""
        try:
            self.adapter_served.remove(name)
        except KeyError:  # never served
            pass

    def record(self, update: MetricUpdate) -> None:
        """One measurement of the engine's (relayed from the engine process)."""
        match update:
            case Queued(delta=delta):
                self.pending.inc(delta)
            case Admitted(queue_s=seconds):
                self.queue_time.observe(seconds)
            case UNetTiming(seconds=seconds, rows=rows):
                self.unet_time.observe(seconds)
                self.batch_size.observe(rows)
            case VaeDecode(seconds=seconds):
                self.vae_time.observe(seconds)
            case BackendState(graphs=graphs, fallbacks=fallbacks):
                for name, state in graphs:
                    self.graph_enabled.labels(callable=name).set(1 if state == "enabled" else 0)
                for part, calls in fallbacks:
                    self.eager_fallbacks.labels(part=part).set(calls)
            case GraphStats(name=name, counters=counters):
                for counter, value in counters:
                    self.graph_events.labels(callable=name, counter=counter).set(value)
            case DeviceMemory(device=device, allocated=allocated, reserved=reserved, peak=peak):
                for kind, value in (("allocated", allocated), ("reserved", reserved), ("peak", peak)):
                    self.gpu_memory[kind].labels(device=device).set(value)

    def request_done(self, status: Status, transport: str = "grpc") -> None:
        self.requests.labels(status=status.name, transport=transport).inc()

    def serve(self, port: int, host: str) -> int:
        """Start the /metrics HTTP endpoint on host:port; returns the bound port (0 picks a free one).
        Raises MetricsBindError naming the address and the flag when the port is taken."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsBindError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                                   "port with --metrics-port (0 picks a free one, -1 turns metrics off)") from None
        return int(server.server_port)


class EngineProcesses(Collector):
    """`lcmserve_engine_process_*`: each engine process's CPU seconds, memory and file descriptors
    (read from /proc when scraped); unlabelled with one engine, labelled {engine, device} with several."""

    def __init__(self) -> None:
        self._engines: tuple[tuple[str, ProcessCollector], ...] = ()

    def watch(self, engines: Sequence[tuple[str, int | None]]) -> None:
        """The engines to report from now on: (device, process id), in --devices order."""
        self._engines = tuple((device, ProcessCollector(namespace="lcmserve_engine", pid=_pid(pid), registry=None))
                              for device, pid in engines)

    def collect(self) -> Iterable[Metric]:
        engines = self._engines
        if len(engines) == 1:
            yield from engines[0][1].collect()
            return
        merged: dict[str, Metric] = {}
        for index, (device, collector) in enumerate(engines):
            for family in collector.collect():
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "engine": str(index), "device": device},
                                    sample.value)
        yield from merged.values()


def _pid(pid: int | None) -> Callable[[], int | str]:
    # A path under /proc that does not exist makes the collector report nothing (not this process).
    return lambda: pid if pid is not None else "no-engine"
