"""Bad input gets INVALID_ARGUMENT naming the field; overload, cancel and deadline are handled; the
server goes on serving through all of it."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from conftest import ServerProcess
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lcmserve import Client, InvalidArgumentError, ResourceExhaustedError, StepEvent
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc

BAD = [
    # (field, request fields)
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt="x" * 2001)),
    ("negative_prompt", dict(negative_prompt="x" * 2001)),
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("num_inference_steps", dict(num_inference_steps=9)),
    ("guidance_scale", dict(guidance_scale=0.5)),
    ("guidance_scale", dict(guidance_scale=25.0)),
    ("guidance_scale", dict(guidance_scale=float("nan"))),
    ("width", dict(width=65)),
    ("width", dict(width=2048)),
    ("height", dict(height=32)),
    ("num_images", dict(num_images=0)),
    ("num_images", dict(num_images=9)),
    ("seed", dict(seed=2**63)),
    ("quality", dict(quality=0)),
    ("output_format", dict(output_format=42)),
    ("preview_mode", dict(preview_mode=42)),
]


@pytest.mark.parametrize(("field", "fields"), BAD, ids=[f"{f}={list(v.values())[0]!r:.12}" for f, v in BAD])
def test_invalid_field_is_named(tiny_server: str, field: str, fields: dict) -> None:
    request = pb.GenerateRequest(**{"prompt": "a wall", "width": 64, "height": 64, **fields})
    with grpc.insecure_channel(tiny_server) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=30))
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    status = rpc_status.from_call(error)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == [field]
    # the value and the limit are both named
    assert any(ch.isdigit() for ch in bad_request.field_violations[0].description)
    with Client(tiny_server) as client:  # and the server goes on serving
        assert client.generate("a wall", num_inference_steps=1, width=64, height=64).images


def test_sdk_reports_every_violation(tiny_server: str) -> None:
    with Client(tiny_server) as client, pytest.raises(InvalidArgumentError) as info:
        client.generate("a wall", num_inference_steps=12, width=70, height=64)
    fields = sorted(v.field for v in info.value.field_violations)
    assert fields == ["num_inference_steps", "width"]
    assert "12" in str(info.value) and "70" in str(info.value)


def test_long_prompt_truncation_is_reported(tiny_server: str) -> None:
    with Client(tiny_server) as client:
        short = client.generate("a wall", num_inference_steps=1, width=64, height=64)
        long = client.generate(" ".join(["crack"] * 200), num_inference_steps=1, width=64, height=64)
    assert not short.summary.prompt_truncated
    assert long.summary.prompt_truncated and long.summary.prompt_tokens > 77


@pytest.fixture(scope="module")
def small_server(tiny_artifact) -> ServerProcess:  # type: ignore[no-untyped-def]
    """A server whose batch holds one guided image and whose queue holds one request."""
    server = ServerProcess("--model", str(tiny_artifact), "--max-batch-size", "2", "--max-queued-requests", "1",
                           "--metrics-port", "0", "--log-level", "DEBUG")
    yield server
    server.stop()


def _metrics(server: ServerProcess) -> str:
    for line in server.log().splitlines():
        if "metrics on http://" in line:
            url = line.split("metrics on ")[-1].strip()
            return urllib.request.urlopen(url.replace("0.0.0.0", "127.0.0.1"), timeout=10).read().decode()
    raise AssertionError("no metrics line in the server log")


def test_full_queue_is_refused_at_once_and_cancel_frees_the_batch(small_server: ServerProcess) -> None:
    target = small_server.target
    big = dict(num_inference_steps=8, width=1024, height=1024, guidance_scale=2.0)
    with Client(target) as a, Client(target) as b, Client(target, retries=0) as c:  # c: one RPC, no retry
        running = a.stream("first", seed=1, **big)
        assert isinstance(next(running), StepEvent)  # admitted: the batch (2 rows) is full
        waiting_result: list = []
        waiter = threading.Thread(target=lambda: waiting_result.append(
            b.generate("second", seed=2, num_inference_steps=1, width=64, height=64)))
        waiter.start()
        time.sleep(1.0)  # "second" is now queued behind "first"
        start = time.monotonic()
        with pytest.raises(ResourceExhaustedError) as info:
            c.generate("third", seed=3, num_inference_steps=1, width=64, height=64)
        assert time.monotonic() - start < 5, "refused at once, not after waiting"
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        running.close()  # cancel "first" midway: its rows free up, "second" runs
        waiter.join(120)
        assert waiting_result and len(waiting_result[0].images) == 1
    metrics = _metrics(small_server)
    assert 'lcmserve_inference_request_total{status="CANCELLED",transport="grpc"} 1.0' in metrics
    assert 'lcmserve_inference_request_total{status="RESOURCE_EXHAUSTED",transport="grpc"} 1.0' in metrics


def test_deadline_stops_the_work(small_server: ServerProcess) -> None:
    from lcmserve import DeadlineExceededError

    with Client(small_server.target) as client:
        with pytest.raises(DeadlineExceededError):
            client.generate("slow", num_inference_steps=8, width=1024, height=1024, guidance_scale=2.0, timeout=0.5)
        assert client.generate("fast", num_inference_steps=1, width=64, height=64).images
