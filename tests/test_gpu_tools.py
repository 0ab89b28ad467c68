"""The GPU-readiness tools on a CPU: BucketedGraphs' bookkeeping (buckets, LRU of resolutions, a failed
capture -> eager from then on), and the GPU scripts' dry runs, which must always print their table.

BucketedGraphs takes its capture function as a parameter: here a "graph" whose replay reruns the
real (small) torch callable on the static buffers, so padding, copy-in/out, eviction and failure
handling run for real; only the CUDA recording is left out. The CUDA-only test runs on a GPU host.
"""

from __future__ import annotations

import importlib
import json
import logging
import pathlib
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from lcmserve.server.engine.cuda_graphs import BucketedGraphs
from graph_fakes import RerunGraph

REPO = pathlib.Path(__file__).resolve().parent.parent
WEIGHT = torch.linspace(-1, 1, 16 * 8).view(8, 16)


def small_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, ..., 16) features, (B,) scales -> (B, ..., 8): a real torch callable, rows independent."""
    return torch.nn.functional.linear(x, WEIGHT).tanh() * t.view(-1, *([1] * (x.dim() - 1)))


class CpuCapture:
    """The capture function under test: records every graph it made; fails on the calls listed."""

    def __init__(self, fail_on: tuple[int, ...] = ()) -> None:
        self.made: list[RerunGraph] = []
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, fn, static: list[torch.Tensor]) -> tuple[RerunGraph, torch.Tensor]:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        output = fn(*static)
        graph = RerunGraph(fn, static, output)
        self.made.append(graph)
        return graph, output


def inputs(batch: int, side: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, side, 16, generator=g), torch.rand(batch, generator=g) + 0.5


def test_replay_pads_to_the_bucket_and_matches_eager() -> None:
    capture = CpuCapture()
    graphs = BucketedGraphs(small_model, (4, 1, 2), "t", capture=capture)
    assert graphs.buckets == (1, 2, 4)
    first = inputs(3, seed=1)
    assert torch.equal(graphs(*first), small_model(*first))  # captured at bucket 4, 3 real rows
    other = inputs(3, seed=2)
    out = graphs(*other)  # replayed on other values: the graph reads its static buffers
    assert out.shape == (3, 4, 8) and torch.equal(out, small_model(*other))
    assert torch.equal(graphs(*inputs(4, seed=3)), small_model(*inputs(4, seed=3)))
    assert (capture.calls, graphs.captures, graphs.replays, graphs.eager_calls) == (1, 1, 3, 0)
    out.add_(1)  # the caller owns its result: the static output is not handed out
    assert torch.equal(graphs(*other), small_model(*other))
    big = inputs(5)
    assert torch.equal(graphs(*big), small_model(*big))  # above every bucket: eager
    assert graphs.eager_calls == 1 and capture.calls == 1


def test_resolutions_are_an_lru_and_newcomers_run_eagerly_until_admitted(
        caplog: pytest.LogCaptureFixture) -> None:
    capture = CpuCapture()
    graphs = BucketedGraphs(small_model, (2,), "unet", max_resolutions=2, admit_after=3, capture=capture)
    a, b, c = inputs(2, side=1), inputs(2, side=2), inputs(2, side=3)
    graphs(*a)
    graphs(*b)  # room for both: captured on first use
    assert graphs.captures == 2 and len(graphs.graphs) == 2
    graphs(*a)  # a is now the most recently used; b is next out
    with caplog.at_level(logging.INFO, logger="lcmserve.cuda_graphs"):
        for _ in range(2):  # full: c runs eagerly while it earns a place
            assert torch.equal(graphs(*c), small_model(*c))
        assert graphs.eager_calls == 2 and graphs.captures == 2 and graphs.evictions == 0
        assert torch.equal(graphs(*c), small_model(*c))  # third call: evicts b, captures c
    assert graphs.evictions == 1 and graphs.captures == 3
    b_graph = capture.made[1]
    assert b_graph.released and not capture.made[0].released  # b's graph freed, a's kept
    assert [r[0][0] for r in graphs.graphs] == [(1, 16), (3, 16)]  # a, then c (most recent last)
    assert any("evicted" in rec.message for rec in caplog.records)
    assert torch.equal(graphs(*b), small_model(*b))  # b comes back as a newcomer: eager again
    assert graphs.captures == 3 and graphs.eager_calls == 3
    assert graphs.stats() == {"captures": 3, "evictions": 1, "eager_calls": 3, "replays": 4,
                              "resolutions": 2, "disabled": 0}


def test_a_failed_capture_turns_graphs_off_for_good(caplog: pytest.LogCaptureFixture) -> None:
    capture = CpuCapture(fail_on=(2,))
    graphs = BucketedGraphs(small_model, (1, 4), "vae", capture=capture)
    graphs(*inputs(1))  # captured fine
    with caplog.at_level(logging.WARNING, logger="lcmserve.cuda_graphs"):
        x = inputs(3, seed=5)
        assert torch.equal(graphs(*x), small_model(*x))  # its capture fails: this call runs eagerly
        for seed in range(4):  # and so does every later call, at any size, without trying again
            y = inputs(1 + seed % 4, seed=seed)
            assert torch.equal(graphs(*y), small_model(*y))
    assert graphs.disabled is not None and "stream is capturing" in graphs.disabled
    assert capture.calls == 2 and graphs.captures == 1 and graphs.replays == 1 and graphs.eager_calls == 5
    assert capture.made[0].released and not graphs.graphs  # the earlier graph was freed too
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "graphs are off" in warnings[0].message


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="buckets"):
        BucketedGraphs(small_model, (), "t", capture=CpuCapture())
    with pytest.raises(ValueError, match="max_resolutions"):
        BucketedGraphs(small_model, (1,), "t", max_resolutions=0, capture=CpuCapture())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_failed_cuda_capture_restores_the_stream_and_runs_eagerly() -> None:
    def host_sync(x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 1e30:  # a host sync: invalidates the capture
            x = -x
        return x * 2

    caller = torch.cuda.current_stream()
    x = torch.randn(3, 8, device="cuda")
    graphs = BucketedGraphs(host_sync, (4,), "bad")
    assert torch.equal(graphs(x), x * 2)
    assert graphs.disabled and torch.cuda.current_stream() == caller
    assert not torch.cuda.is_current_stream_capturing()
    good = BucketedGraphs(lambda t: t + 1, (4,), "good")  # the allocator is not stuck in capture mode
    assert torch.equal(good(x), x + 1) and good.replays == 1


# ---- the scripts' dry runs ---------------------------------------------------------------------


def script_module(name: str):  # type: ignore[no-untyped-def]
    """A module of scripts/ (no package: its modules import each other by name)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


