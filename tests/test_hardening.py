"""A server other backends can trust (issue 10), on real servers on port 0: stops that lose nothing,
a clear exit 2 for every start-up failure, an iteration fault (out of memory) that fails only its
batch, a queue that counts only what the batch cannot take, limits, and metrics that add up."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from conftest import REPO, ServerProcess
from test_lifecycle import _engine_pid, linux_only

from lcmserve import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    LcmServeError,
    ResourceExhaustedError,
    StepEvent,
    UnavailableError,
)

SMALL = dict(num_inference_steps=1, width=64, height=64)
OOM_SEED = 668
STATUSES = ("OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
            "CANCELLED", "INTERNAL")


def _serve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`lcmserve serve ...` expected to fail at start-up."""
    return subprocess.run([sys.executable, "-m", "lcmserve.cli", "serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _one_clear_line(done: subprocess.CompletedProcess[str]) -> str:
    """The process exited 2 with exactly one `lcmserve serve:` line and no traceback; returns that line."""
    assert done.returncode == 2, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("lcmserve serve:")]
    assert len(ours) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    return ours[0]


# ---- binding and start-up failures -------------------------------------------------------------------


def test_a_taken_grpc_port_is_refused_with_one_line(tiny_server: str) -> None:
    line = _one_clear_line(_serve("--model", "tiny", "--port", tiny_server.rsplit(":", 1)[1], "--metrics-port", "-1"))
    assert tiny_server in line and "--port" in line and "in use" in line


def test_a_taken_metrics_port_is_refused_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_clear_line(_serve("--model", "tiny", "--port", "0", "--metrics-port", str(port)))
    assert f"127.0.0.1:{port}" in line and "--metrics-port" in line


def test_a_taken_port_is_refused_before_torch_is_imported() -> None:
    """The edge imports no torch: a port in use is reported at once, not after seconds of imports (issue 20)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = ("import sys\nfrom lcmserve.cli import main\n"
                f"status = main(['serve', '--model', 'tiny', '--port', '{port}', '--metrics-port', '-1'])\n"
                "print('loaded:', sorted(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
                "sys.exit(status)\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    line = _one_clear_line(done)
    assert f"127.0.0.1:{port}" in line and "--port" in line and "in use" in line
    assert "loaded: []" in done.stdout, done.stdout


def test_a_hub_model_that_does_not_load_is_reported_whole() -> None:
    """The hub's reason is not cut short (it was, mid-word, at 200 characters: issue 20)."""
    from lcmserve.export.errors import ExportError
    from lcmserve.export.loading import load_pipeline

    with pytest.raises(ExportError) as info:
        load_pipeline("some-org/not-cached-model")  # HF_HUB_OFFLINE=1 (conftest): nothing to load
    reason = " ".join(str(info.value.__cause__).split())
    assert reason in str(info.value)


@pytest.mark.parametrize("args", [["--model", "/nonexistent/model"], ["--model", "some-org/not-cached-model"],
                                  ["--model", "tiny", "--lora", "/nonexistent/lora.safetensors"]],
                         ids=["missing-folder", "offline-hub-id", "missing-lora"])
def test_load_failures_are_one_line_and_exit_2(args: list[str]) -> None:
    line = _one_clear_line(_serve(*args, "--port", "0", "--metrics-port", "-1"))
    assert "could not load the model" in line


# ---- stops that lose nothing --------------------------------------------------------------------------


@linux_only
def test_sigterm_to_the_engine_or_the_process_group_loses_nothing(tiny_artifact, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The server leads a process group of its own, as under systemd or `docker stop` of a shell
    # entrypoint, so that `kill -TERM -PGID` reaches the edge and the engine process together.
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: popen(*a, start_new_session=True, **k))
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1", "--drain-timeout", "120")
    monkeypatch.undo()
    try:
        with Client(server.target, timeout=120) as client:
            stream = client.stream("in flight", seed=1, num_inference_steps=8, width=128, height=128)
            assert isinstance(next(stream), StepEvent)
            os.kill(_engine_pid(server), signal.SIGTERM)  # the engine ignores it: the edge alone decides
            assert type(list(stream)[-1]).__name__ == "Summary"
            assert client.health_status() == "SERVING"

        results: list[object] = []
        started = threading.Barrier(17)

        def one(i: int) -> None:
            try:
                with Client(server.target, timeout=120) as c:
                    events = c.stream("group stop", seed=100 + i, num_inference_steps=8, width=64, height=64)
                    first = next(events)
                    started.wait(60)
                    results.append([first, *events])
            except Exception as exc:  # noqa: BLE001 - counted below
                results.append(exc)
                started.abort()

        workers = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for w in workers:
            w.start()
        started.wait(120)  # all 16 have their first step event: in flight
        os.killpg(server.proc.pid, signal.SIGTERM)
        for w in workers:
            w.join(120)
        failures = [r for r in results if isinstance(r, Exception)]
        assert not failures and len(results) == 16
        assert all(type(r[-1]).__name__ == "Summary" for r in results)  # type: ignore[index]
        assert server.proc.wait(60) == 0
    finally:
        server.kill()


def test_a_drain_that_times_out_exits_non_zero(tiny_artifact) -> None:  # type: ignore[no-untyped-def]
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1", "--drain-timeout", "0.5")
    try:
        with Client(server.target, timeout=120) as client:
            stream = client.stream("too slow to drain", num_inference_steps=8, width=1024, height=1024,
                                   guidance_scale=2.0)
            assert isinstance(next(stream), StepEvent)
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(UnavailableError):
                list(stream)
        assert server.proc.wait(60) == 1  # something was dropped: the supervisor must know
    finally:
        server.kill()


# ---- one server for faults, queueing, limits and metrics ---------------------------------------------


@pytest.fixture(scope="module")
def hard_server(tiny_artifact) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    env = os.environ.copy()
    os.environ["LCMSERVE_FAULT_INJECTION"] = f"iteration_oom_seed={OOM_SEED}"
    try:
        server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "0", "--max-queued-requests", "4")
    finally:
        os.environ.clear()
        os.environ.update(env)
    yield server
    server.stop()


