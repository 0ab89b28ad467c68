"""OpenTelemetry traces of Generate calls, recorded by the edge (the engine process exports nothing).

Off unless configured (`tracer_from_config`): `serve --otlp-endpoint URL`, else the standard
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_EXPORTER_OTLP_PROTOCOL (or
its _TRACES_ form) picks `http/protobuf` (the default) or `grpc`; OTEL_SERVICE_NAME (default
lcmserve), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* and OTEL_PROPAGATORS are
the SDK's own. Off, the core holds None: no SDK import, no SDK object on a request's path.

One SERVER span per call, named by its method (`lcmserve.v1.GenerationService/Generate`, or an HTTP
route such as `POST /v1/images/generations`), continuing the W3C `traceparent` of the call's gRPC
metadata or HTTP headers. When the engine's Summary comes (protocol.RequestTrace, asked for with
Submit.trace) its children are recorded from the engine's own timestamps:

    queue        arrival at the edge -> its first image joined the batch
    text_encode  its prompts' text encoding
    denoise      first -> last UNet step it was in; an event `step` per call (step, timestep, rows)
    decode       its images' VAE (or tiny VAE) decodes
    encode       its images' encodes (JPEG/PNG/WEBP/RAW)

Attributes: lcmserve.seed, .size ("WxH"), .steps, .num_images, .guidance_scale, .decoder,
.adapters and .candidates (when the request has them), .backend, .device, .status (the status the
client saw); a call that did not end OK has the span status ERROR with its message.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol import GenerationParams, RequestTrace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_SERVICE = "lcmserve"


@dataclass(frozen=True)
class CallInfo:
    """What a transport knows of a call, for its span and its access log line."""

    method: str  # gRPC: "lcmserve.v1.GenerationService/Generate"; HTTP: "POST /v1/images/generations"
    peer: str = ""  # the client's address as the transport gives it
    headers: Mapping[str, str] | Sequence[tuple[str, str | bytes]] = ()  # gRPC metadata or HTTP headers


class TracingConfigError(ValueError):
    """A tracing setting that cannot be used; the message names it."""


def endpoint_configured(flag: str | None, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or env.get("OTEL_TRACES_EXPORTER") == "none":
        return False
    return bool(flag or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def tracer_from_config(endpoint: str | None, version: str, environ: Mapping[str, str] | None = None) -> Tracer | None:
    """The edge's tracer, or None when tracing is not configured (see the module doc)."""
    env = os.environ if environ is None else environ
    if not endpoint_configured(endpoint, env):
        return None
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    if protocol not in PROTOCOLS:
        raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: lcmserve exports traces over "
                                 f"{' or '.join(PROTOCOLS)}")
    return Tracer(_provider(endpoint, protocol, version))


def _provider(endpoint: str | None, protocol: str, version: str) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.version": version})  # + OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE}))
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter: Any = GrpcExporter(endpoint=endpoint) if endpoint else GrpcExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter(endpoint=_http_traces_url(endpoint)) if endpoint else HttpExporter()
    # Its sampler: OTEL_TRACES_SAMPLER (default parentbased_always_on). Shut down by Tracer.shutdown, bounded,
    # not at exit: an unreachable collector would hold the exit for the exporter's retries.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* (a background thread exports)
    return provider


def _http_traces_url(endpoint: str) -> str:
    """--otlp-endpoint http://collector:4318 -> .../v1/traces (a URL with a path is taken as it is)."""
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    scheme, _, rest = endpoint.partition("://")
    host, slash, path = rest.partition("/")
    return endpoint if slash and path else f"{scheme}://{host}/v1/traces"


