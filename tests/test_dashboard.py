"""deploy/grafana/lcmserve.json (issue 24): every PromQL expression names only metrics a running server
exposes (scraped from the session's telemetry server: CPU, eager, HTTP on); a metric that exists only
on CUDA, with a compiled backend or after a refused token is allowed here by name, with the reason,
and shown to be exported by the code that makes it."""

from __future__ import annotations

import json
import pathlib
import re

from prometheus_client import generate_latest

from lcmserve.server.edge.metrics import Metrics
from lcmserve.server.protocol import DeviceMemory, GraphStats
from telemetry import TelemetryServer

DASHBOARD = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "lcmserve.json"
NOT_ON_THIS_SERVER = {  # metric -> why a CPU server with the eager backend and no auth has no series of it
    "lcmserve_gpu_memory_allocated_bytes": "CUDA engines only",
    "lcmserve_gpu_memory_reserved_bytes": "CUDA engines only",
    "lcmserve_gpu_memory_peak_bytes": "CUDA engines only",
    "lcmserve_cuda_graph_events": "CUDA graphs only",
    "lcmserve_eager_fallback_calls": "compiled backends only (aoti, onnx, compile)",
    "lcmserve_unauthenticated_request_total": "a series per method once a token was refused",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
MUST_SHOW = ("lcmserve_inference_request_total", "lcmserve_inference_images_total",
             "lcmserve_inference_request_duration_seconds_bucket", "lcmserve_inference_first_step_duration_seconds_bucket",
             "lcmserve_inference_queue_duration_seconds_bucket", "lcmserve_inference_batch_size_sum",
             "lcmserve_inference_unet_step_duration_seconds_bucket", "lcmserve_inference_vae_duration_seconds_bucket",
             "lcmserve_inference_pending_request_count", "lcmserve_engine_process_cpu_seconds_total",
             "lcmserve_engine_process_resident_memory_bytes", "lcmserve_cuda_graph_events",
             "lcmserve_gpu_memory_allocated_bytes", "lcmserve_adapter_requests_total")


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):  # label_values(METRIC, label)
            found.append(re.sub(r"^label_values\((\w+),.*", r"\1", query["query"]))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions, keywords, labels
    of by/without, label matchers, ranges or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def exposed(text: str) -> set[str]:
    """Names of the samples in a /metrics page (series that exist, not just HELP lines)."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_expression_names_metrics_the_server_exposes(telemetry_server: TelemetryServer) -> None:
    served = exposed(telemetry_server.metrics())
    used: set[str] = set()
    for expr in expressions():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in served or name in NOT_ON_THIS_SERVER, f"{name} (in {expr!r}) is not on /metrics"
        used |= names
    assert set(MUST_SHOW) <= used, sorted(set(MUST_SHOW) - used)
    assert {"lcmserve_inference_request_duration_seconds_bucket", "lcmserve_inference_request_total"} <= served


def test_the_allowed_metrics_exist_where_they_are_made() -> None:
    metrics = Metrics()
    metrics.record(DeviceMemory("cuda:0", 1, 2, 3))
    metrics.record(GraphStats("unet", (("captures", 4),)))
    metrics.unauthenticated.labels(method="/lcmserve.v1.GenerationService/Generate").inc()
    metrics.eager_fallbacks.labels(part="unet").set(1)
    assert set(NOT_ON_THIS_SERVER) <= exposed(generate_latest(metrics.registry).decode())


def test_the_parser_finds_the_names() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{instance=~"$instance",x="y{z}"}[$__rate_interval])))'
            ' / on (instance) group_left sum without (pod) (b_total offset 5m) + c')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