def _scrape(server: ServerProcess) -> str:
    match = re.search(r"metrics on (http://\S+)", server.log())
    assert match, server.log()
    return urllib.request.urlopen(match.group(1), timeout=10).read().decode()


def _counts(server: ServerProcess) -> Counter[str]:
    counts: Counter[str] = Counter()
    for name, value in re.findall(r'^lcmserve_inference_request_total\{status="(\w+)",transport="grpc"\} (\S+)$', _scrape(server),
                                  re.MULTILINE):
        counts[name] = int(float(value))
    return counts


def test_metrics_bind_the_grpc_host_and_cover_both_processes(hard_server: ServerProcess) -> None:
    assert "metrics on http://127.0.0.1:" in hard_server.log()  # --metrics-host defaults to --host, not 0.0.0.0
    text = _scrape(hard_server)
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total",
                 "lcmserve_engine_process_resident_memory_bytes"):
        assert re.search(rf"^{name} \d", text, re.MULTILINE), name
    for status in STATUSES:  # every final status is a series from the start
        assert f'lcmserve_inference_request_total{{status="{status}",transport="grpc"}}' in text


def test_out_of_memory_fails_only_its_batch_with_a_retry_hint(hard_server: ServerProcess) -> None:
    with Client(hard_server.target, timeout=60) as client:
        with pytest.raises(ResourceExhaustedError, match="out of memory") as info:
            client.generate("too big", seed=OOM_SEED, num_inference_steps=4, width=64, height=64)
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        assert client.health_status() == "SERVING"
        assert len(client.generate("next batch", seed=5, num_inference_steps=2, width=64, height=64).images) == 1


