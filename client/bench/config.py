"""What a benchmark run is asked to do: the request shape, the load levels, the whole run's config.

Frozen dataclasses, filled by the CLI (`bench.cli.config_from_args`) or by hand; no I/O here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..options import GenerateOptions


AdapterSet = tuple[tuple[str, float | None], ...]
"""One request's adapters: (name, scale or None for the adapter's default) pairs; () for none."""


def adapter_set_label(adapters: AdapterSet) -> str:
    """How the report names an adapter set: "none", "cracks:0.8", "cracks:0.6+spalling" (default scale)."""
    return "+".join(name if scale is None else f"{name}:{scale:g}" for name, scale in adapters) or "none"


class BenchError(Exception):
    """The benchmark cannot run as asked (smoke request failed, missing extra, bad option)."""


# Cracks in concrete walls, the motivating use: many images of one domain, prompts that vary.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a hairline crack in a grey concrete wall, close-up photo",
    "a diagonal crack running through a weathered concrete wall, daylight",
    "a wide structural crack in a reinforced concrete wall with exposed rebar",
    "a network of fine shrinkage cracks on a smooth concrete surface",
    "a vertical crack in a concrete retaining wall, moss at the edges",
    "a spalled concrete wall with a deep crack and rust stains, overcast light",
    "a crack in a painted concrete basement wall, flash photo",
    "a stair-step crack along a concrete block wall, side light",
    "a repaired crack filled with epoxy in a concrete wall, close-up",
    "a map cracking pattern on an old concrete bridge pier",
    "a thin crack branching across a wet concrete wall after rain",
    "a crack near a window corner in a cast-in-place concrete wall",
)


@dataclass(frozen=True)
class RequestShape(GenerateOptions):
    """What every request asks for: the SDK's GenerateOptions with the server's defaults written
    out as values, so that the report and the diffusers baseline can use them.

    `seed` is not used: request i of a run gets `BenchConfig.seed + i * num_images * candidates`.
    """

    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    width: int = 512  # pixels
    height: int = 512  # pixels
    num_images: int = 1  # per request
    candidates: int = 1  # best-of-N: the server generates num_images * candidates and returns num_images


@dataclass(frozen=True)
class Level:
    """One load level: closed loop with `concurrency` clients, or open loop at `rate` requests/s."""

    concurrency: int | None = None
    rate: float | None = None  # requests/s, Poisson arrivals
    max_concurrency: int | None = None  # open loop only: most requests in flight

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError(f"a level has a concurrency or a rate, not both or neither: {self}")

    @property
    def label(self) -> str:
        """The level's name in the table and the progress bar: "c=8", or "r=2/s max 16"."""
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        cap = f" max {self.max_concurrency}" if self.max_concurrency else ""
        return f"r={self.rate:g}/s{cap}"

    def default_requests(self) -> int:
        """Requests when neither --requests nor --duration is given: enough to fill the level."""
        if self.concurrency is not None:
            return max(32, 4 * self.concurrency)
        return max(32, math.ceil(10 * (self.rate or 0.0)))


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run needs; filled by the CLI or by hand."""

    target: str | None  # HOST:PORT of the server; None: only the baseline runs
    levels: tuple[Level, ...] = (Level(concurrency=1),)
    requests: int | None = None  # per level; None and no duration: Level.default_requests()
    duration_s: float | None = None  # per level: send new requests for this long
    warmup: int = 4  # requests before each level, not counted
    timeout_s: float = 60.0  # gRPC deadline of each request
    shape: RequestShape = field(default_factory=RequestShape)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0  # request i gets seed + i * num_images (image j of it: + j, on the server)
    # Per-request adapters: each request one of these sets at random (seeded by `seed`), latency reported
    # per set; empty: every request sends shape.adapters (bench --adapter), or none.
    adapter_mix: tuple[AdapterSet, ...] = ()
    slo_ms: float | None = None  # goodput counts ok requests within this end-to-end latency
    secure: bool = False  # TLS with the system's roots
    root_certificates: bytes | None = field(default=None, repr=False)  # PEM roots to trust (implies TLS)
    client_cert: bytes | None = field(default=None, repr=False)  # mTLS: PEM chain, with client_key
    client_key: bytes | None = field(default=None, repr=False)  # mTLS: its PEM private key
    token: str | None = field(default=None, repr=False)  # bearer token; None: $LCMSERVE_TOKEN, if set
    connections: int = 1  # gRPC channels, requests spread round-robin over them
    progress: bool = True
    baseline_model: str | None = None
    baseline_batches: tuple[int, ...] = ()  # empty: 1 and the largest concurrency
    baseline_iters: int = 3  # timed pipeline calls per batch size, after one warm-up call
    baseline_device: str | None = None  # None: cuda if available, else cpu
    baseline_dtype: str | None = None  # None: float16 on cuda, float32 on cpu
    baseline_threads: int | None = None  # torch threads on a CPU; None: as the server's engine (cores - 1)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("prompts is empty")
        if self.requests is not None and self.duration_s is not None:
            raise ValueError("give requests or duration_s, not both")

    def baseline_batch_sizes(self) -> tuple[int, ...]:
        """The baseline's batch sizes: as given, else 1 and the widest level's concurrency."""
        if self.baseline_batches:
            return self.baseline_batches
        widest = max((lv.concurrency or lv.max_concurrency or 1 for lv in self.levels), default=1)
        return tuple(sorted({1, widest}))

    def to_json(self) -> dict[str, Any]:
        """The config as the JSON report records it (the number of prompts, not their text)."""
        data = dataclasses.asdict(self)
        data["levels"] = [{k: v for k, v in lv.items() if v is not None} for lv in data["levels"]]
        data["prompts"] = len(self.prompts)
        for name in ("init_image", "mask_image"):  # bytes: their size, not their contents
            image = getattr(self.shape, name)
            data["shape"][name] = None if image is None else f"{len(image)} bytes"
        for name in ("root_certificates", "client_cert", "client_key", "token"):  # whether set, never the secret
            data[name] = getattr(self, name) is not None
        return data