def run_script(*args: str, out: pathlib.Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OUT": str(out)})


def records(path: pathlib.Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_check_stage_timeout_still_prints_the_table(tmp_path: pathlib.Path) -> None:
    r = run_script("scripts/gpu_check.py", "--tiny", "--stage-timeout", "loras=0.5", "--work", str(tmp_path / "w"),
                   out=tmp_path, timeout=240)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {rec["stage"]: rec for rec in records(tmp_path / "results.jsonl")}
    assert rows["env"]["grpcio"] and rows["import"]["status"] == "ok"
    assert rows["loras"]["status"] == "timeout"
    assert rows["export_eager"]["status"] == "skipped" and "loras" in rows["export_eager"]["reason"]
    assert rows["serve_eager"]["status"] == "skipped"
    table = (tmp_path / "table.md").read_text()
    assert "| loras | timeout |" in table and table in r.stdout
    assert r.stdout.index('"stage": "env"') < r.stdout.index('"stage": "import"')  # versions first


def test_gpu_probe_part_timeout_still_prints_the_table(tmp_path: pathlib.Path) -> None:
    r = run_script("scripts/gpu_probe.py", "--device", "cpu", "--stage-timeout", "build=0.05",
                   "--out", str(tmp_path / "probe.jsonl"), out=tmp_path, timeout=240)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {rec["part"]: rec for rec in records(tmp_path / "probe.jsonl")}
    assert rows["build"]["status"] == "timeout"
    assert rows["unet_graphs"]["status"] == "skipped" and rows["aoti_graph"]["reason"] == "no CUDA"
    assert rows["sync_count"]["reason"] == "no CUDA" and rows["levers"]["reason"] == "needs build"
    assert "| build | timeout" in r.stdout and (tmp_path / "probe.md").exists()
    assert "| sync_count | skipped: no CUDA |" in r.stdout


@pytest.mark.slow
def test_gpu_probe_dry_runs_on_the_cpu(tmp_path: pathlib.Path) -> None:
    r = run_script("scripts/gpu_probe.py", "--device", "cpu", "--out", str(tmp_path / "probe.jsonl"),
                   out=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = records(tmp_path / "probe.jsonl")
    parts = {rec["part"]: rec for rec in recs if rec["status"] != "row"}
    assert all(parts[p]["status"] == "ok" for p in ("build", "unet_graphs", "vae_graphs", "lcm_step", "levers"))
    assert {p for p, rec in parts.items() if rec["status"] == "skipped"} == {
        "failed_capture", "aoti_graph", "compile_thread", "memory", "sync_count"}
    assert all(parts[p]["reason"] == "no CUDA" for p in ("sync_count", "failed_capture", "memory"))
    unet = [rec for rec in recs if rec["part"] == "unet_graphs" and rec["status"] == "row"]
    assert [rec["bucket"] for rec in unet] == [1, 8, 32, 64] and all(rec["finite"] for rec in unet)
    vae = [rec for rec in recs if rec["part"] == "vae_graphs" and rec["status"] == "row"]
    assert [rec["bucket"] for rec in vae] == [1, 2, 4, 8]  # the engine decodes at most 8 at once
    step = next(rec for rec in recs if rec["part"] == "lcm_step" and rec["status"] == "row")
    assert step["max_abs_diff"] == 0.0  # host-side and device-side constants give the same step
    levers = [(rec["variant"], rec["bucket"]) for rec in recs if rec["part"] == "levers" and rec["status"] == "row"]
    assert levers == [(name, b) for name in ("unet_channels_last", "unet_fused_qkv", "unet_both") for b in (1, 8, 32, 64)
                      ] + [("vae_channels_last", b) for b in (1, 2, 4, 8)] + [("vae_batch16", 16)]
    assert all(rec["max_abs_diff"] < 1e-3 and rec["base_ms"] > 0 and rec["lever_ms"] > 0
               for rec in recs if rec["part"] == "levers" and rec["status"] == "row")  # same images, float32
    assert "skipped: sync_count, failed_capture, aoti_graph, compile_thread, memory" in r.stdout
    assert "| sync_count | skipped: no CUDA |" in r.stdout and "| levers | ok" in r.stdout


@pytest.mark.slow
def test_gpu_check_tiny_dry_run(tmp_path: pathlib.Path) -> None:
    r = run_script("scripts/gpu_check.py", "--tiny", "--work", str(tmp_path / "w"), out=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    recs = records(tmp_path / "results.jsonl")
    stages = {rec["stage"]: rec.get("status") for rec in recs if rec.get("status") != "level"}
    assert all(status == "ok" for name, status in stages.items() if name not in ("env", "parity")), stages
    parity = next(rec for rec in recs if rec["stage"] == "parity")  # fp16 against diffusers: a GPU stage
    assert parity["status"] == "skipped" and parity["reason"] == "no CUDA"
    assert "| parity | skipped: no CUDA |" in (tmp_path / "table.md").read_text()
    levels = [rec for rec in recs if rec.get("status") == "level"]
    assert {rec["stage"] for rec in levels} == {"bench_eager_low", "bench_eager_high", "bench_eager_img2img",
                                                 "bench_eager_best3", "bench_eager_http", "baseline_plain", "baseline_cached",
                                                 "scorer_cost"}
    timed = [rec for rec in levels if rec["stage"] == "scorer_cost"]  # ms per image, not images/s
    assert timed and all(rec["p50_ms"] > 0 for rec in timed)
    assert all(rec.get("failed", 0) == 0 and rec["images_per_s"] > 0 for rec in levels if rec not in timed)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["results.jsonl", "table.md"]


def test_versions_too_old_for_the_stubs_are_named() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import stagekit
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert stagekit.too_old({"grpcio": "1.84.0", "protobuf": "7.35.1"}) == []
    assert stagekit.too_old({"grpcio": "1.85.3", "protobuf": "7.36.2"}) == []
    problems = stagekit.too_old({"grpcio": "1.83.9", "protobuf": "6.33.5"})
    assert len(problems) == 2 and "grpcio 1.83.9" in problems[0] and "protobuf 6.33.5" in problems[1]
    assert stagekit.too_old({"grpcio": "1.84.0rc1", "protobuf": "missing"}) == [
        "protobuf missing is older than 7.35.1, the oldest the generated stubs import under"]
    assert stagekit.parse_timeouts(["loras=0.5", "export_eager=30"]) == {"loras": 0.5, "export_eager": 30.0}
    with pytest.raises(ValueError, match="NAME=SECONDS"):
        stagekit.parse_timeouts(["loras"])


# ---- issue 18: the parity stage, the sync count, the budget ------------------------------------


def test_parity_comparison_counts_pixel_levels() -> None:
    parity = script_module("parity_check")
    floats = np.random.default_rng(0).uniform(0.1, 0.9, (8, 8, 3)).astype(np.float32)  # CPU float32 pixels
    reference = parity.to_uint8(floats)
    assert reference.dtype == np.uint8 and np.array_equal(reference, (floats * 255).round().astype(np.uint8))
    assert parity.to_uint8(np.array([-0.1, 0.5, 1.2])).tolist() == [0, 128, 255]  # clipped, rounded
    served = reference.copy()
    served[0, 0, 0] += 3
    served[1, 1, 1] -= 1
    assert parity.pixel_diff(reference, reference) == {"max_255": 0, "mean_255": 0.0}
    assert parity.pixel_diff(served, reference) == {"max_255": 3, "mean_255": round(4 / 192, 4)}
    with pytest.raises(ValueError, match="shapes"):
        parity.pixel_diff(reference, reference[:4])
    rows = parity.compare({7: served}, {7: reference}, {7: reference})
    assert rows[0]["seed"] == 7 and rows[0]["alone_vs_diffusers"]["max_255"] == 3
    assert rows[0]["wave_vs_diffusers"]["max_255"] == 0 and rows[0]["alone_vs_wave"]["max_255"] == 3
    assert parity.worst(rows)["alone_vs_wave"] == {"max_255": 3, "mean_255": round(4 / 192, 4)}
    assert parity.describe(rows[0]).startswith("alone/diffusers max 3 mean 0.0208, wave/diffusers max 0")


def test_parity_script_against_a_served_model(tiny_server: str, tiny_artifact: pathlib.Path,
                                              tmp_path: pathlib.Path) -> None:
    """The parity stage's script end to end on a CPU (float32, the tiny model): alone, in a wave, diffusers."""
    path = tmp_path / "parity.json"
    r = run_script("scripts/parity_check.py", "--target", tiny_server, "--model", str(tiny_artifact),
                   "--device", "cpu", "--dtype", "float32", "--side", "64", "--steps", "2", "--seeds", "2",
                   "--wave", "6", "--json", str(path), out=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(path.read_text())
    assert [row["seed"] for row in result["seeds"]] == [1, 2] and result["wave"] == 6
    for row in result["seeds"]:
        assert row["std"] > 5  # not a flat image
        for key in ("alone_vs_diffusers", "wave_vs_diffusers", "alone_vs_wave"):
            assert row[key]["max_255"] <= 1, row  # float32 on a CPU: diffusers' pixels within 1/255
    assert "seed 1: alone/diffusers max" in r.stdout


def test_sync_counter_counts_by_thread_and_line_and_passes_other_warnings_on() -> None:
    syncs = script_module("probe_syncs")
    shown = warnings.showwarning
    with warnings.catch_warnings(record=True) as others:
        warnings.simplefilter("always")
        with syncs.SyncCounter(cuda=False) as counter:  # torch's warnings, raised here by hand
            loop = threading.Thread(target=lambda: warnings.warn(syncs.SYNC_WARNING), name=syncs.LOOP_THREAD)
            loop.start()
            loop.join()
            for _ in range(2):
                warnings.warn(syncs.SYNC_WARNING)
            warnings.warn("an unrelated warning")
    assert counter.count(syncs.LOOP_THREAD) == 1 and counter.count() == 3
    assert "test_gpu_tools.py:" in counter.where(syncs.LOOP_THREAD)
    assert counter.where(syncs.LOOP_THREAD, others=True).startswith("MainThread tests/test_gpu_tools.py:")
    assert counter.where(syncs.LOOP_THREAD, others=True).endswith(" x2")
    assert [str(w.message) for w in others] == ["an unrelated warning"]
    assert warnings.showwarning is shown


def test_engine_driver_runs_real_iterations_and_reads_the_counter_per_iteration() -> None:
    """The sync_count part's engine side on a CPU: the real Engine, in-process, the workload twice."""
    from lcmserve.export.loading import load_pipeline

    syncs = script_module("probe_syncs")
    runtime = syncs.eager_runtime(load_pipeline("tiny", dtype=torch.float32, device="cpu"), "tiny")
    params = syncs.workload(runtime.tokenizer, 64)
    assert len(params) == 10 and sum(2 if p.guidance_scale > 1 else 1 for p in params) == 12
    driver = syncs.EngineDriver(runtime)
    try:
        warm = driver.run(params, timeout_s=120)
        assert (warm["failures"], warm["images"], warm["iterations"]) == ([], 10, 4)  # one batch, 4 steps
        readings = iter(range(100))
        counted = driver.run(params, timeout_s=120, counter=lambda: next(readings))
    finally:
        driver.close()
    assert counted["iterations"] == 4 and counted["per_iteration"] == [1, 1, 1, 1] and counted["images"] == 10


def test_budget_keeps_the_fixed_shares_of_later_stages() -> None:
    stagekit = script_module("stagekit")
    budget = stagekit.Budget(100, {"b": 7}, reserve_s=0)
    assert 99 < budget.limit("a", 500) <= 100 and budget.limit("b", 500) == 7
    assert 59 < budget.limit("a", 500, kept_for_later_s=40) <= 60 and budget.limit("a", 30, 40) == 30
    probe = script_module("gpu_probe")
    assert list(probe.PLAN)[-len(probe.FIXED):] == list(probe.FIXED)  # the repros last, with their shares
    assert list(probe.PLAN)[-2:] == ["aoti_graph", "compile_thread"]


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (from /proc)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan whose reaper has not come yet)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_gpu_check_interrupted_while_serving_kills_the_server_and_writes_the_table(tmp_path: pathlib.Path) -> None:
    work = tmp_path / "w"
    check = subprocess.Popen([sys.executable, "scripts/gpu_check.py", "--tiny", "--work", str(work), "--out",
                              str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while '"stage": "serve_eager", "status": "ok"' not in (
                (tmp_path / "results.jsonl").read_text() if (tmp_path / "results.jsonl").exists() else ""):
            assert check.poll() is None and time.monotonic() < deadline, "the eager server never came up"
            time.sleep(0.5)
        servers = processes_mentioning(f"{work}/artifact-eager")
        assert servers, "no server process found"
        check.send_signal(signal.SIGTERM)
        assert check.wait(20) == 0  # no grace period to wait out: the servers are killed
    finally:
        if check.poll() is None:
            check.kill()
    table = (tmp_path / "table.md").read_text()
    assert "| interrupted | stopped |" in table and "| serve_eager | ok |" in table
    time.sleep(0.5)
    assert not [pid for pid in servers if running(pid)]
