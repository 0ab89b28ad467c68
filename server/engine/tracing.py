"""The engine's side of tracing: timestamps of the requests the edge traces (Request.trace, made when
Submit.trace asks), for the spans the edge records (server/edge/tracing.py). The engine process
exports nothing. A request the edge does not trace has no RequestTrace: these calls only look at
each sample's request and return (what tracing off costs: one attribute test per sample per step).
Times are time.perf_counter() instants (CLOCK_MONOTONIC, shared with the edge process)."""

from __future__ import annotations

from ..protocol import RequestTrace
from .work import Sample


def trace_text(new: list[Sample], start: float, end: float) -> None:
    """The prompts of these new samples were encoded between start and end (at their admission)."""
    for request in {s.request for s in new if s.request.trace is not None}:
        trace = request.trace
        assert trace is not None
        if not trace.admitted and request.admitted_at is not None:
            trace.admitted = request.admitted_at
        trace.text = RequestTrace.widen(trace.text, start, end)


def trace_step(group: list[Sample], start: float, end: float) -> None:
    """One UNet step of `group` (one call) ran between start and end: an entry per traced request
    (its first sample's step index and timestep in that call, and the call's rows)."""
    traced: dict[int, Sample] = {}
    for sample in group:
        if sample.request.trace is not None:
            traced.setdefault(id(sample.request), sample)
    if not traced:
        return
    rows = sum(s.request.params.rows_per_image for s in group)  # conditional (+ unconditional) rows
    for sample in traced.values():
        trace = sample.request.trace
        assert trace is not None
        trace.steps.append((sample.step, sample.current.timestep, rows, start, end))


def trace_decode(samples: list[Sample], start: float, end: float) -> None:
    """These finished samples were decoded between start and end."""
    for request in {s.request for s in samples if s.request.trace is not None}:
        assert request.trace is not None
        request.trace.decode = RequestTrace.widen(request.trace.decode, start, end)
