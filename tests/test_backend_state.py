"""The backend's state where operators look (issue 18 item 3): GetModelInfo's backend_details and /metrics."""

from __future__ import annotations

from prometheus_client import generate_latest

from lcmserve import Client
from lcmserve.server.edge.metrics import Metrics
from lcmserve.server.protocol import BackendState


def test_model_info_says_graphs_are_off_on_a_cpu(tiny_server: str) -> None:
    with Client(tiny_server, timeout=30) as client:
        details = client.model_info().backend_details
    # Every callable the engine runs is listed, each with why it runs without CUDA graphs.
    assert details["graphs.unet"] == "disabled: no CUDA device (cpu)"
    assert details["graphs.vae"] == "disabled: no CUDA device (cpu)"
    # The eager backend has no compiled part, so nothing can fall back.
    assert not any(key.startswith("fallbacks.") for key in details)


def test_metrics_show_graph_state_and_fallbacks() -> None:
    metrics = Metrics()
    metrics.record(BackendState((("unet", "enabled"), ("vae", "disabled: out of memory twice")), (("unet", 3),)))
    exported = generate_latest(metrics.registry).decode()
    assert 'lcmserve_cuda_graph_enabled{callable="unet"} 1.0' in exported
    assert 'lcmserve_cuda_graph_enabled{callable="vae"} 0.0' in exported
    assert 'lcmserve_eager_fallback_calls{part="unet"} 3.0' in exported