def test_max_queued_requests_counts_only_what_the_batch_cannot_take(hard_server: ServerProcess) -> None:
    """64 one-image requests at once, a 32-row batch and --max-queued-requests 4: at least 32 + 4 run."""

    async def run() -> list[object]:
        async with AsyncClient(hard_server.target, timeout=120) as client:
            await client.wait_until_ready()
            calls = [client.generate("crowd", seed=i, num_inference_steps=4, width=64, height=64) for i in range(64)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    outcomes = asyncio.run(run())
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert all(isinstance(o, ResourceExhaustedError) for o in refused), refused[:3]
    assert len(outcomes) - len(refused) >= 36, f"{len(refused)} of 64 refused"


def test_a_request_over_the_receive_limit_is_refused_unread(hard_server: ServerProcess) -> None:
    with Client(hard_server.target, timeout=60) as client:
        with pytest.raises(ResourceExhaustedError):
            client.generate("x" * (16 * 2**20), **SMALL)  # far beyond the largest valid request
        assert client.generate("still serving", **SMALL).images


def test_metric_counters_equal_what_the_clients_saw(hard_server: ServerProcess) -> None:
    before = _counts(hard_server)
    seen: Counter[str] = Counter()
    with Client(hard_server.target, timeout=120, retries=0) as client:  # one RPC per call: counts compare
        for i in range(3):
            client.generate("fine", seed=i, **SMALL)
            seen["OK"] += 1
        for bad in (dict(SMALL, num_inference_steps=0), dict(SMALL, width=65)):
            with pytest.raises(InvalidArgumentError):
                client.generate("bad", **bad)  # type: ignore[arg-type]
            seen["INVALID_ARGUMENT"] += 1
        with grpc.insecure_channel(hard_server.target) as channel:
            raw = channel.unary_stream("/lcmserve.v1.GenerationService/Generate")
            with pytest.raises(grpc.RpcError) as undecodable:
                list(raw(b"\x0a\x05\xff\xfe\xfd", timeout=30))  # a prompt that is not UTF-8
            assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            seen["INVALID_ARGUMENT"] += 1
        for i in range(2):
            stream = client.stream("cancel me", seed=10 + i, num_inference_steps=8, width=256, height=256)
            assert isinstance(next(stream), StepEvent)
            stream.close()
            seen["CANCELLED"] += 1
        for i in range(2):
            with pytest.raises(DeadlineExceededError):
                client.generate("expire", seed=20 + i, num_inference_steps=8, width=1024, height=1024,
                                guidance_scale=2.0, timeout=0.5)
            seen["DEADLINE_EXCEEDED"] += 1
        with pytest.raises(ResourceExhaustedError):
            client.generate("oom", seed=OOM_SEED, num_inference_steps=4, width=64, height=64)
        seen["RESOURCE_EXHAUSTED"] += 1
    deadline = time.monotonic() + 15  # a cancelled call's handler ends a moment after the client moved on
    while True:
        after = _counts(hard_server)
        delta = {s: after[s] - before[s] for s in STATUSES if after[s] - before[s]}
        if delta == dict(seen) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta == dict(seen)


def test_errors_reach_the_client_as_lcmserve_errors(hard_server: ServerProcess) -> None:
    """An undecodable request through the SDK's own error mapping: INVALID_ARGUMENT, no class names."""
    with grpc.insecure_channel(hard_server.target) as channel:
        raw = channel.unary_stream("/lcmserve.v1.GenerationService/Generate")
        with pytest.raises(grpc.RpcError) as info:
            list(raw(b"\xff" * 7, timeout=30))
    from lcmserve.errors import from_rpc_error

    error = from_rpc_error(info.value)
    assert isinstance(error, InvalidArgumentError) and isinstance(error, LcmServeError)
    assert "<class" not in str(error) and "DecodeError" not in str(error)


@linux_only
def test_the_edge_process_never_loads_torch(hard_server: ServerProcess) -> None:
    """Serving, the edge process has no torch in it (what crosses the pipe is torch-free: protocol.py)."""
    with Client(hard_server.target, timeout=60) as client:
        assert len(client.generate("edge", seed=2, **SMALL).images) == 1  # type: ignore[arg-type]
        client.model_info()
    maps = pathlib.Path(f"/proc/{hard_server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps


# ---- the server's gRPC settings (no server needed) ---------------------------------------------------


def test_server_options_refuse_shared_ports_and_bound_messages() -> None:
    from lcmserve.server.edge.app import App
    from lcmserve.server.config import EngineConfig, Limits, ServerConfig

    options = dict(App(ServerConfig(max_connection_age_s=300, max_concurrent_rpcs=64, metrics_port=None),
                       EngineConfig(), Limits(), "test").server_options())
    assert options["grpc.so_reuseport"] == 0
    assert 2 * 2**20 < options["grpc.max_receive_message_length"] < 8 * 2**20  # a few MiB, not 64
    assert 3 * 2**20 < options["grpc.max_send_message_length"] < 4 * 2**20  # a RAW 1024x1024 image and more
    assert options["grpc.max_concurrent_streams"] == 64
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 10_000  # pings every 10 s are fine
    assert options["grpc.max_connection_age_ms"] == 300_000 and options["grpc.max_connection_age_grace_ms"] > 0


def test_token_check_accepts_only_listed_bearer_tokens() -> None:
    from lcmserve.server.edge.service import TokenAuth

    auth = TokenAuth(["alpha", "beta"])
    assert auth.allowed((("authorization", "Bearer alpha"),)) and auth.allowed((("authorization", "bearer beta"),))
    for metadata in ((), (("authorization", "Bearer gamma"),), (("authorization", "alpha"),),
                     (("authorization", "Basic alpha"),), (("x-token", "Bearer alpha"),),
                     (("authorization", "Bearer alph"),), (("authorization", "Bearer "),)):
        assert not auth.allowed(metadata), metadata
    with pytest.raises(ValueError):
        TokenAuth([])


def test_token_check_reads_the_header_value_of_any_transport() -> None:
    from lcmserve.server.edge.auth import TokenCheck, unauthenticated

    check = TokenCheck(["alpha"])
    assert check.allows("Bearer alpha") and check.allows(b"BEARER alpha")
    assert not check.allows(None) and not check.allows("Bearer beta") and not check.allows("alpha")
    assert unauthenticated("header").status.name == "UNAUTHENTICATED" and "header" in unauthenticated("header").message


def test_refusals_render_as_grpc_statuses_with_their_details() -> None:
    from google.rpc import error_details_pb2, status_pb2

    from lcmserve.server.edge.convert import status
    from lcmserve.server.edge.core import failure_refusal
    from lcmserve.server.edge.status import Refusal, Status

    plain = status(Refusal(Status.UNAVAILABLE, "the model is still loading"))
    assert plain == (grpc.StatusCode.UNAVAILABLE, "the model is still loading", ())
    bad = status(Refusal(Status.INVALID_ARGUMENT, "invalid request: width: is 7", violations=(("width", "is 7"),)))
    rich = status_pb2.Status.FromString(dict(bad.trailing_metadata)["grpc-status-details-bin"])  # type: ignore[arg-type]
    violation = error_details_pb2.BadRequest()
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and rich.details[0].Unpack(violation)
    assert (violation.field_violations[0].field, violation.field_violations[0].description) == ("width", "width is 7")
    full = status(failure_refusal(Status.RESOURCE_EXHAUSTED, "queue full"))
    retry = error_details_pb2.RetryInfo()
    assert status_pb2.Status.FromString(dict(full.trailing_metadata)["grpc-status-details-bin"]).details[0].Unpack(retry)  # type: ignore[arg-type]
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry.retry_delay.ToNanoseconds() == 100_000_000