class Tracer:
    """The SDK's tracer for the edge: `start` makes a call's ServerSpan; `shutdown` exports what is left."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import propagate, trace

        self._provider = provider
        self._tracer = provider.get_tracer("lcmserve")
        self._propagate = propagate
        self._trace = trace

    def start(self, call: CallInfo, transport: str) -> ServerSpan:
        carrier: dict[str, str] = {}
        items: Iterable[tuple[str, Any]] = call.headers.items() if isinstance(call.headers, Mapping) else call.headers
        for key, value in items:
            if isinstance(value, str):
                carrier[key.lower()] = value
        parent = self._propagate.extract(carrier)
        wall, mono = time.time_ns(), time.perf_counter()
        attributes: dict[str, Any] = {"rpc.system": "grpc"} if transport == "grpc" else {}
        if transport == "grpc":
            service, _, method = call.method.rpartition("/")
            attributes.update({"rpc.service": service, "rpc.method": method})
        else:
            verb, _, route = call.method.partition(" ")
            attributes.update({"http.request.method": verb, "http.route": route})
        if call.peer:
            attributes["lcmserve.peer"] = call.peer
        span = self._tracer.start_span(call.method, context=parent, kind=self._trace.SpanKind.SERVER,
                                       attributes=attributes, start_time=wall)
        return ServerSpan(self, span, wall, mono)

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Export what is left, waiting at most `timeout_s` (a collector that does not answer loses them)."""
        flush = threading.Thread(target=self._provider.shutdown, name="lcmserve-otel-shutdown", daemon=True)
        flush.start()
        flush.join(timeout_s)


class ServerSpan:
    """One call's span; `ids` are for the log lines inside it. Instants of the engine (perf_counter
    seconds) become span times through the (wall ns, perf_counter) pair taken at the call's start."""

    def __init__(self, tracer: Tracer, span: Span, wall_ns: int, mono: float) -> None:
        self._tracer = tracer
        self._span = span
        self._wall_ns = wall_ns
        self._mono = mono
        context = span.get_span_context()
        self.trace_id = f"{context.trace_id:032x}"
        self.span_id = f"{context.span_id:016x}"
        self.recording = span.is_recording()  # False when the sampler said no: then no children

    def _ns(self, instant: float) -> int:
        return self._wall_ns + round((instant - self._mono) * 1e9)

    def request(self, params: GenerationParams, backend: str) -> None:
        """The validated request's attributes."""
        attributes: dict[str, Any] = {
            "lcmserve.seed": params.seed, "lcmserve.size": f"{params.width}x{params.height}",
            "lcmserve.steps": params.num_steps, "lcmserve.num_images": params.num_images,
            "lcmserve.guidance_scale": params.guidance_scale, "lcmserve.decoder": params.decoder,
            "lcmserve.backend": backend}
        adapters = getattr(params, "adapters", ())
        if adapters:
            attributes["lcmserve.adapters"] = [f"{name}:{scale:g}" for name, scale in adapters]
        candidates = getattr(params, "candidates", 1)
        if candidates > 1:
            attributes["lcmserve.candidates"] = candidates
        self._span.set_attributes(attributes)

    def engine(self, arrival: float, trace: RequestTrace) -> None:
        """The children, from the engine's timestamps (`arrival`: the ticket's, at the edge)."""
        if trace.device:
            self._span.set_attribute("lcmserve.device", trace.device)
        self._parent = self._tracer._trace.set_span_in_context(self._span)
        if trace.admitted:
            self._child("queue", arrival, trace.admitted)
        if trace.text is not None:
            self._child("text_encode", *trace.text)
        if trace.steps:
            denoise = self._child("denoise", trace.steps[0][3], trace.steps[-1][4], end=False)
            for step, timestep, rows, start, _ in trace.steps:
                denoise.add_event("step", {"step": step, "timestep": timestep, "rows": rows}, self._ns(start))
            denoise.end(self._ns(trace.steps[-1][4]))
        if trace.decode is not None:
            self._child("decode", *trace.decode)
        if trace.encode is not None:
            self._child("encode", *trace.encode)

    def _child(self, name: str, start: float, end_at: float, end: bool = True) -> Span:
        child = self._tracer._tracer.start_span(name, context=self._parent, start_time=self._ns(start))
        if end:
            child.end(self._ns(end_at))
        return child

    def end(self, status: str, message: str = "") -> None:
        """End the span with the status its client saw (a name of status.Status)."""
        from opentelemetry.trace import Status as SpanStatus
        from opentelemetry.trace import StatusCode

        self._span.set_attribute("lcmserve.status", status)
        if status != "OK":
            self._span.set_status(SpanStatus(StatusCode.ERROR, f"{status}: {message}" if message else status))
        self._span.end()
