"""W3C trace context on the SDK's calls: when the caller has an active OpenTelemetry span, its
`traceparent` (and `tracestate`, baggage: whatever the configured propagators write) goes with each
call's metadata, so the server's span is a child of the caller's. opentelemetry-api is optional
(`pip install 'lcmserve[otel]'`); without it, or without an active span, the metadata is unchanged.
"""

from __future__ import annotations

from typing import Any

Metadata = tuple[tuple[str, str], ...]

_inject: Any = None  # opentelemetry.propagate.inject once imported; False when it is not installed


def with_trace_context(metadata: Metadata) -> Metadata:
    """`metadata` plus the current OpenTelemetry context's propagation headers, if any."""
    global _inject
    if _inject is None:
        try:
            from opentelemetry import propagate
        except ImportError:
            _inject = False
        else:
            _inject = propagate.inject
    if _inject is False:
        return metadata
    carrier: dict[str, str] = {}
    _inject(carrier)  # writes nothing without an active, valid span context
    if not carrier:
        return metadata
    return metadata + tuple((key.lower(), value) for key, value in carrier.items())
