"""Scale-out (issue 12): one client balancing over three servers through a kill and a drain, and one
server over two CPU engines (`serve --devices cpu,cpu`). Real servers, real client, tiny model.

Byte-for-byte equality needs the same batch shapes on both sides: on a CPU the UNet and VAE of a
batch of 5 differ from 5 batches of 1 by up to 3e-6 (oneDNN picks other kernels), which moves about
one image in five by one uint8 level (test_batching allows that). So the exact comparisons run
where every UNet call holds one image: `--max-batch-size 2` with guidance 2 (a guided image takes
both rows), or requests one at a time.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import signal
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
from conftest import ServerProcess
from test_lifecycle import _allowed_cpus, _engine_pids, linux_only

from lcmserve import Client, GenerateResult

SMALL = dict(num_inference_steps=2, width=64, height=64, output_format="raw")
ONE_PER_BATCH = ("--max-batch-size", "2")  # with GUIDED: one image per UNet call, one per VAE decode
GUIDED = dict(SMALL, guidance_scale=2.0)


def _metrics(server: ServerProcess) -> str:
    """The server's /metrics page."""
    match = re.search(r"metrics on (http://\S+)", server.log_path.read_text())
    assert match, server.log()
    return str(urllib.request.urlopen(match.group(1), timeout=10).read().decode())


def _ok_count(server: ServerProcess) -> int:
    """Generate calls this server finished OK, from its own Prometheus counter."""
    text = _metrics(server)
    found = re.search(r'^lcmserve_inference_request_total\{status="OK",transport="grpc"\} (\S+)$', text, re.MULTILINE)
    assert found, text[-2000:]
    return int(float(found.group(1)))


