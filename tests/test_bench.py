"""`lcmserve bench` against a real server serving the real tiny model (64x64, 2 steps: fast on a CPU)."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, ServerProcess

from lcmserve.bench import (
    BenchConfig,
    Level,
    RequestResult,
    RequestShape,
    Stats,
    format_table,
    main,
    run_bench,
)

SMALL = RequestShape(num_inference_steps=2, width=64, height=64)
SHAPE_ARGS = ["--steps", "2", "--width", "64", "--height", "64"]


def assert_ordered(stats: Stats) -> None:
    assert stats.p50 <= stats.p90 <= stats.p95 <= stats.p99
    assert stats.p50 > 0


def test_stats_percentiles() -> None:
    stats = Stats.from_samples([float(v) for v in range(100, 0, -1)])  # 100 .. 1, unsorted
    assert (stats.p50, stats.p90, stats.p99, stats.mean, stats.count) == pytest.approx(
        (50.5, 90.1, 99.01, 50.5, 100)
    )
    one = Stats.from_samples([7.0])
    assert one.p50 == one.p99 == one.mean == 7.0
    empty = Stats.from_samples([])
    assert empty.count == 0 and all(
        math.isnan(v) for v in (empty.p50, empty.p90, empty.p95, empty.p99, empty.mean)
    )
    assert empty.to_json() == {"p50": None, "p90": None, "p95": None, "p99": None, "mean": None}


def test_closed_loop_levels(tiny_server: str) -> None:
    config = BenchConfig(
        target=tiny_server,
        levels=(Level(concurrency=1), Level(concurrency=3)),
        requests=4,
        warmup=1,
        shape=SMALL,
        slo_ms=60_000.0,
        progress=False,
    )
    started = time.perf_counter()
    report = asyncio.run(run_bench(config))
    wall = time.perf_counter() - started

    assert [lv.level.concurrency for lv in report.levels] == [1, 3]
    assert report.server is not None and report.server["base"] == "tiny"
    for lv in report.levels:
        assert lv.sent == 4 and lv.ok + lv.failed == lv.sent and lv.failed == 0 and lv.errors == {}
        assert lv.images == 4
        # images/s is ok images over the level's wall time, which the whole run's wall time bounds
        assert 0 < lv.duration_s < wall
        assert lv.images_per_s == pytest.approx(lv.images / lv.duration_s)
        assert lv.images_per_s > 4 / wall
        assert lv.goodput_per_s == pytest.approx(lv.requests_per_s)  # a 60 s SLO: every request within it
        for stats in (lv.latency_ms, lv.first_step_ms, lv.step_gap_ms):
            assert_ordered(stats)
        assert lv.latency_ms.count == 4 and lv.first_step_ms.count == 4
        assert lv.step_gap_ms.count == 4  # 2 steps: one gap per request
        assert lv.first_step_ms.p99 <= lv.latency_ms.p99 and lv.latency_ms.p99 < 1e3 * lv.duration_s
    table = format_table(report)
    assert "c=1" in table and "c=3" in table


def test_cli_open_loop_writes_json_csv_and_plot(tiny_server: str, tmp_path: Path) -> None:
    from PIL import Image

    out = {name: tmp_path / name for name in ("bench.json", "bench.csv", "bench.png")}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a crack in a concrete wall\n\nspalled concrete, rust stains\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lcmserve.cli", "bench", "--target", tiny_server, "--rate", "2,4",
         "--max-concurrency", "2", "--requests", "3", "--warmup", "1", *SHAPE_ARGS, "--prompts", str(prompts),
         "--seed", "7", "--slo-ms", "60000", "--json", str(out["bench.json"]), "--csv", str(out["bench.csv"]),
         "--plot", str(out["bench.png"])],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "r=2/s max 2" in proc.stdout and "r=4/s max 2" in proc.stdout

    data = json.loads(out["bench.json"].read_text())
    assert set(data) >= {"levels", "config"}
    assert [lv["rate"] for lv in data["levels"]] == [2.0, 4.0]
    for lv in data["levels"]:
        assert {
            "sent",
            "ok",
            "failed",
            "errors",
            "images_per_s",
            "latency_ms",
            "first_step_ms",
            "step_gap_ms",
        } <= set(lv)
        assert lv["sent"] == 3 and lv["ok"] + lv["failed"] == lv["sent"] and lv["errors"] == {}
        for key in ("latency_ms", "first_step_ms", "step_gap_ms"):
            assert set(lv[key]) == {"p50", "p90", "p95", "p99", "mean"}
            assert lv[key]["p50"] <= lv[key]["p90"] <= lv[key]["p95"] <= lv[key]["p99"]
        assert lv["images_per_s"] == pytest.approx(lv["ok"] / lv["duration_s"], rel=1e-2)
    assert data["config"]["shape"]["width"] == 64 and data["config"]["prompts"] == 2

    with out["bench.csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["rate"]) for r in rows] == [2.0, 4.0]
    assert all(int(r["ok"]) + int(r["failed"]) == int(r["sent"]) == 3 for r in rows)
    assert all(float(r["latency_ms_p50"]) <= float(r["latency_ms_p99"]) for r in rows)

    with Image.open(out["bench.png"]) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


def test_smoke_request_failure_is_a_clear_error(tiny_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 65 is not a multiple of 8: the server refuses, and the tool says so instead of benchmarking errors
    assert (
        main(["--target", tiny_server, "--width", "65", "--height", "64", "--steps", "2", "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "smoke request" in err and "INVALID_ARGUMENT" in err and "width" in err


def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "127.0.0.1:1", *SHAPE_ARGS, "--timeout", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "smoke request to 127.0.0.1:1 failed: UNAVAILABLE" in err


def test_server_killed_mid_level_counts_unavailable() -> None:
    server = ServerProcess("--model", "tiny", "--metrics-port", "-1")
    config = BenchConfig(
        target=server.target, levels=(Level(concurrency=2),), duration_s=6.0, warmup=1, timeout_s=30.0,
        shape=SMALL, progress=False,
    )  # fmt: skip

    def kill_at_first_result(level: Level, result: RequestResult) -> None:
        server.kill()  # SIGKILL while the other client's request is in flight

    try:
        started = time.perf_counter()
        report = asyncio.run(run_bench(config, on_result=kill_at_first_result))
        wall = time.perf_counter() - started
    finally:
        server.kill()
        server.stop()
    (level,) = report.levels
    assert not report.interrupted and not level.interrupted
    assert level.ok >= 1 and level.failed >= 1 and level.ok + level.failed == level.sent
    assert "UNAVAILABLE" in level.errors and sum(level.errors.values()) == level.failed
    assert wall < config.duration_s + config.timeout_s + 30  # the level ended on its own
    assert "UNAVAILABLE" in format_table(report)


def test_ctrl_c_stops_with_partial_results(tiny_server: str, tmp_path: Path) -> None:
    json_path = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lcmserve.bench", "--target", tiny_server, "--concurrency", "2,4",
         "--duration", "120", "--warmup", "0", *SHAPE_ARGS, "--json", str(json_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    # The progress bar of the first level appears once the smoke request is done.
    seen = ""
    while "c=2:" not in seen:
        chunk = os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        assert chunk, f"bench ended early: {seen}"
        seen += chunk
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "c=2 (stopped)" in stdout and "c=4" not in stdout
    data = json.loads(json_path.read_text())
    assert data["interrupted"] is True
    (level,) = data["levels"]
    assert level["concurrency"] == 2 and level["interrupted"] is True
    assert level["ok"] + level["failed"] == level["sent"]


def test_baseline_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    json_path = tmp_path / "baseline.json"
    code = main(["--baseline", "tiny", "--baseline-batch", "1,2", "--baseline-iters", "2", *SHAPE_ARGS,
                 "--json", str(json_path)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "diffusers b=1" in out
    # as the server's engine runs on a CPU: one thread per CPU but the first (those CPUs, if pinned)
    engine_threads = max(1, len(os.sched_getaffinity(0)) - 1)
    assert f"(float32, {engine_threads} torch thread(s)" in out
    data = json.loads(json_path.read_text())
    assert data["levels"] == []
    assert [b["batch_size"] for b in data["baseline"]] == [1, 2]
    for b in data["baseline"]:
        assert b["device"] == "cpu" and b["calls"] == 2 and b["images"] == 2 * b["batch_size"]
        assert b["threads"] == engine_threads
        assert b["images_per_s"] > 0
        assert b["latency_ms"]["p50"] <= b["latency_ms"]["p99"] and b["first_step_ms"]["p50"] > 0
        assert b["step_gap_ms"]["p50"] > 0


def test_json_config_records_whether_secrets_were_given_never_their_value() -> None:
    config = BenchConfig(target="127.0.0.1:1", root_certificates=b"-----BEGIN CERTIFICATE-----",
                         client_cert=b"-----BEGIN CERTIFICATE-----", client_key=b"-----BEGIN PRIVATE KEY-----",
                         token="bench-secret")
    data = config.to_json()
    assert (data["root_certificates"], data["client_cert"], data["client_key"], data["token"]) == (True,) * 4
    text = json.dumps(data)  # JSON-ready: no bytes left
    assert "bench-secret" not in text and "BEGIN" not in text
    assert "bench-secret" not in repr(config)
    assert BenchConfig(target=None).to_json()["token"] is False
