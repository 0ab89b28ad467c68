"""OpenTelemetry traces (issue 24): the session's telemetry server exports to an in-test OTLP/HTTP
receiver (tests/otlp_receiver.py, the real ExportTraceServiceRequest protobuf); requests carry a
known W3C trace context, from the SDK with an active OpenTelemetry context or as an HTTP header."""

from __future__ import annotations

import json
import urllib.request

import pytest

from lcmserve import Client, InvalidArgumentError, StepEvent, Summary
from lcmserve.server.edge.tracing import CallInfo, TracingConfigError, _http_traces_url, tracer_from_config
from otlp_receiver import ReceivedSpan
from telemetry import TelemetryServer, active_span

CHILDREN = ["queue", "text_encode", "denoise", "decode", "encode"]
SERVER_KIND = 2  # opentelemetry.proto Span.SpanKind.SPAN_KIND_SERVER
STATUS_ERROR = 2


def server_and_children(spans: list[ReceivedSpan], parent_id: str) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    (server,) = [s for s in spans if s.parent_span_id == parent_id]
    children = sorted((s for s in spans if s.parent_span_id == server.span_id), key=lambda s: s.start_ns)
    return server, children


def check_engine_children(server: ReceivedSpan, children: list[ReceivedSpan], steps: int, total_ms: float) -> None:
    assert [c.name for c in children] == CHILDREN
    previous_end = server.start_ns
    for child in children:  # one after the other, inside the server span
        assert previous_end <= child.start_ns <= child.end_ns <= server.end_ns, child.name
        previous_end = child.end_ns
    inside_ms = sum(c.end_ns - c.start_ns for c in children) / 1e6
    assert inside_ms <= total_ms <= (server.end_ns - server.start_ns) / 1e6 + 1.0
    denoise = children[2]
    assert [e[0] for e in denoise.events] == ["step"] * steps
    assert [e[2]["step"] for e in denoise.events] == list(range(steps))
    assert all(e[2]["rows"] == 1 for e in denoise.events)  # one unguided image, alone in its UNet calls


def test_a_grpc_call_continues_the_callers_trace(telemetry_server: TelemetryServer) -> None:
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    with Client(telemetry_server.target) as client, active_span(trace_id, span_id):
        events = list(client.stream("a traced wall", num_inference_steps=3, width=64, height=64, seed=2401))
    summary = events[-1]
    assert isinstance(summary, Summary)
    spans = telemetry_server.receiver.trace(f"{trace_id:032x}", 1 + len(CHILDREN))
    assert {s.trace_id for s in spans} == {f"{trace_id:032x}"}
    server, children = server_and_children(spans, f"{span_id:016x}")
    assert server.name == "lcmserve.v1.GenerationService/Generate" and server.kind == SERVER_KIND
    assert server.resource["service.name"] == "lcmserve"
    check_engine_children(server, children, 3, summary.timings.total_ms)
    timesteps = [e.timestep for e in events if isinstance(e, StepEvent)]
    assert [e[2]["timestep"] for e in children[2].events] == timesteps
    a = server.attributes
    assert (a["lcmserve.seed"], a["lcmserve.size"], a["lcmserve.steps"], a["lcmserve.num_images"]) == (
        2401, "64x64", 3, 1)
    assert a["lcmserve.guidance_scale"] == 1.0 and a["lcmserve.decoder"] in ("vae", "unspecified")
    assert a["lcmserve.backend"] == "eager" and a["lcmserve.device"] == "cpu"
    assert a["lcmserve.status"] == "OK" and a["rpc.system"] == "grpc" and server.status_code != STATUS_ERROR
    assert "lcmserve.adapters" not in a and "lcmserve.candidates" not in a  # only where a request has them


def test_a_failed_call_span_carries_its_status(telemetry_server: TelemetryServer) -> None:
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    with Client(telemetry_server.target, retries=0) as client, active_span(trace_id, span_id):
        with pytest.raises(InvalidArgumentError):
            client.generate("x" * 5000, num_inference_steps=2, width=64, height=64)
    (server,) = telemetry_server.receiver.trace(f"{trace_id:032x}", 1)
    assert server.parent_span_id == f"{span_id:016x}"
    assert server.attributes["lcmserve.status"] == "INVALID_ARGUMENT"
    assert server.status_code == STATUS_ERROR and "INVALID_ARGUMENT" in server.status_message


def test_an_http_call_continues_the_traceparent_header(telemetry_server: TelemetryServer) -> None:
    http = telemetry_server.server.http_target
    if not http:
        pytest.skip("no HTTP front door in this build")
    trace_id, span_id = 0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174
    body = json.dumps({"prompt": "a traced wall over http", "num_inference_steps": 2, "width": 64, "height": 64,
                       "seed": 2402}).encode()
    request = urllib.request.Request(f"http://{http}/v1/generate", data=body, method="POST", headers={
        "content-type": "application/json", "traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        response.read()
    spans = telemetry_server.receiver.trace(f"{trace_id:032x}", 1 + len(CHILDREN))
    server, children = server_and_children(spans, f"{span_id:016x}")
    assert server.name == "POST /v1/generate" and server.kind == SERVER_KIND
    assert server.attributes["lcmserve.seed"] == 2402 and server.attributes["lcmserve.status"] == "OK"
    assert server.attributes["http.request.method"] == "POST"
    check_engine_children(server, children, 2, (server.end_ns - server.start_ns) / 1e6)


def test_tracing_is_off_unless_configured_and_honours_the_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert tracer_from_config(None, "0") is None  # no SDK object at all
    assert tracer_from_config("http://127.0.0.1:1", "0", {"OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        tracer_from_config(None, "0", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                                       "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert _http_traces_url("collector:4318") == "http://collector:4318/v1/traces"
    assert _http_traces_url("https://c.example/otlp/v1/traces") == "https://c.example/otlp/v1/traces"
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracer = tracer_from_config("http://127.0.0.1:1", "0")
    assert tracer is not None
    span = tracer.start(CallInfo("lcmserve.v1.GenerationService/Generate"), "grpc")
    assert not span.recording  # unsampled: the engine is not asked for timestamps, no children
    span.end("OK")
    tracer.shutdown()
