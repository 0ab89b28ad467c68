"""What tracing costs (issue 24, docs/benchmarks.md): two tiny servers, one with tracing off and one
exporting every request's spans to a loopback OTLP/HTTP receiver (tests/otlp_receiver.py), benched
in turns with `lcmserve bench` at concurrency 1 and 16, 64x64, 4 steps; prints the medians.

    python scripts/bench_tracing.py [--rounds 4] [--duration 6] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from otlp_receiver import OtlpReceiver  # noqa: E402


def start(model: str, extra: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "lcmserve.cli", "serve", "--model", model, "--port", "0",
                             "--metrics-port", "-1", *extra], stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("listening on "):
            return proc, line.split()[-1]
    raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(target: str, duration: float, out: Path, pid: int) -> tuple[float, float, float]:
    """(c=1 p50 ms, c=16 images/s, the edge process's CPU ms per request)."""
    before = cpu_s(pid)
    subprocess.run([sys.executable, "-m", "lcmserve.cli", "bench", "--target", target, "--concurrency", "1,16",
                    "--duration", str(duration), "--width", "64", "--height", "64", "--steps", "4",
                    "--no-progress", "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
    edge_ms = (cpu_s(pid) - before) * 1e3
    levels = json.loads(out.read_text())["levels"]
    requests = sum(level["sent"] for level in levels) + 8  # (+ the two levels' warm-up requests)
    return levels[0]["latency_ms"]["p50"], levels[1]["images_per_s"], edge_ms / requests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    receiver = OtlpReceiver()
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "1000"}
    servers = {"off": start(args.model, [], env, work / "off.log"),
               "on": start(args.model, ["--otlp-endpoint", receiver.url], env, work / "on.log")}
    results: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    try:
        for round_ in range(args.rounds):
            for name in (("off", "on") if round_ % 2 == 0 else ("on", "off")):  # interleaved, order alternating
                proc, target = servers[name]
                results[name].append(bench(target, args.duration, work / f"{name}-{round_}.json", proc.pid))
                print(name, round_, results[name][-1], flush=True)
        time.sleep(2)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
        receiver.close()
    print(f"spans received: {len(receiver.spans)} in {receiver.requests} exports")
    print("| tracing | c=1 p50 ms (median) | c=16 images/s (median) | edge CPU ms per request (median) |")
    print("| --- | --- | --- | --- |")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.1f} | {statistics.median(r[1] for r in rows):.1f} "
              f"| {statistics.median(r[2] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