class _RetriedSeeds(logging.Handler):
    """Seeds of the requests the SDK retried (its "retrying Generate seed=N ..." log lines)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seeds: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"retrying Generate seed=(\d+)", record.getMessage())
        if match:
            self.seeds.add(int(match.group(1)))


def _start(count: int, *args: str) -> list[ServerProcess]:
    """`count` servers started side by side (their model loads overlap)."""
    with ThreadPoolExecutor(count) as starter:
        futures = [starter.submit(ServerProcess, *args) for _ in range(count)]
        servers = [f.result() for f in futures]
    return servers


def _differences(done: list[tuple[str, GenerateResult]], target: str, options: dict[str, object],
                 concurrency: int = 4) -> dict[int, int]:
    """seed -> largest uint8 difference from what the server at `target` gives for the same prompt and
    seed, for the images that are not equal byte for byte."""
    with Client(target, timeout=120, retries=0) as single, ThreadPoolExecutor(concurrency) as pool:
        def difference(item: tuple[str, GenerateResult]) -> int:
            prompt, result = item
            alone = single.generate(prompt, seed=result.seed, **options).images[0].data  # type: ignore[arg-type]
            got = result.images[0].data
            return 0 if alone == got else max(abs(a - b) for a, b in zip(alone, got))
        return {r.seed: d for (_, r), d in zip(done, pool.map(difference, done)) if d}


@linux_only
def test_one_client_balances_over_three_servers_through_a_kill_and_a_drain(tiny_artifact: pathlib.Path) -> None:
    servers = _start(3, "--model", str(tiny_artifact), "--metrics-port", "0", *ONE_PER_BATCH)
    killed, drained, survivor = servers
    retried = _RetriedSeeds()
    sdk_log = logging.getLogger("lcmserve.client")
    sdk_log.addHandler(retried)
    sdk_log.setLevel(logging.INFO)
    done: list[tuple[str, GenerateResult]] = []
    try:
        target = "ipv4:" + ",".join(s.target for s in servers)
        with Client(target, timeout=120) as client, ThreadPoolExecutor(8) as pool:
            client.wait_until_ready()
            for server in servers:  # each encodes (and caches) the empty negative prompt now, as alone
                with Client(server.target, retries=0) as one:
                    one.generate("warm", seed=1, **GUIDED)  # type: ignore[arg-type]
            # 120 requests at concurrency 8, without seeds: the SDK picks each one's before its first try.
            futures = {pool.submit(client.generate, f"a crack, request {i}", **GUIDED): f"a crack, request {i}"
                       for i in range(120)}
            for future in as_completed(futures):
                done.append((futures[future], future.result()))  # every one succeeds
                if len(done) == 40:
                    assert _ok_count(killed) > 0, "the first server took no request"
                    engines = _engine_pids(killed)
                    killed.proc.kill()  # SIGKILL, and its engine with it
                    for pid in engines:
                        os.kill(pid, signal.SIGKILL)
                elif len(done) == 80:
                    assert _ok_count(drained) > 0, "the second server took no request"
                    drained.proc.send_signal(signal.SIGTERM)
        assert len(done) == 120 and all(len(result.images) == 1 for _, result in done)
        assert _ok_count(survivor) > 0, "the third server took no request"
        assert drained.proc.wait(60) == 0, "the drained server dropped requests"
        print(f"retried {len(retried.seeds)} of 120 requests; the survivor finished {_ok_count(survivor)}")
        assert retried.seeds, "nothing was retried: the kill and the drain hit no request in flight"
        seeds = {result.seed for _, result in done}
        assert retried.seeds <= seeds and len(seeds) == 120, "a retry changed its request's seed"
        # The retried requests (and, as cheaply, all the others) give what one server alone gives.
        assert _differences(done, survivor.target, GUIDED) == {}
    finally:
        sdk_log.removeHandler(retried)
        for server in servers:
            server.stop()


@linux_only
def test_two_cpu_engines_behind_one_server(tiny_artifact: pathlib.Path, tiny_server: str) -> None:
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "0", "--devices", "cpu,cpu",
                           "--log-level", "DEBUG")
    try:
        engines = _engine_pids(server)
        assert len(engines) == 2
        # Every engine's process metrics, labelled by its index and device (issue 20).
        metrics = _metrics(server)
        for index in ("0", "1"):
            labelled = [line for line in metrics.splitlines()
                        if line.startswith("lcmserve_engine_process_resident_memory_bytes{")
                        and f'engine="{index}"' in line and 'device="cpu"' in line]
            assert len(labelled) == 1 and float(labelled[0].split()[-1]) > 0, metrics
        if len(os.sched_getaffinity(0)) >= 2:  # each engine on cores of its own
            first, second = (_allowed_cpus(pid) for pid in engines)
            assert len(first) == len(second) == 1 and first != second, (first, second)
        with Client(server.target, timeout=120) as client, ThreadPoolExecutor(4) as pool:
            info = client.model_info()
            assert info.devices == ["cpu", "cpu"] and info.device == "cpu"
            # One at a time (ties go round the engines): byte for byte what one engine gives alone.
            alone = [f"a wall, request {i}" for i in range(8)]
            one_by_one = [(p, client.generate(p, **SMALL)) for p in alone]  # type: ignore[arg-type]
            log_alone = server.log_path.read_text()
            # Four at a time (the engine with the fewest outstanding rows): within test_batching's 1 level.
            crowd = [f"a crack, request {i}" for i in range(16)]
            together = list(zip(crowd, pool.map(lambda p: client.generate(p, **SMALL), crowd)))  # type: ignore[arg-type]
        for text in (log_alone, server.log_path.read_text()[len(log_alone):]):
            taken = Counter(re.findall(r"-> engine (\d) \(cpu\)", text))
            assert set(taken) == {"0", "1"}, f"not both engines took requests: {taken}"
        assert _differences(one_by_one, tiny_server, SMALL, concurrency=1) == {}
        assert max(_differences(together, tiny_server, SMALL, concurrency=1).values(), default=0) <= 1
    finally:
        server.stop()


@linux_only
def test_one_dead_engine_takes_the_whole_server_down(tiny_artifact: pathlib.Path) -> None:
    """No half-dead server: one of two engines killed -> NOT_SERVING, then exit non-zero."""
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1", "--devices", "cpu,cpu")
    try:
        with Client(server.target, timeout=30, retries=0) as client:
            assert client.health_status() == "SERVING"
            os.kill(_engine_pids(server)[1], signal.SIGKILL)
            killed_at = time.monotonic()
            while client.health_status() == "SERVING" and time.monotonic() < killed_at + 10:
                time.sleep(0.1)
            assert client.health_status() == "NOT_SERVING"
        assert server.proc.wait(max(0.0, killed_at + 15 - time.monotonic())) != 0
        assert "engine 1 (cpu) died" in server.log_path.read_text()
    finally:
        server.kill()


def test_retry_policy_backoff_deadline_and_balancing() -> None:
    """The SDK's retry rules (client/retry.py) without a server: what is retried, how long it waits."""
    import json
    import random

    from lcmserve import InvalidArgumentError, ResourceExhaustedError, UnavailableError
    from lcmserve.retry import Attempts, RetryPolicy, balancing_options, pick_seed

    policy = RetryPolicy(retries=3, initial_backoff_s=0.1, max_backoff_s=0.3)
    full = ResourceExhaustedError("RESOURCE_EXHAUSTED: queue full", retry_after_s=0.25)
    too_big = ResourceExhaustedError("RESOURCE_EXHAUSTED: Received message larger than max")
    assert policy.retryable(UnavailableError("UNAVAILABLE")) and policy.retryable(full)
    assert not policy.retryable(too_big) and not policy.retryable(InvalidArgumentError("INVALID_ARGUMENT"))
    rng = random.Random(0)
    waits = [policy.backoff_s(k, UnavailableError("x"), rng) for k in (1, 2, 3, 4) for _ in range(50)]
    assert 0 <= min(waits) and max(waits) <= 0.3  # full jitter under the cap
    assert all(policy.backoff_s(1, full, rng) >= 0.25 for _ in range(20))  # never sooner than RetryInfo
    attempts = Attempts(policy, None, seed=7, rng=rng)
    assert [attempts.wait_s(UnavailableError("x")) is not None for _ in range(4)] == [True, True, True, False]
    assert Attempts(RetryPolicy(retries=0), None, 7, rng).wait_s(UnavailableError("x")) is None
    short = Attempts(policy, 0.2, 7, rng)  # a 0.25 s RetryInfo does not fit in a 0.2 s deadline
    assert short.wait_s(full) is None and 0 < (short.timeout() or 0) <= 0.2
    with pytest.raises(ValueError, match="retries=-1"):
        RetryPolicy(retries=-1)
    assert 0 <= pick_seed() < 2**31
    configs = {t: dict(balancing_options(t)).get("grpc.service_config") for t in
               ("127.0.0.1:1", "ipv4:127.0.0.1:1,127.0.0.1:2", "dns:///lcmserve-headless.ns.svc:50051")}
    assert configs["127.0.0.1:1"] is None  # a lone server: pick_first, its own answers reach the caller
    for target in ("ipv4:127.0.0.1:1,127.0.0.1:2", "dns:///lcmserve-headless.ns.svc:50051"):
        config = json.loads(configs[target])
        assert config["loadBalancingConfig"] == [{"round_robin": {}}] and config["healthCheckConfig"] == {
            "serviceName": ""}
