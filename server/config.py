"""The server's configuration, one frozen dataclass per component, filled by the serve CLI (cli.py).

Standard library only: the client's `lcmserve` command builds the serve parser, whose defaults and
help come from these classes, where torch and the server extras are not installed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """What Generate validates against (also sent in GetModelInfo)."""

    max_steps: int = 8
    min_side: int = 64  # pixels
    max_side: int = 1024
    side_multiple: int = 8
    max_images: int = 8  # per request
    max_prompt_chars: int = 2000
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 20.0
    max_candidates: int = 8  # GenerateRequest.candidates (best-of-N, issue 23)

    @property
    def max_image_bytes(self) -> int:
        """The largest init or mask image a request may carry: max_side^2 RGB, RAW or a PNG no
        larger than that (+64 KiB of PNG overhead)."""
        return self.max_side * self.max_side * 3 + 64 * 1024

    @property
    def max_image_pixels(self) -> int:
        """16 x max_side^2 pixels (4096 x 4096 at the default 1024): a phone photo decodes; resize
        larger ones before sending."""
        return 16 * self.max_side * self.max_side

    @property
    def max_request_bytes(self) -> int:
        """The receive limit: the largest valid GenerateRequest, with room for the img2img issue's
        init and mask images (each at most max_side^2 RGB, RAW or a PNG no larger than that), so a
        63 MiB prompt is refused by gRPC before it is read rather than after."""
        prompts = 2 * 4 * self.max_prompt_chars  # prompt + negative prompt, up to 4 UTF-8 bytes a character
        images = 2 * self.max_image_bytes  # init + mask image
        return prompts + images + 64 * 1024  # the other fields and framing

    @property
    def max_response_bytes(self) -> int:
        """The send limit: the largest valid GenerateResponse, a RAW max_side^2 image (or full
        preview) with its float32 latents; PNG of noise is at most about 1 % larger than RAW."""
        pixels = self.max_side * self.max_side * 3
        latents = 4 * (self.max_side // 8) ** 2 * 4  # (4, h, w) float32
        return pixels + pixels // 20 + latents + 64 * 1024


@dataclass(frozen=True)
class FaultInjection:
    """Test hooks, off by default, read from LCMSERVE_FAULT_INJECTION="name=value,..." by the serve CLI.

    iteration_fault_seed: an engine iteration holding a request with this seed raises inside the
      iteration (as a bad batch or CUDA out-of-memory would): that batch fails, the engine goes on.
    loop_death_seed: a request with this seed arriving kills the engine loop itself (an exception
      that escapes it): health turns NOT_SERVING, what is in flight fails UNAVAILABLE, and the
      server exits non-zero (fail fast: a supervisor restarts it).
    iteration_oom_seed: an engine iteration holding a request with this seed raises
      torch.OutOfMemoryError (as CUDA out of memory would): that batch fails RESOURCE_EXHAUSTED with
      a retry hint, the allocator's cache is freed, the engine goes on.
    cuda_error_seed: an engine iteration holding a request with this seed raises the RuntimeError of a
      sticky CUDA error ("CUDA error: an illegal memory access was encountered"): the device would be
      unusable, so the loop dies of it, as with loop_death_seed.
    slow_iteration_seed: every engine iteration holding a request with this seed first sleeps 0.5 s
      (a request that stays in flight long enough for a test to act while it runs, on any machine).

    The engine process runs server/engine/faults.py's FaultInjectingEngine when any is set; the
    product loop has no test hooks (in-process engine tests inject their faults themselves).
    Example: LCMSERVE_FAULT_INJECTION="iteration_fault_seed=667,iteration_oom_seed=668".
    """

    iteration_fault_seed: int | None = None
    loop_death_seed: int | None = None
    iteration_oom_seed: int | None = None
    cuda_error_seed: int | None = None
    slow_iteration_seed: int | None = None

    ENV = "LCMSERVE_FAULT_INJECTION"

    @classmethod
    def from_env(cls) -> FaultInjection:
        text = os.environ.get(cls.ENV, "").strip()
        if not text:
            return cls()
        values: dict[str, int] = {}
        known = {"iteration_fault_seed", "loop_death_seed", "iteration_oom_seed", "cuda_error_seed",
                 "slow_iteration_seed"}
        for item in text.split(","):
            name, _, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name not in known or not value.strip().isdigit():
                raise ValueError(f"{cls.ENV}: {item!r} is not one of {sorted(known)} = an integer seed")
            values[name] = int(value)
        return cls(**values)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # an adapter's name: serve --adapter, LoadAdapter, requests
MAX_ADAPTER_SCALE = 8.0  # |scale| of an adapter: a request's AdapterWeight.scale, a default scale


@dataclass(frozen=True)
class AdapterConfig:
    """Per-request LoRA adapters (issue 21): slots the engine pre-allocates, what requests may name."""

    initial: tuple[tuple[str, str, float], ...] = ()  # serve --adapter NAME=SRC[:SCALE]: (name, source, scale)
    max_adapters: int = 8  # slots: most adapters loaded at once
    max_adapter_rank: int = 64  # a LoRA of higher rank is refused
    max_adapters_per_request: int = 4
    allow_loading: bool = False  # serve AdapterService.LoadAdapter/UnloadAdapter (--allow-adapter-loading)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # most rows in one UNet call (a guided image takes two)
    max_queued_requests: int = 256  # waiting requests before submit() refuses (RESOURCE_EXHAUSTED)
    batch_wait_ms: float = 0.0  # wait this long for company before starting an idle batch; 0: never delay
    vae_batch_size: int = 8  # most images in one VAE decode
    text_cache_size: int = 1024  # prompt embeddings kept (LRU)
    encode_threads: int = 4  # host image encoders
    max_steps: int = Limits.max_steps
    cuda_graphs: bool = True  # capture/replay UNet and VAE per (bucket, resolution) on CUDA
    buckets: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # padded batch sizes on CUDA
    pin_cpus: bool = True  # on a CPU device: the engine process on its own cores (placement.py)
    faults: FaultInjection = field(default_factory=FaultInjection)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes, read by the serve CLI. With client_ca, clients must present a certificate it
    signed (mTLS); without, any client may connect over TLS."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = 8002  # None: no metrics endpoint; 0 picks a free port
    metrics_host: str | None = None  # None: the same address as `host`
    drain_timeout_s: float = 30.0  # most time in-flight requests get to finish on SIGTERM
    threads: int | None = None  # torch CPU threads of the engine process (None: cores - 1 on a CPU device)
    tls: TlsConfig | None = None  # None: plaintext (loopback, or behind a TLS-terminating proxy)
    auth_tokens: tuple[str, ...] = ()  # accepted bearer tokens; () means no authentication
    reflection: bool = True  # serve grpc.reflection (behind the token when auth is on)
    max_concurrent_rpcs: int = 1024  # RPCs in flight server-wide (beyond: RESOURCE_EXHAUSTED); also streams/connection
    max_connection_age_s: float | None = None  # close connections this old (GOAWAY) so clients rebalance
    keepalive_min_ping_s: float = 10.0  # clients may ping this often, even without calls, without a GOAWAY
    death_linger_s: float = 3.0  # after the engine died: NOT_SERVING this long (probes see why), then exit 3
    otlp_endpoint: str | None = None  # OpenTelemetry traces (server/edge/tracing.py); None: the OTEL_* variables
    http_port: int | None = None  # the HTTP front door (server/edge/http/); None: off; 0 picks a free port
    http_host: str | None = None  # its address; None: the same as `host`
