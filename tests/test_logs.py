"""JSON logs and the access log (issue 24), on the session's telemetry server (LCMSERVE_LOG_FORMAT=json):
every line on stderr of both processes is a JSON object, a traced request's lines carry its trace id,
the access log has one line per request and no prompt text unless --log-prompts."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from lcmserve import Client, InvalidArgumentError
from telemetry import TelemetryServer, active_span

PROMPT = "a secret zebra crossing 7781"


def access_lines(server: TelemetryServer, seed: int, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The access lines of requests with `seed`, once `count` have been written (after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in server.log_lines() if line["logger"] == "lcmserve.access" and line["seed"] == seed]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_every_line_of_both_processes_is_json(telemetry_server: TelemetryServer) -> None:
    with Client(telemetry_server.target) as client:
        client.generate(PROMPT, num_inference_steps=1, width=64, height=64, seed=3301)
    access_lines(telemetry_server, 3301, 1)
    lines = telemetry_server.log_lines()  # (json.loads of every line)
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    processes = {line.get("process") for line in lines}
    assert {"edge", "engine"} <= processes
    assert any(line["logger"].startswith("lcmserve.engine") for line in lines)


def test_one_access_line_per_request_with_the_trace_id_and_no_prompt(telemetry_server: TelemetryServer) -> None:
    trace_id = 0x6E0C63257DE34C926F9EFCD03927272E
    with Client(telemetry_server.target, retries=0) as client:
        with active_span(trace_id, 0x1A2B3C4D5E6F7081):
            client.generate(PROMPT, num_inference_steps=2, width=64, height=64, seed=3302)
        client.generate(PROMPT, num_inference_steps=2, width=64, height=64, seed=3303, num_images=2)
        with pytest.raises(InvalidArgumentError):
            client.generate(PROMPT, num_inference_steps=2, width=65, height=64, seed=3304)
    (traced,) = access_lines(telemetry_server, 3302, 1)
    assert traced["trace_id"] == f"{trace_id:032x}" and len(traced["span_id"]) == 16
    assert traced["transport"] == "grpc" and traced["method"] == "lcmserve.v1.GenerationService/Generate"
    assert traced["status"] == "OK" and traced["images"] == 1 and traced["ms"] > 0
    assert traced["peer"] and traced["level"] == "INFO" and len(traced["request_id"]) == 16
    (plain,) = access_lines(telemetry_server, 3303, 1)
    assert plain["images"] == 2 and plain["request_id"] != traced["request_id"]
    (refused,) = access_lines(telemetry_server, 3304, 1)
    assert refused["status"] == "INVALID_ARGUMENT" and refused["images"] == 0
    time.sleep(0.5)  # nothing more comes for them
    for seed in (3302, 3303, 3304):
        assert len(access_lines(telemetry_server, seed, 1, timeout=0)) == 1
    assert all(PROMPT not in str(line) for line in telemetry_server.log_lines())


def test_http_calls_leave_access_lines_too(telemetry_server: TelemetryServer) -> None:
    http = telemetry_server.server.http_target
    if not http:
        pytest.skip("no HTTP front door in this build")

    trace_id = 0x7A1C3E5F2B4D6A8C9E0F1A2B3C4D5E6F

    def post(body: bytes) -> int:  # Server-Sent Events (the response streams from a task of its own)
        request = urllib.request.Request(f"http://{http}/v1/generate", data=body, method="POST", headers={
            "content-type": "application/json", "accept": "text/event-stream",
            "traceparent": f"00-{trace_id:032x}-{0x2B3C4D5E6F708192:016x}-01"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def refused() -> list[dict[str, Any]]:
        return [line for line in telemetry_server.log_lines() if line["logger"] == "lcmserve.access"
                and line["transport"] == "http" and line["status"] == "INVALID_ARGUMENT"]

    before = len(refused())
    body = {"prompt": PROMPT, "num_inference_steps": 1, "width": 64, "height": 64, "seed": 3305}
    assert post(json.dumps(body).encode()) == 200
    assert post(b"{not json") == 400
    (served,) = access_lines(telemetry_server, 3305, 1)
    assert (served["transport"], served["method"], served["status"], served["images"]) == (
        "http", "POST /v1/generate", "OK", 1)
    assert served["peer"].startswith("127.0.0.1:")
    assert served["trace_id"] == f"{trace_id:032x}" and len(served["request_id"]) == 16  # (ids set explicitly)
    deadline = time.monotonic() + 10
    while len(refused()) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(refused()) == before + 1 and refused()[-1]["method"] == "POST /v1/generate"
    assert all(PROMPT not in str(line) for line in telemetry_server.log_lines())
