"""Soak test of a real `lcmserve serve` on loopback (issue 10): not a timed test, a script.

    .venv/bin/python scripts/soak.py --requests 10000 --concurrency 16      # the issue's run
    .venv/bin/python scripts/soak.py --requests 1500 --concurrency 16       # ~5 minutes on 2 cores

It starts a server (tiny preset unless --model, 64x64, 4 steps), sends a warm-up phase of the same
traffic, records the resident memory (RSS) of both server processes, then sends --requests at
--concurrency: 15 % cancelled by the client after their first step event, 5 % with a 50 ms deadline,
the rest plain. At the end it reports:
  lost        un-cancelled requests that did not get every image (a deadline's DEADLINE_EXCEEDED is
              not lost: the client asked for it; any other failure of a plain request is)
  RSS growth  of the edge and the engine process, against their post-warm-up value
  metrics     the server's lcmserve_inference_request_total deltas against what the client saw
and exits 1 if anything was lost, RSS grew by 5 % or more, or the metrics disagree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass

import grpc

from lcmserve import AsyncClient, DeadlineExceededError, LcmServeError
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    kind: str  # plain | cancel | deadline
    seed: int


class Server:
    """`lcmserve serve --port 0 --metrics-port 0` in a session of its own (loopback only)."""

    def __init__(self, model: str, extra: list[str]) -> None:
        self.log = pathlib.Path(tempfile.mkstemp(prefix="lcmserve-soak-", suffix=".log")[1])
        self._log = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lcmserve.cli", "serve", "--model", model, "--host",
                                      "127.0.0.1", "--port", "0", "--metrics-port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO,
                                     start_new_session=True)
        self.target = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("listening on "):
                    self.target = line.split()[-1]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 300
        while not ready.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{self.log.read_text()[-3000:]}")
        self._log.flush()
        match = re.search(r"metrics on (http://\S+)", self.log.read_text())
        if not match:
            raise SystemExit("no metrics line in the server log")
        self.metrics_url = match.group(1)

    def engine_pid(self) -> int:
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid and \
                        b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                    return int(stat.parent.name)
        raise SystemExit("no engine process found")

    def counts(self) -> Counter[str]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        found = re.findall(r'^lcmserve_inference_request_total\{status="(\w+)"\} (\S+)$', text, re.MULTILINE)
        return Counter({status: int(float(value)) for status, value in found})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for {pid}")


def plans(count: int, rng: random.Random, cancel: float, deadline: float) -> list[Plan]:
    out = []
    for i in range(count):
        roll = rng.random()
        out.append(Plan("cancel" if roll < cancel else "deadline" if roll < cancel + deadline else "plain", i))
    return out


async def run_phase(target: str, todo: list[Plan], concurrency: int, args: argparse.Namespace) -> Counter[str]:
    """Send `todo` with `concurrency` workers; returns outcome counts: the client's view by status,
    plus "lost" (an un-cancelled request without all its images)."""
    seen: Counter[str] = Counter()
    queue = list(reversed(todo))
    shape = dict(num_inference_steps=args.steps, width=args.side, height=args.side)

    async def one(client: AsyncClient, plan: Plan) -> None:
        timeout = args.deadline_ms / 1e3 if plan.kind == "deadline" else 120.0
        try:
            if plan.kind == "cancel":
                # The raw call, to see what the client really got: cancel() is False when the call
                # had already ended (the server finished first): then its status is the outcome.
                call = stub.Generate(pb.GenerateRequest(prompt="soak", seed=plan.seed, **shape), timeout=timeout)
                async for response in call:
                    if response.HasField("step"):
                        break
                if call.cancel():
                    seen["CANCELLED"] += 1
                else:
                    seen[(await call.code()).name] += 1
                return
            result = await client.generate("soak", seed=plan.seed, timeout=timeout, **shape)  # type: ignore[arg-type]
            seen["OK"] += 1
            if len(result.images) != 1:
                seen["lost"] += 1
        except DeadlineExceededError:
            seen["DEADLINE_EXCEEDED"] += 1
            if plan.kind != "deadline":
                seen["lost"] += 1
        except LcmServeError as exc:
            seen[exc.code] += 1
            seen["lost"] += 1

    async def worker(client: AsyncClient) -> None:
        while queue:
            await one(client, queue.pop())

    # retries=0: one RPC per request, so that the server's per-RPC counts compare with the client's.
    async with AsyncClient(target, retries=0) as client, grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        await client.wait_until_ready(60)
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="requests after the warm-up (default 10000)")
    p.add_argument("--warmup", type=int, default=200, help="requests of the same mix before the RSS baseline")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cancel-fraction", type=float, default=0.15)
    p.add_argument("--deadline-fraction", type=float, default=0.05)
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--model", default="tiny")
    p.add_argument("--side", type=int, default=64, help="image width and height in pixels (default 64)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", type=pathlib.Path, help="write the figures here too")
    p.add_argument("server_args", nargs="*", help="extra `lcmserve serve` flags (after --)")
    args = p.parse_args()
    rng = random.Random(0)
    server = Server(args.model, args.server_args)
    try:
        engine = server.engine_pid()
        start = time.perf_counter()
        asyncio.run(run_phase(server.target, plans(args.warmup, rng, args.cancel_fraction, args.deadline_fraction),
                              args.concurrency, args))
        time.sleep(2)
        base = {"edge": rss_mb(server.proc.pid), "engine": rss_mb(engine)}
        before = server.counts()
        t0 = time.perf_counter()
        seen = asyncio.run(run_phase(server.target, plans(args.requests, rng, args.cancel_fraction,
                                                          args.deadline_fraction), args.concurrency, args))
        elapsed = time.perf_counter() - t0
        time.sleep(2)  # the last cancelled handlers end a moment after their clients moved on
        after = {"edge": rss_mb(server.proc.pid), "engine": rss_mb(engine)}
        counts = server.counts()
        delta = {k: counts[k] - before[k] for k in counts if counts[k] - before[k]}
    finally:
        code = server.stop()
    client = {k: v for k, v in seen.items() if k != "lost"}
    growth = {k: 100 * (after[k] - base[k]) / base[k] for k in base}
    figures = {
        "requests": args.requests, "concurrency": args.concurrency, "side": args.side, "steps": args.steps,
        "seconds": round(elapsed, 1), "requests_per_s": round(args.requests / elapsed, 2),
        "lost": seen["lost"], "client": client, "metrics": delta, "metrics_match": delta == client,
        "rss_mb_post_warmup": base, "rss_mb_end": after, "rss_growth_percent": growth,
        "server_exit_code": code, "total_seconds": round(time.perf_counter() - start, 1), "cpus": os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ok = seen["lost"] == 0 and delta == client and max(growth.values()) < 5.0 and code == 0
    print("soak: PASS" if ok else "soak: FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
