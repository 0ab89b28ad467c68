"""Health, reflection, model info, metrics, and drain on SIGTERM, on a real server process."""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import threading
import time

import grpc
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lcmserve import Client, UnavailableError


def test_health_reflection_and_model_info(tiny_server: str, tiny_artifact) -> None:
    with grpc.insecure_channel(tiny_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lcmserve.v1.GenerationService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"lcmserve.v1.GenerationService", "grpc.health.v1.Health"} <= names
    with Client(tiny_server) as client:
        info = client.model_info()
        assert client.health()
    assert info.base == "tiny" and info.backend == "eager" and info.dtype == "float32" and info.device == "cpu"
    assert len(info.loras) == 1 and info.loras[0].scale == pytest.approx(0.8) and len(info.loras[0].sha256) == 64
    assert info.limits.max_steps == 8 and info.limits.max_side == 1024 and info.limits.side_multiple == 8


def test_sigterm_drains_in_flight_requests_then_exits(tiny_artifact) -> None:
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1", "--drain-timeout", "300")
    results: list = []
    errors: list = []

    def long_request() -> None:
        try:
            with Client(server.target) as client:
                results.append(client.generate("drain me", num_inference_steps=4, width=256, height=256, seed=5))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=long_request)
    with Client(server.target) as client:
        stream = client.stream("probe", num_inference_steps=8, width=256, height=256)
        next(stream)  # the server is busy with in-flight work now
        worker.start()
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight request still finishes
    worker.join(120)
    assert rest and type(rest[-1]).__name__ == "Summary"
    assert not errors and results and len(results[0].images) == 1
    with pytest.raises(UnavailableError), Client(server.target) as late:
        late.generate("too late", num_inference_steps=1, width=64, height=64, timeout=5)
    assert server.proc.wait(60) == 0
    server.stop()


# --- the engine process (server/edge/engine_process.py) -------------------------------------------------

def _engine_pids(server: ServerProcess) -> list[int]:
    """The server's children that run engines (multiprocessing's spawn_main)."""
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server.proc.pid and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _engine_pid(server: ServerProcess) -> int:
    """The server's child that runs the engine."""
    pids = _engine_pids(server)
    if not pids:
        raise AssertionError(f"no engine process under {server.proc.pid}")
    return pids[0]


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):  # exited; only waiting for a reaper
            return True
        time.sleep(0.2)
    return False


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _assert_not_serving_within_10_s(client: Client) -> None:
    """After an engine death: health turns NOT_SERVING within 10 s and new work is refused UNAVAILABLE."""
    deadline = time.monotonic() + 10
    while client.health_status() == "SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.health_status() == "NOT_SERVING"
    with pytest.raises(UnavailableError, match="not serving"):
        client.generate("after", num_inference_steps=1, width=64, height=64, timeout=10)


@linux_only
def test_engine_process_death_fails_in_flight_requests_and_health(tiny_artifact) -> None:
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1")
    try:
        with Client(server.target) as client:
            stream = client.stream("doomed", num_inference_steps=8, width=256, height=256)
            next(stream)
            os.kill(_engine_pid(server), signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(UnavailableError, match="engine process exited"):
                list(stream)
            _assert_not_serving_within_10_s(client)
        # Fail fast (issue 10): the server exits non-zero by itself, so that its supervisor restarts it.
        assert server.proc.wait(max(0.0, killed_at + 10 - time.monotonic())) != 0
    finally:
        server.kill()


def test_engine_loop_death_fails_in_flight_requests_and_health(tiny_artifact, monkeypatch) -> None:
    """The loop thread dies inside a live engine process (an exception that escapes the loop, not a
    failed batch): exactly as a dead process, health turns NOT_SERVING and in-flight work UNAVAILABLE."""
    monkeypatch.setenv("LCMSERVE_FAULT_INJECTION", "loop_death_seed=666")
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1")
    try:
        with Client(server.target) as client, Client(server.target) as killer:
            stream = client.stream("in flight", seed=1, num_inference_steps=8, width=256, height=256)
            next(stream)
            with pytest.raises(UnavailableError, match="engine loop died"):
                killer.generate("the fault", seed=666, num_inference_steps=1, width=64, height=64, timeout=60)
            with pytest.raises(UnavailableError, match="engine loop died"):
                list(stream)
            _assert_not_serving_within_10_s(client)
    finally:
        server.kill()


def test_injected_iteration_fault_fails_only_that_batch(tiny_artifact, monkeypatch) -> None:
    from lcmserve import InternalError

    monkeypatch.setenv("LCMSERVE_FAULT_INJECTION", "iteration_fault_seed=667")
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1")
    try:
        with Client(server.target) as client:
            with pytest.raises(InternalError, match="injected iteration fault"):
                client.generate("bad batch", seed=667, num_inference_steps=2, width=64, height=64, timeout=60)
            assert client.health_status() == "SERVING"
            after = client.generate("next batch", seed=5, num_inference_steps=2, width=64, height=64, timeout=60)
            assert len(after.images) == 1
    finally:
        server.stop()


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_engine_process_never_outlives_the_server(tiny_artifact, sig: int) -> None:
    """...and an idle server is gone within 3 s of SIGTERM (issue 20): an idle drain takes well under
    a second, then the two processes exit (the engine's without tearing its model down object by object)."""
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1")
    try:
        engine = _engine_pid(server)
        signalled = time.monotonic()
        server.stop(sig)
        took = time.monotonic() - signalled
        assert _gone(engine, 30), f"engine process {engine} still runs after the server got {sig!r}"
        assert took < 3, f"the idle server took {took:.1f} s to exit after {sig!r}:\n{server.log()}"
    finally:
        server.kill()


def _allowed_cpus(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of `pid`."""
    lists = set()
    for status in pathlib.Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split()[1])
    return lists


@linux_only
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs 2 CPUs")
def test_engine_process_and_edge_get_cpus_of_their_own(tiny_artifact) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    first, rest = str(cpus[0]), f"{cpus[1]}-{cpus[-1]}" if len(cpus) > 2 else str(cpus[1])
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1")
    try:
        assert _allowed_cpus(server.proc.pid) == {first}
        assert _allowed_cpus(_engine_pid(server)) == {rest}
    finally:
        server.stop()
    unpinned = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1", "--no-cpu-pinning")
    try:
        assert first not in _allowed_cpus(unpinned.proc.pid)
        assert first not in _allowed_cpus(_engine_pid(unpinned))
    finally:
        unpinned.stop()
