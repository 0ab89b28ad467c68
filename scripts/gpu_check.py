"""The project's GPU check: build sd15-random + two LoRAs, export, serve, load it over gRPC, time
plain and like-for-like diffusers beside it, print one table. Fits one `device` call.

    bash scripts/gpu_check.sh                # on the GPU machine: install, probe, then this
    python scripts/gpu_check.py --tiny       # a dry run of the same path on a CPU (tiny, 64x64)

Before anything imports lcmserve it prints the versions (read from package metadata) and stops,
with the table, if grpcio < 1.84 or protobuf < 7.35.1 (the generated stubs refuse to import).
Every stage runs in a child process under its own deadline (`--stage-timeout NAME=SECONDS`
overrides one; all share `--budget`); a stage that fails or times out is recorded, whatever needs
it is skipped, and the table is printed in every case, SIGTERM included. Heavy files (preset cache,
artifacts, logs) go to --work (default /tmp/lcmserve-gpu-work); only results.jsonl and table.md go
to --out ($OUT). Stages, default deadline on an H100 (s):
  import 60 | loras 240 (builds the sd15-random preset unless the probe did) | export_eager 300
  serve_eager 180, bench_eager_low 120 (c=1,8, 32 requests each), bench_eager_high 150 (c=32,64,
  --duration s each: a fixed request count would make c=64 one wave) | baseline_plain 180
  (`lcmserve bench --baseline`: diffusers eager, PIL, serial encode, prompts re-encoded) |
  baseline_cached 180 (scripts/baseline_cached.py: same prompt cache and threaded JPEG encoding
  as the server, no per-step sync) | with --aoti: export_aoti 420, serve_aoti 240, bench_aoti_*
  | with --anchor S: ../shared/anchors/gpu_baseline.py (or .device/anchors/) for S seconds.
On the GPU (with --tiny only given --decoders), the eager artifact ships the preset's tiny
autoencoder (`--tiny-vae`, TAESD's shapes): after the VAE levels, bench_eager_tiny runs c=32,64 with
`--decoder tiny-vae` on the same server (120 s); bench_eager_img2img 120 (c=32,64 with --init-image,
a side x side PNG, --strength 0.5: 2 of the 4 steps run, plus a VAE encode per request); decode_timing 120 (scripts/decode_timing.py --jpeg: one 512x512 decode, VAE against tiny, and JPEG
q90 on the host (PIL) against the GPU (torchvision's nvjpeg), batch 1 and 8).
Best-of-N: the eager artifact ships `--scorer tiny`; bench_eager_best3 120 (c=32,64, `--candidates 3`);
scorer_cost 120 (scripts/scorer_cost.py: per image, tiny and ViT-B/32's shapes, random weights).
HTTP: the eager server also serves --http-port 0; bench_eager_http 120 (c=32,64 over /v1/generate, SSE).
adapter_cost 240 (scripts/adapter_cost.py: UNet calls with no adapters, every row one rank-32
adapter, 8 rows over 4 adapters with different scales; 512x512, CUDA graphs, buckets 8 and 32; with
--tiny only given --adapters).
parity 120, on CUDA only (skipped with "no CUDA" on a CPU), while the eager server runs, after its
c=32,64 levels: scripts/parity_check.py: 4 seeds as RAW requests alone and inside a wave of 32
concurrent requests, each against diffusers' fp16 StableDiffusionPipeline at batch 1 with the same
generator (max and mean |diff| in 1/255; alone vs wave too).
The table is written before the clean-up; on SIGTERM/SIGINT the servers are killed, not terminated.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

from stagekit import (
    Budget,
    Interrupted,
    Recorder,
    Server,
    StageTimeout,
    on_termination,
    parse_timeouts,
    render,
    run,
    too_old,
    versions,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable
MIN_STAGE_S = 3.0  # a stage with less time than this left is skipped, not started
Body = Callable[[float], dict[str, Any]]


def make_loras(base: str, folder: pathlib.Path) -> None:
    """Child mode: two LoRAs as the user stacks them: r64 diffusers-format "LCM", r32 kohya "crack"
    with text-encoder keys. make_lora lives in tests/synthetic.py (test tooling)."""
    sys.path.insert(0, str(REPO / "tests"))  # tests/ is no package: its modules import by name
    make_lora = importlib.import_module("synthetic").make_lora
    import torch

    from lcmserve.export.loading import load_pipeline

    pipe = load_pipeline(base, dtype=torch.float32, device="cpu")
    folder.mkdir(parents=True, exist_ok=True)
    make_lora(pipe, folder / "lcm.safetensors", fmt="diffusers", rank=64, seed=1)
    make_lora(pipe, folder / "crack.safetensors", fmt="kohya", rank=32, seed=2, include_text_encoder=True)


class Check:
    def __init__(self, args: argparse.Namespace, rec: Recorder, budget: Budget, work: pathlib.Path) -> None:
        self.args = args
        self.rec = rec
        self.budget = budget
        self.work = work
        self.status: dict[str, str] = {}
        self.current = ""  # the stage running now (for the record of an interruption)
        self.servers: list[Server] = []
        self.expected_skips: set[str] = set()  # CUDA-only stages on a CPU
        self.tiny = bool(args.tiny)
        self.decoders = not self.tiny or bool(args.decoders)  # the tiny-autoencoder and JPEG stages
        self.base = "tiny" if self.tiny else "sd15-random"
        self.side = "64" if self.tiny else "512"
        self.device = "cpu" if self.tiny else "cuda"
        self.dtype = "float32" if self.tiny else "float16"
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.env.setdefault("LCMSERVE_CACHE", str(work / "cache"))
        self.shape = ["--width", self.side, "--height", self.side, "--steps", "4", "--format", "jpeg"]

    # ---- running a stage ------------------------------------------------------------------

    def stage(self, name: str, default_s: float, body: Body, needs: tuple[str, ...] = (), cuda: bool = False) -> bool:
        """Run `body(limit_s)` under its deadline and record it; True when it succeeded. A `cuda`
        stage is skipped with "no CUDA" on a CPU (an expected skip: not a failure of the check)."""
        missing = [n for n in needs if self.status.get(n) != "ok"]
        limit = self.budget.limit(name, default_s)
        if cuda and self.device != "cuda":
            self.expected_skips.add(name)
            self._record(name, "skipped", 0.0, limit, {"reason": "no CUDA"})
            return False
        if missing:
            self._record(name, "skipped", 0.0, limit, {"reason": f"needs {', '.join(missing)}"})
            return False
        if self.budget.left() < MIN_STAGE_S:
            self._record(name, "skipped", 0.0, limit, {"reason": "no time left in --budget"})
            return False
        start = time.monotonic()
        self.current = name
        try:
            fields, status = body(limit), "ok"
        except StageTimeout as exc:
            fields, status = {"error": str(exc)}, "timeout"
        except Exception as exc:  # noqa: BLE001 - recorded, and the check goes on
            fields, status = {"error": f"{type(exc).__name__}: {exc}"[-600:]}, "failed"
        self._record(name, status, time.monotonic() - start, limit, fields)
        return status == "ok"

    def _record(self, name: str, status: str, seconds: float, limit: float, fields: dict[str, Any]) -> None:
        self.status[name] = status
        self.rec.emit(stage=name, status=status, seconds=round(seconds, 1), limit_s=round(max(limit, 0.0)),
                      **fields)

    def cli(self, name: str, args: list[str], limit: float) -> dict[str, Any]:
        rc, tail = run([PY, "-m", "lcmserve.cli", *args], self.work / f"{name}.log", limit, env=self.env)
        if rc:
            raise RuntimeError(f"exit {rc}: {tail}")
        return {}

    # ---- stages -----------------------------------------------------------------------------

    def run_all(self) -> None:
        loras, eager = self.work / "loras", self.work / "artifact-eager"
        self.stage("import", 60, lambda limit: self._import(limit))
        self.stage("loras", 240 if not self.tiny else 180, lambda limit: self._loras(loras, limit), needs=("import",))
        self.stage("export_eager", 300, lambda limit: self._export(eager, "eager", loras, limit), needs=("loras",))
        self.serve_and_bench("eager", eager, needs="export_eager")
        if self.decoders:
            self.stage("decode_timing", 120, self._decode_timing, needs=("import",))
        self.stage("scorer_cost", 120, self._scorer_cost, needs=("import",))
        if not self.tiny or self.args.adapters:
            self.stage("adapter_cost", 240, self._adapter_cost, needs=("import",))
        batches = "1,8" if self.tiny else "1,32"
        iters = "2" if self.tiny else "5"
        self.stage("baseline_plain", 180, lambda limit: self._baseline_plain(eager, batches, iters, limit),
                   needs=("export_eager",))
        self.stage("baseline_cached", 180, lambda limit: self._baseline_cached(eager, batches, iters, limit),
                   needs=("export_eager",))
        if self.args.aoti:
            aoti = self.work / "artifact-aoti"
            self.stage("export_aoti", 420, lambda limit: self._export(aoti, "aoti", loras, limit), needs=("loras",))
            self.serve_and_bench("aoti", aoti, needs="export_aoti")
        if self.args.anchor:
            self.stage("anchor", self.args.anchor, self._anchor)

    def serve_and_bench(self, backend: str, artifact: pathlib.Path, needs: str) -> None:
        holder: list[Server] = []

        def serve(limit: float) -> dict[str, Any]:
            server = Server(["--model", str(artifact), "--backend", backend, "--max-batch-size", "64",
                             "--device", self.device, "--http-port", "0"], self.work / f"serve-{backend}.log", limit, self.env)
            holder.append(server)
            self.servers.append(server)
            return {"ready_s": round(server.ready_s, 1)}

        if not self.stage(f"serve_{backend}", 180 if backend == "eager" else 240, serve, needs=(needs,)):
            return
        server = holder[0]
        low, requests = ("1,4", "12") if self.tiny else ("1,8", "32")
        high = "16" if self.tiny else "32,64"
        duration = str(self.args.duration or (3 if self.tiny else 10))
        try:
            self.stage(f"bench_{backend}_low", 120, lambda limit: self._bench(
                server.target, f"bench_{backend}_low", ["--concurrency", low, "--requests", requests], limit))
            self.stage(f"bench_{backend}_high", 150, lambda limit: self._bench(
                server.target, f"bench_{backend}_high", ["--concurrency", high, "--duration", duration], limit))
            if backend == "eager":
                self.stage("parity", 120, lambda limit: self._parity(server.target, artifact, limit), cuda=True)
            if backend == "eager" and self.decoders:  # the artifact has the tiny autoencoder: the same levels
                self.stage("bench_eager_tiny", 120, lambda limit: self._bench(
                    server.target, "bench_eager_tiny", ["--concurrency", high, "--duration", duration,
                                                        "--decoder", "tiny-vae"], limit))
            if backend == "eager":  # img2img at the same size: every request VAE-encodes a photo, runs 2 of 4 steps
                self.stage("bench_eager_img2img", 120, lambda limit: self._bench(
                    server.target, "bench_eager_img2img", ["--concurrency", high, "--duration", duration,
                                                           "--init-image", str(self._init_image()),
                                                           "--strength", "0.5"], limit))
            if backend == "eager":  # best-of-3: 3 images generated and scored per image returned
                self.stage("bench_eager_best3", 120, lambda limit: self._bench(server.target, "bench_eager_best3", [
                    "--concurrency", high, "--duration", duration, "--candidates", "3"], limit))
            if backend == "eager":  # the same high levels through the HTTP front door (/v1/generate, SSE)
                self.stage("bench_eager_http", 120, lambda limit: self._bench(
                    f"http://{server.http_target}", "bench_eager_http", ["--concurrency", high, "--duration", duration],
                    limit))
        except BaseException:  # SIGTERM, or a deadline that escaped: no grace, the table comes first
            server.child.kill()
            raise
        finally:
            server.stop()  # (at once when killed above)
            self.servers.remove(server)

    def _import(self, limit: float) -> dict[str, Any]:
        code = "import lcmserve, lcmserve.cli, lcmserve.server, lcmserve.export.loading; print(lcmserve.__version__)"
        log = self.work / "import.log"
        rc, tail = run([PY, "-c", code], log, limit, env=self.env)
        if rc:
            raise RuntimeError(f"import lcmserve failed: {tail}")
        return {"lcmserve": tail.strip().splitlines()[-1] if tail.strip() else "?"}

    def _loras(self, folder: pathlib.Path, limit: float) -> dict[str, Any]:
        rc, tail = run([PY, str(pathlib.Path(__file__).resolve()), "--make-loras", str(folder), "--base", self.base],
                       self.work / "loras.log", limit, env=self.env)
        if rc:
            raise RuntimeError(f"exit {rc}: {tail}")
        return {"base": self.base}

    def _export(self, out: pathlib.Path, backend: str, loras: pathlib.Path, limit: float) -> dict[str, Any]:
        return self.cli(f"export_{backend}", [
            "export", "--base", self.base, "--lora", f"{loras / 'lcm.safetensors'}:1.0",
            "--lora", f"{loras / 'crack.safetensors'}:0.8", "--out", str(out), "--dtype", self.dtype,
            "--device", self.device, "--backend", backend, "--force", "--no-progress",
            *(["--tiny-vae", self.base] if backend == "eager" and self.decoders else []),
            *(["--scorer", "tiny"] if backend == "eager" else [])], limit)

    def _scorer_cost(self, limit: float) -> dict[str, Any]:
        path = self.work / "scorer_cost.json"
        rc, tail = run([PY, str(REPO / "scripts" / "scorer_cost.py"), "--device", self.device, "--dtype", self.dtype,
                        "--side", self.side, "--json", str(path)], self.work / "scorer_cost.log", limit, env=self.env)
        if rc:
            raise RuntimeError(f"exit {rc}: {tail}")
        for row in (rows := json.loads(path.read_text())):
            self.rec.emit(stage="scorer_cost", status="level", batch=row["batch"], p50_ms=row["ms_per_image"],
                          how=f"CLIPScore per image, {row['scorer']}, batch {row['batch']} x {self.side}px")
        return {"rows": len(rows)}

    def _decode_timing(self, limit: float) -> dict[str, Any]:
        path = self.work / "decode_timing.json"
        rows: list[dict[str, Any]] = []
        for batch in ("1", "8"):
            cmd = [PY, str(REPO / "scripts" / "decode_timing.py"), "--device", self.device, "--dtype", self.dtype,
                   "--side", self.side, "--batch", batch, "--repeats", "3" if self.tiny else "10", "--jpeg",
                   "--json", str(path)]
            rc, tail = run(cmd, self.work / f"decode_timing_{batch}.log", limit / 2, env=self.env)
            if rc:
                raise RuntimeError(f"exit {rc}: {tail}")
            result = json.loads(path.read_text())
            for row in result["decode"] + result.get("jpeg", []):
                what = f"decode {row['decoder']}" if "decoder" in row else f"jpeg {row['encoder']}"
                self.rec.emit(stage="decode_timing", status="level", batch=batch, p50_ms=row.get("median_ms"),
                              how=f"{what}, batch {batch} x {self.side}px {self.dtype}" + (
                                  f" ({row['error']})" if "error" in row else ""))
                rows.append(row)
        return {"rows": len(rows)}

    def _adapter_cost(self, limit: float) -> dict[str, Any]:
        """scripts/adapter_cost.py: UNet calls without adapters, every row one rank-32 adapter, rows over 4
        adapters with different scales; 512x512 with CUDA graphs at buckets 8 and 32 (tiny: 64x64, 8 rows)."""
        path = self.work / "adapter_cost.jsonl"
        shape = ["--base", "tiny", "--side", "64", "--rows", "8", "--rank", "8"] if self.tiny else [
            "--base", self.base, "--side", "512", "--rows", "8,32", "--rank", "32", "--graphs"]
        cmd = [PY, str(REPO / "scripts" / "adapter_cost.py"), *shape, "--device", self.device, "--dtype", self.dtype,
               "--json", str(path)]
        rc, tail = run(cmd, self.work / "adapter_cost.log", limit, env=self.env)
        if rc:
            raise RuntimeError(f"exit {rc}: {tail}")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            self.rec.emit(stage="adapter_cost", status="level", batch=row["rows"], p50_ms=row["unet_ms"],
                          how=f"UNet call, {row['case']} adapters, {row['side']}px, graphs {row['graphs']}: "
                              f"{row['vs_none']}x none" + (f", {row['mixed_vs_single']}x single"
                                                           if "mixed_vs_single" in row else ""))
        return {"rows": len(rows)}

    def _parity(self, target: str, artifact: pathlib.Path, limit: float) -> dict[str, Any]:
        """scripts/parity_check.py against the running server; a level row per seed."""
        path = self.work / "parity.json"
        cmd = [PY, str(REPO / "scripts" / "parity_check.py"), "--target", target, "--model", str(artifact),
               "--device", self.device, "--dtype", self.dtype, "--side", self.side, "--json", str(path)]
        rc, tail = run(cmd, self.work / "parity.log", limit, env=self.env)
        if rc:
            raise RuntimeError(f"exit {rc}: {tail}")
        result = json.loads(path.read_text())
        from parity_check import describe  # scripts/ is on the path: this script's folder

        for row in result["seeds"]:
            self.rec.emit(stage="parity", status="level", seed=row["seed"], how=describe(row))
        return {"worst_255": result["worst"], "wave": result["wave"], "wave_s": result["wave_s"]}

    def _init_image(self) -> pathlib.Path:
        """A side x side 'wall photo' PNG (gradient, speckle, a dark diagonal) for the img2img level."""
        import numpy as np
        from PIL import Image

        side = int(self.side)
        y, x = np.mgrid[0:side, 0:side]
        grey = 90 + 80 * x / side + 40 * y / side + np.random.default_rng(0).normal(0, 12, (side, side))
        grey[np.abs(y - x) < 3] -= 70
        path = self.work / "wall.png"
        Image.fromarray(np.stack([grey] * 3, axis=-1).clip(0, 255).astype(np.uint8)).save(path)
        return path

    def _bench(self, target: str, name: str, load: list[str], limit: float) -> dict[str, Any]:
        path = self.work / f"{name}.json"
        self.cli(name, ["bench", "--target", target, *load, "--warmup", "8", "--no-progress",
                        "--json", str(path), *self.shape], limit)
        levels = json.loads(path.read_text())["levels"]
        for level in levels:
            self.rec.emit(stage=name, status="level", concurrency=level.get("concurrency"), ok=level["ok"],
                          failed=level["failed"], images_per_s=level["images_per_s"],
                          p50_ms=level["latency_ms"]["p50"], p99_ms=level["latency_ms"]["p99"],
                          first_step_p50_ms=level["first_step_ms"]["p50"], errors=level.get("errors"),
                          generated_per_s=level.get("generated_per_s"))
        return {"levels": len(levels), "failed": sum(level["failed"] for level in levels)}

    def _baseline_plain(self, artifact: pathlib.Path, batches: str, iters: str, limit: float) -> dict[str, Any]:
        path = self.work / "baseline_plain.json"
        self.cli("baseline_plain", ["bench", "--baseline", str(artifact), "--baseline-batch", batches,
                                    "--baseline-iters", iters, "--baseline-device", self.device,
                                    "--no-progress", "--json", str(path), *self.shape], limit)
        return self._baseline_rows("baseline_plain", json.loads(path.read_text()).get("baseline") or [])

    def _baseline_cached(self, artifact: pathlib.Path, batches: str, iters: str, limit: float) -> dict[str, Any]:
        path = self.work / "baseline_cached.json"
        cmd = [PY, str(REPO / "scripts" / "baseline_cached.py"), str(artifact), "--batch", batches, "--iters", iters,
               "--device", self.device, "--side", self.side, "--json", str(path)]
        if self.args.baseline_compile:
            cmd.append("--compile-unet")
        rc, tail = run(cmd, self.work / "baseline_cached.log", limit, env=self.env)
        if rc:
            raise RuntimeError(f"exit {rc}: {tail}")
        return self._baseline_rows("baseline_cached", json.loads(path.read_text())["baseline"])

    def _baseline_rows(self, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        for b in rows:
            self.rec.emit(stage=name, status="level", batch=b["batch_size"], images_per_s=b["images_per_s"],
                          p50_ms=b["latency_ms"]["p50"], p99_ms=b["latency_ms"]["p99"],
                          first_step_p50_ms=(b.get("first_step_ms") or {}).get("p50"), how=b.get("how"))
        return {"batches": len(rows)}

    def _anchor(self, limit: float) -> dict[str, Any]:
        """The project's measuring stick, where it was carried; its results.jsonl read back (cut or not)."""
        script = next((p for p in (REPO.parent / "shared" / "anchors" / "gpu_baseline.py",
                                   REPO / ".device" / "anchors" / "gpu_baseline.py") if p.is_file()), None)
        if script is None:
            raise RuntimeError("gpu_baseline.py is neither in ../shared/anchors nor in .device/anchors")
        out = self.work / "anchor"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").unlink(missing_ok=True)
        cmd = [PY, str(script), *(["--tiny"] if self.tiny else [])]
        try:
            run(cmd, self.work / "anchor.log", limit, env=dict(self.env, OUT=str(out)))
        finally:
            lines = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
            for line in lines:
                row = json.loads(line)
                if row.get("stage") not in ("env", "versions"):
                    self.rec.emit(stage=f"anchor:{row.pop('stage', '?')}", status="level", **row)
        return {"rows": len(lines)}

    def cleanup(self, kill: bool = False) -> None:
        """Stop the servers still running: SIGTERM with a grace period, or (`kill`) SIGKILL at once."""
        for server in list(self.servers):
            if kill:
                server.child.kill()
            else:
                server.stop()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny preset, 64x64, float32")
    p.add_argument("--aoti", action="store_true", help="also export, serve and load an AOTInductor artifact")
    p.add_argument("--decoders", action="store_true",
                   help="with --tiny: also the tiny-autoencoder level and decode/JPEG timing (always on the GPU)")
    p.add_argument("--adapters", action="store_true",
                   help="with --tiny: also the adapter cost stage (scripts/adapter_cost.py; always on the GPU)")
    p.add_argument("--anchor", type=float, default=0.0, metavar="S",
                   help="also run the anchor script gpu_baseline.py for at most S seconds (default: off)")
    p.add_argument("--baseline-compile", action="store_true",
                   help="baseline_cached with the UNet under torch.compile(mode='reduce-overhead') (cold: minutes)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="seconds per level at c >= 32 (default 10; 3 with --tiny)")
    p.add_argument("--budget", type=float, default=540.0, metavar="S",
                   help="seconds for the whole check; each stage gets min(its deadline, what is left)")
    p.add_argument("--stage-timeout", action="append", default=[], metavar="NAME=S",
                   help="override one stage's deadline (repeatable), e.g. export_eager=30")
    p.add_argument("--out", type=pathlib.Path, help="small results: results.jsonl, table.md (default $OUT)")
    p.add_argument("--work", type=pathlib.Path, help="artifacts, caches, logs (default /tmp/lcmserve-gpu-work)")
    p.add_argument("--make-loras", type=pathlib.Path, help=argparse.SUPPRESS)  # child mode of the loras stage
    p.add_argument("--base", default="sd15-random", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.make_loras:
        make_loras(args.base, args.make_loras)
        return 0
    try:
        overrides = parse_timeouts(args.stage_timeout)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = args.out or pathlib.Path(os.environ.get("OUT", "/tmp/lcmserve-gpu-out"))
    work = args.work or pathlib.Path("/tmp/lcmserve-gpu-work")
    work.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out / "results.jsonl")
    on_termination()
    check = Check(args, rec, Budget(args.budget, overrides), work)
    found = versions()
    rec.emit(stage="env", **found)  # printed before anything imports lcmserve
    problems = too_old(found)
    code = 0
    interrupted = False
    try:
        if problems:
            rec.emit(stage="versions", status="failed", error="; ".join(problems),
                     fix="carry newer wheels: make gpu-check-prepare, then scripts/gpu_check.sh installs them")
            code = 2
        else:
            check.run_all()
    except Interrupted as exc:
        interrupted = True
        rec.emit(stage="interrupted", status="stopped", error=str(exc), during=check.current)
    finally:
        table = render(rec.records)  # first: the clean-up may be cut short
        env = ", ".join(f"{k} {v}" for k, v in found.items())
        text = f"\n## lcmserve GPU check ({'tiny, CPU' if args.tiny else 'sd15-random'})\n\n{table}\n\nenv: {env}\n"
        print(text, flush=True)
        (out / "table.md").write_text(text)
        check.cleanup(kill=interrupted)
    if code == 0 and any(s != "ok" and n not in check.expected_skips for n, s in check.status.items()):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
