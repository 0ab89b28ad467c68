"""The session's observed server (tests/conftest.py `telemetry_server`): the tiny artifact served with
traces exported to a loopback OTLP receiver, JSON logs, metrics and the HTTP front door, configured
through LCMSERVE_* variables (the environment layer's smoke start), for test_tracing, test_logs,
test_env_config and test_dashboard."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from otlp_receiver import OtlpReceiver

ENV = {"LCMSERVE_LOG_FORMAT": "json", "LCMSERVE_METRICS_PORT": "0", "LCMSERVE_HTTP_PORT": "0",
       "OTEL_BSP_SCHEDULE_DELAY": "100"}  # spans leave the server within 0.1 s


@dataclass
class TelemetryServer:
    server: Any  # conftest.ServerProcess
    receiver: OtlpReceiver

    @property
    def target(self) -> str:
        return str(self.server.target)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stderr line so far, each parsed as JSON (a line that is not fails the caller)."""
        self.server._log.flush()
        text = pathlib.Path(self.server.log_path).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def metrics(self) -> str:
        for line in self.log_lines():
            if line["message"].startswith("metrics on http://"):
                url = line["message"].split("metrics on ")[-1].strip()
                return urllib.request.urlopen(url, timeout=10).read().decode()
        raise AssertionError("no 'metrics on' line in the server log")


def start(server_process: Any, artifact: pathlib.Path) -> Iterator[TelemetryServer]:
    receiver = OtlpReceiver()
    env = {**ENV, "LCMSERVE_MODEL": str(artifact), "LCMSERVE_OTLP_ENDPOINT": receiver.url}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # the server process inherits them; nothing on its command line but --port 0
    try:
        server = server_process()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield TelemetryServer(server, receiver)
    finally:
        server.stop()
        receiver.close()


@contextlib.contextmanager
def active_span(trace_id: int, span_id: int) -> Iterator[None]:
    """The caller's OpenTelemetry context: a sampled span with these ids (the API only, no SDK)."""
    parent = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=False, trace_flags=TraceFlags(1))
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        yield
    finally:
        context.detach(token)
