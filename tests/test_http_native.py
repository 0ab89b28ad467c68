"""The HTTP front door's native routes with a raw HTTP client (httpx), one server for the module:
/v1/generate as Server-Sent Events and as one JSON document, /v1/models, /health, /ready, a client
that disconnects mid-stream frees its rows, and SIGTERM drains HTTP streams in flight (last: it
stops the server)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pathlib
import re
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import ServerProcess
from PIL import Image

REQUEST = {"prompt": "a crack in a wall", "width": 64, "height": 64, "seed": 3, "num_inference_steps": 4,
           "output_format": "OUTPUT_FORMAT_PNG", "preview_mode": "PREVIEW_MODE_APPROX"}


@pytest.fixture(scope="module")
def server(tiny_artifact: pathlib.Path) -> Iterator[ServerProcess]:
    process = ServerProcess("--model", str(tiny_artifact), "--http-port", "0", "--metrics-port", "0")
    try:
        yield process
    finally:
        process.stop()


def _url(server: ServerProcess, path: str) -> str:
    return f"http://{server.http_target}{path}"


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, object]]]:
    """(event, data as JSON) of a Server-Sent Events stream's lines; comments (pings) skipped."""
    event, data = "message", ""
    for line in lines:
        if not line:
            if data:
                yield event, json.loads(data)
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def _metrics(server: ServerProcess) -> str:
    found = re.search(r"metrics on (http://\S+)", server.log())
    assert found, server.log()
    return httpx.get(found.group(1), timeout=10).text


def _value(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_native_route_streams_events_and_answers_one_document(server: ServerProcess) -> None:
    with httpx.stream("POST", _url(server, "/v1/generate"), json=REQUEST, timeout=60,
                      headers={"accept": "text/event-stream"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response.iter_lines()))
    assert [name for name, _ in events] == ["step"] * 4 + ["image", "summary"]
    assert [e["step"]["step"] for _, e in events[:4]] == [0, 1, 2, 3]  # type: ignore[index]
    image = events[4][1]["image"]
    assert isinstance(image, dict) and image["seed"] == "3"  # uint64: a string in protobuf's JSON mapping
    picture = base64.b64decode(image["picture"]["data"])
    assert Image.open(io.BytesIO(picture)).size == (64, 64)

    document = httpx.post(_url(server, "/v1/generate"), json=REQUEST, timeout=60).json()
    responses = document["responses"]
    assert [next(iter(r)) for r in responses] == ["step"] * 4 + ["image", "summary"]
    assert responses[4]["image"]["picture"]["data"] == image["picture"]["data"]  # same seed, same bytes

    bad = httpx.post(_url(server, "/v1/generate"), json={**REQUEST, "width": 65, "num_inference_steps": 99})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["param"] == "num_inference_steps" or error["param"] == "width"
    assert {v["param"] for v in error["violations"]} == {"width", "num_inference_steps"}
    unknown = httpx.post(_url(server, "/v1/generate"), json={**REQUEST, "wdith": 64})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "wdith"


def test_models_health_ready(server: ServerProcess) -> None:
    models = httpx.get(_url(server, "/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert models["data"][0]["loras"] and models["data"][0]["loras"][0]["scale"] == pytest.approx(0.8)
    assert httpx.get(_url(server, "/health")).json() == {"status": "alive"}
    assert httpx.get(_url(server, "/ready")).json() == {"status": "SERVING"}
    info = httpx.get(_url(server, "/v1/info")).json()
    assert info["limits"]["max_side"] == 1024 and "DECODER_VAE" in info["decoders"]
    missing = httpx.get(_url(server, "/v2/nothing"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_client_that_disconnects_mid_stream_frees_its_rows(server: ServerProcess) -> None:
    long = {**REQUEST, "num_images": 8, "num_inference_steps": 8, "width": 128, "height": 128,
            "preview_mode": "PREVIEW_MODE_NONE"}
    before = _metrics(server)
    with httpx.stream("POST", _url(server, "/v1/generate"), json=long, timeout=60,
                      headers={"accept": "text/event-stream"}) as response:
        first = next(sse_events(response.iter_lines()))
        assert first[0] == "step"
    # (the connection is closed here, after the first step: its 8 rows must leave the batch)
    cancelled = 'lcmserve_inference_request_total{status="CANCELLED",transport="http"}'
    deadline = time.monotonic() + 30
    while _value(_metrics(server), cancelled) < 1:
        assert time.monotonic() < deadline, "the disconnect was never seen as a cancellation"
        time.sleep(0.2)
    calls = "lcmserve_inference_batch_size_count"
    settled = _metrics(server)
    while True:  # at most one more step runs with its rows; then no UNet call at all
        time.sleep(0.5)
        after = _metrics(server)
        if _value(after, calls) == _value(settled, calls):
            break
        assert time.monotonic() < deadline, "UNet calls go on after the client left"
        settled = after
    rows = _value(after, "lcmserve_inference_batch_size_sum") - _value(before, "lcmserve_inference_batch_size_sum")
    assert rows < 8 * 8, f"{rows} rows ran: the request was not stopped early"


def test_bench_drives_the_http_route_with_the_same_report(server: ServerProcess) -> None:
    from lcmserve.bench import BenchConfig, Level, RequestShape, run_bench

    config = BenchConfig(target=f"http://{server.http_target}", levels=(Level(concurrency=2),), requests=4, warmup=0,
                         shape=RequestShape(width=64, height=64, num_inference_steps=2), progress=False)
    report = asyncio.run(run_bench(config))
    level = report.levels[0]
    assert level.ok == 4 and level.failed == 0, level
    assert report.server is not None and report.server["base"]


def test_sigterm_drains_http_streams_in_flight(server: ServerProcess) -> None:
    """Last: it stops the module's server."""
    started = threading.Barrier(3)
    results: list[list[str]] = []

    def stream(seed: int) -> None:
        names: list[str] = []
        body = {**REQUEST, "seed": seed, "num_inference_steps": 8, "width": 128, "height": 128, "num_images": 2}
        with httpx.stream("POST", _url(server, "/v1/generate"), json=body, timeout=120,
                          headers={"accept": "text/event-stream"}) as response:
            for name, _ in sse_events(response.iter_lines()):
                if not names:
                    started.wait(60)
                names.append(name)
        results.append(names)

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in (21, 22)]
    for thread in threads:
        thread.start()
    started.wait(60)  # both streams have their first step
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while httpx.get(_url(server, "/ready"), timeout=10).status_code != 503:  # draining
        assert time.monotonic() < deadline, "SIGTERM did not start a drain"
        time.sleep(0.05)
    refused = httpx.post(_url(server, "/v1/generate"), json=REQUEST, timeout=30)  # draining: 503, not served
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
    for thread in threads:
        thread.join(120)
    assert server.stop() == 0, server.log()
    assert len(results) == 2
    for names in results:
        assert names[-1] == "summary" and names.count("image") == 2 and "error" not in names
