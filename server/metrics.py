"""Prometheus metrics, named in the style of Triton's `nv_inference_*`, on their own HTTP port.

Each server gets its own registry (no module globals), so several servers can live in one process.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .protocol import Admitted, MetricUpdate, Queued, RequestDone, UNetCall, VaeDecode

_MS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lcmserve_inference_request", "Generate requests finished, by gRPC status",
                                ["status"], registry=r)
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

    def record(self, update: MetricUpdate) -> None:
        """One measurement of the engine's (relayed from the engine process)."""
        match update:
            case Queued(delta=delta):
                self.pending.inc(delta)
            case Admitted(queue_s=seconds):
                self.queue_time.observe(seconds)
            case UNetCall(seconds=seconds, rows=rows):
                self.unet_time.observe(seconds)
                self.batch_size.observe(rows)
            case VaeDecode(seconds=seconds):
                self.vae_time.observe(seconds)
            case RequestDone(status=status):
                self.request_done(status)

    def request_done(self, status: grpc.StatusCode) -> None:
        self.requests.labels(status=status.name).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
