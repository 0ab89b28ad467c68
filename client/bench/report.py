"""Results of `lcmserve bench`: percentiles, per-request, per-level and baseline reports, and their
outputs (text table, JSON, CSV, PNG plot). No I/O but the writers; matplotlib is imported only by
write_plot.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._convert import adapter_weights
from .config import BenchConfig, BenchError, Level, RequestShape, adapter_set_label

_PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Stats:
    """p50/p90/p95/p99/mean of one measure over a level, in the unit of the samples (ms here).

    Percentiles interpolate linearly between the closest ranks (numpy's default), so they are
    ordered p50 <= p90 <= p95 <= p99. No samples gives NaN everywhere (None in JSON).
    """

    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    count: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
        ordered = sorted(samples)
        p50, p90, p95, p99 = (_percentile(ordered, q) for q in _PERCENTILES)
        return cls(p50, p90, p95, p99, math.fsum(ordered) / len(ordered), len(ordered))

    def to_json(self) -> dict[str, float | None]:
        values = {"p50": self.p50, "p90": self.p90, "p95": self.p95, "p99": self.p99, "mean": self.mean}
        return {key: _finite_or_none(value) for key, value in values.items()}


def _percentile(ordered: Sequence[float], q: float) -> float:
    """q-th percentile (0-100) of sorted samples, linear between closest ranks."""
    position = (len(ordered) - 1) * q / 100.0
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _finite_or_none(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it; times in seconds."""

    start_s: float  # when it was sent, from the start of the level
    latency_s: float  # sent -> end of stream (or the error)
    first_step_s: float | None  # sent -> first step event
    step_gaps_s: tuple[float, ...]  # between consecutive step events of image 0
    images: int  # images received
    error: str | None = None  # status code name when it failed, e.g. "UNAVAILABLE"
    detail: str = ""  # the error's message
    adapters: str = "none"  # its adapter set (config.adapter_set_label)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LevelReport:
    """What one level measured. Rates are over the level's wall time (first send to last reply)."""

    level: Level
    sent: int
    ok: int
    failed: int
    errors: dict[str, int]  # failed requests by status code
    error_details: dict[str, str]  # one message per status code
    duration_s: float
    images: int  # images of ok requests
    images_per_s: float
    requests_per_s: float  # ok requests/s
    goodput_per_s: float | None  # ok requests/s within slo_ms (None without an SLO)
    latency_ms: Stats  # end-to-end, ok requests
    first_step_ms: Stats  # sent -> first step event, ok requests
    step_gap_ms: Stats  # step event -> next step event of image 0, all ok requests pooled
    interrupted: bool = False  # stopped early (Ctrl-C): results so far
    by_adapters: tuple[AdapterSetStats, ...] = ()  # per adapter set, when requests used more than one
    generated_per_s: float = 0.0  # images the server generated for ok requests: images_per_s x candidates

    @classmethod
    def from_results(
        cls,
        level: Level,
        results: Sequence[RequestResult],
        duration_s: float,
        slo_ms: float | None = None,
        interrupted: bool = False,
        candidates: int = 1,
    ) -> LevelReport:
        ok = [r for r in results if r.ok]
        failed = [r for r in results if not r.ok]
        details: dict[str, str] = {}
        for r in failed:
            details.setdefault(r.error or "UNKNOWN", r.detail)
        wall = max(duration_s, 1e-9)
        images = sum(r.images for r in ok)
        goodput = None
        if slo_ms is not None:
            goodput = sum(1 for r in ok if r.latency_s * 1e3 <= slo_ms) / wall
        return cls(
            level=level,
            sent=len(results),
            ok=len(ok),
            failed=len(failed),
            errors=dict(Counter(r.error or "UNKNOWN" for r in failed).most_common()),
            error_details=details,
            duration_s=duration_s,
            images=images,
            images_per_s=images / wall,
            requests_per_s=len(ok) / wall,
            goodput_per_s=goodput,
            latency_ms=Stats.from_samples([r.latency_s * 1e3 for r in ok]),
            first_step_ms=Stats.from_samples(
                [r.first_step_s * 1e3 for r in ok if r.first_step_s is not None]
            ),
            step_gap_ms=Stats.from_samples([gap * 1e3 for r in ok for gap in r.step_gaps_s]),
            interrupted=interrupted,
            by_adapters=AdapterSetStats.of(results),
            generated_per_s=images * candidates / wall,
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.level.concurrency is not None:
            data["concurrency"] = self.level.concurrency
        else:
            data["rate"] = self.level.rate
            data["max_concurrency"] = self.level.max_concurrency
        data.update(
            sent=self.sent,
            ok=self.ok,
            failed=self.failed,
            errors=self.errors,
            images_per_s=_finite_or_none(self.images_per_s),
            generated_per_s=_finite_or_none(self.generated_per_s),
            latency_ms=self.latency_ms.to_json(),
            first_step_ms=self.first_step_ms.to_json(),
            step_gap_ms=self.step_gap_ms.to_json(),
            requests_per_s=_finite_or_none(self.requests_per_s),
            goodput_per_s=_finite_or_none(self.goodput_per_s),
            images=self.images,
            duration_s=round(self.duration_s, 3),
            error_details=self.error_details,
            interrupted=self.interrupted,
        )
        if self.by_adapters:
            data["by_adapters"] = [a.to_json() for a in self.by_adapters]
        return data


@dataclass(frozen=True)
class AdapterSetStats:
    """The requests of one adapter set within a level (bench --adapter-mix)."""

    adapters: str  # the set's label: "none", "cracks:0.8+spalling:0.5"
    sent: int
    ok: int
    latency_ms: Stats  # end-to-end, ok requests

    @classmethod
    def of(cls, results: Sequence[RequestResult]) -> tuple[AdapterSetStats, ...]:
        """Per set, in order of first use; () when every request used the same set."""
        sets = list(dict.fromkeys(r.adapters for r in results))
        if len(sets) < 2:
            return ()
        return tuple(cls(adapters=label, sent=sum(1 for r in results if r.adapters == label),
                         ok=sum(1 for r in results if r.adapters == label and r.ok),
                         latency_ms=Stats.from_samples([r.latency_s * 1e3 for r in results
                                                        if r.adapters == label and r.ok]))
                     for label in sets)

    def to_json(self) -> dict[str, Any]:
        return {"adapters": self.adapters, "sent": self.sent, "ok": self.ok, "latency_ms": self.latency_ms.to_json()}


@dataclass(frozen=True)
class BaselineReport:
    """Plain diffusers in-process, one batch size: `calls` timed pipeline calls of `batch_size` requests."""

    model: str
    device: str
    dtype: str
    batch_size: int
    calls: int
    images: int
    duration_s: float
    images_per_s: float
    latency_ms: Stats  # per call (every request of a batch waits for the whole call)
    first_step_ms: Stats  # call start -> end of the first denoising step
    step_gap_ms: Stats  # between the ends of consecutive steps
    threads: int = 0  # torch threads it ran with
    cpus: str = ""  # the CPUs it was pinned to ("1", "1-15 (15)"); "": not pinned

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("latency_ms", "first_step_ms", "step_gap_ms"):
            data[key] = getattr(self, key).to_json()
        data["images_per_s"] = _finite_or_none(self.images_per_s)
        data["duration_s"] = round(self.duration_s, 3)
        return data


@dataclass
class BenchReport:
    """A whole run: its config, a LevelReport per level run, the baseline's reports; filled as it goes."""

    config: BenchConfig
    levels: list[LevelReport] = field(default_factory=list)
    baseline: list[BaselineReport] = field(default_factory=list)
    server: dict[str, Any] | None = None  # the server's model info, when it answered
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "levels": [level.to_json() for level in self.levels],
            "config": {**self.config.to_json(), "server": self.server},
        }
        if self.baseline or self.config.baseline_model:
            data["baseline"] = [b.to_json() for b in self.baseline]
        data["interrupted"] = self.interrupted
        return data


# ---------------------------------------------------------------- output


def _ms(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1f}"


def _stats_cells(latency: Stats, first_step: Stats, step_gap: Stats) -> list[str]:
    return [_ms(latency.p50), _ms(latency.p90), _ms(latency.p95), _ms(latency.p99), _ms(latency.mean)] + [
        _ms(first_step.p50),
        _ms(first_step.p99),
        _ms(step_gap.p50),
        _ms(step_gap.p99),
    ]


def format_table(report: BenchReport) -> str:
    """The report as a fixed-width text table, one row per level (and per baseline batch size)."""
    with_slo = report.config.slo_ms is not None
    best_of = report.config.shape.candidates > 1  # then also the images generated per second
    columns = [("", "level"), ("", "sent"), ("", "ok"), ("", "failed"), ("", "img/s")]
    columns += [("", "gen img/s")] if best_of else []
    columns += [("", "req/s")]
    columns += [("", "goodput/s")] if with_slo else []
    columns += [("end-to-end ms", q) for q in ("p50", "p90", "p95", "p99", "mean")]
    columns += [
        ("first step ms", "p50"),
        ("first step ms", "p99"),
        ("step gap ms", "p50"),
        ("step gap ms", "p99"),
    ]
    rows: list[list[str]] = []
    for lv in report.levels:
        row = [
            lv.level.label + (" (stopped)" if lv.interrupted else ""),
            str(lv.sent),
            str(lv.ok),
            str(lv.failed),
        ]
        row += [f"{lv.images_per_s:.2f}"] + ([f"{lv.generated_per_s:.2f}"] if best_of else [])
        row += [f"{lv.requests_per_s:.2f}"]
        row += [f"{lv.goodput_per_s or 0.0:.2f}"] if with_slo else []
        rows.append(row + _stats_cells(lv.latency_ms, lv.first_step_ms, lv.step_gap_ms))
    for b in report.baseline:
        requests = b.calls * b.batch_size
        row = [f"diffusers b={b.batch_size}", str(requests), str(requests), "0"]
        row += [f"{b.images_per_s:.2f}"] + (["-"] if best_of else [])
        row += [f"{requests / max(b.duration_s, 1e-9):.2f}"]
        row += ["-"] if with_slo else []
        rows.append(row + _stats_cells(b.latency_ms, b.first_step_ms, b.step_gap_ms))
    widths = [max(len(name), *(len(r[i]) for r in rows)) for i, (_, name) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    # Group titles centred over their columns, e.g. "end-to-end ms" over p50 ... mean.
    groups = ""
    for group, span in itertools.groupby(range(len(columns)), key=lambda i: columns[i][0]):
        indices = list(span)
        width = sum(widths[i] for i in indices) + 2 * (len(indices) - 1)
        groups += ("  " if groups else "") + (group.center(width) if group else " " * width)
    shape = report.config.shape
    lines = [
        f"lcmserve bench: {report.config.target or 'no server'}, {shape.width}x{shape.height}, "
        f"{shape.num_inference_steps} steps, {shape.num_images} image(s)/request"
        + (f" (best of {shape.candidates} each)" if best_of else "") + f", {shape.output_format}, "
        f"guidance {shape.guidance_scale:g}, previews {shape.preview_mode}, decoder {shape.decoder}"
        + _image_mode(shape) + _adapter_mode(report.config),
        groups.rstrip(),
        line([name for _, name in columns]),
        *(line(row) for row in rows),
    ]
    for lv in report.levels:
        for a in lv.by_adapters:
            lines.append(f"{lv.level.label} adapters {a.adapters}: {a.ok}/{a.sent} ok, end-to-end ms p50 "
                         f"{_ms(a.latency_ms.p50)}, p99 {_ms(a.latency_ms.p99)}, mean {_ms(a.latency_ms.mean)}")
    for lv in report.levels:
        for code, count in lv.errors.items():
            lines.append(f"{lv.level.label}: {count} x {code}: {lv.error_details.get(code, '')}")
    for b in report.baseline:
        where = f" on CPU {b.cpus}" if b.cpus else ""
        lines.append(
            f"diffusers b={b.batch_size}: {b.model} in this process on {b.device} ({b.dtype}, {b.threads} torch "
            f"thread(s){where}), {b.calls} timed calls of {b.batch_size} request(s)"
        )
    return "\n".join(lines)


CSV_COLUMNS = (
    "concurrency", "rate", "max_concurrency", "sent", "ok", "failed", "errors", "images", "duration_s",
    "images_per_s", "generated_per_s", "requests_per_s", "goodput_per_s",
    *(f"{m}_{k}" for m in ("latency_ms", "first_step_ms", "step_gap_ms") for k in ("p50", "p90", "p95", "p99", "mean")),
    "interrupted",
)  # fmt: skip


def write_csv(report: BenchReport, path: Path) -> None:
    """One row per level; errors as CODE:N;CODE:N; missing values empty."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for lv in report.levels:
            data = lv.to_json()
            row: dict[str, Any] = {k: data.get(k) for k in CSV_COLUMNS}
            row["errors"] = ";".join(f"{code}:{n}" for code, n in lv.errors.items())
            for m in ("latency_ms", "first_step_ms", "step_gap_ms"):
                for k, v in data[m].items():
                    row[f"{m}_{k}"] = v
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})


def _csv_cell(value: Any) -> Any:
    """A CSV cell as the JSON report writes the value: true/false, empty for null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def write_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")


def write_plot(report: BenchReport, path: Path) -> None:
    """Latency p50 and p99 against images/s, one labelled point per level (and baseline batch)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError as e:
        raise BenchError("--plot needs matplotlib: pip install 'lcmserve[plot]'") from e
    fig = Figure(figsize=(8, 5.5), dpi=100)
    ax = fig.add_subplot()
    labels = [lv.level.label for lv in report.levels]
    xs = [lv.images_per_s for lv in report.levels]
    series = {
        "p50": ("o-", [lv.latency_ms.p50 for lv in report.levels]),
        "p99": ("s--", [lv.latency_ms.p99 for lv in report.levels]),
    }
    for name, (marker, ys) in series.items():
        ax.plot(xs, ys, marker, label=f"lcmserve {name}")
        for label, x, y in zip(labels, xs, ys):
            if math.isfinite(y):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for i, b in enumerate(report.baseline):
        label = "diffusers p50 (in-process, batch b)" if i == 0 else "_nolegend_"
        ax.plot([b.images_per_s], [b.latency_ms.p50], "^", color="black", label=label)
        ax.annotate(
            f"diffusers b={b.batch_size}",
            (b.images_per_s, b.latency_ms.p50),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=8,
        )
    shape = report.config.shape
    ax.set_title(
        f"{report.config.target or 'baseline'}: {shape.width}x{shape.height}, "
        f"{shape.num_inference_steps} steps"
    )
    ax.set_xlabel("images/s")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.margins(x=0.15, y=0.1)
    fig.savefig(path, bbox_inches="tight")


def _image_mode(shape: RequestShape) -> str:
    """", img2img strength 0.5" / ", inpainting strength 1" for a run with an init image, else ""."""
    if shape.init_image is None:
        return ""
    kind = "inpainting" if shape.mask_image is not None else "img2img"
    strength = "0.8 (server default)" if shape.strength is None else f"{shape.strength:g}"
    return f", {kind} strength {strength}"


def _adapter_mode(config: BenchConfig) -> str:
    """The header's words for per-request adapters: the mix's sets, or the one set every request sends."""
    if config.adapter_mix:
        return f", adapters: a random one of {', '.join(adapter_set_label(a) for a in config.adapter_mix)}"
    if config.shape.adapters:
        return f", adapters {adapter_set_label(adapter_weights(config.shape.adapters))}"
    return ""
