"""In-process GPU probe (issues #15 and #18): are the CUDA graphs correct and fast, what does the
host work of an LCM step cost, how often does the engine loop wait for the GPU, which eager speed
levers pay, and do the predicted failures (#15 items 1-3) happen? No gRPC, no server.

    python scripts/gpu_probe.py                   # on the GPU: sd15-random fp16, at most --budget 170 s
    python scripts/gpu_probe.py                   # on a CPU: the tiny preset, a dry run (see below)

Parts, in order, each under its own deadline (its share in PLAN, `--stage-timeout PART=S` to
change one) inside --budget. The repros keep a fixed share: the parts before them may use only
what is left after those shares, so a slow build cannot starve them.
  build           the preset, loaded as the server loads it (load_pipeline); builds the preset cache
                  that gpu_check.py then reuses
  unet_graphs     per bucket (--buckets 1/8/32/64 at 512x512): eager vs BucketedGraphs replay, max
                  |diff| on inputs other than the captured ones (graphs must be correct, not only
                  fast), a padded batch (bucket - 1 rows) against eager at that size, ms per call, capture s
  vae_graphs      the same for the VAE decode, at the buckets its batches use (--vae-buckets 1/2/4/8)
  lcm_step        one step at batch 32 (UNet + lcm_step + renoise) with the host work the engine did
                  (a sync per UNet call, per-sample CPU generators, pageable copies, per-step
                  constant stacks) and without it (device-side constants, pre-drawn noise)
  sync_count      #18 item 1: real engine iterations (the in-process Engine) under
                  torch.cuda.set_sync_debug_mode("warn"): syncs per iteration and where (probe_syncs.py)
  levers          #18 item 7: channels_last (UNet, VAE), fused QKV, both, a VAE decode of 16 against
                  two of 8: ms per call at the engine's buckets (probe_levers.py)
  failed_capture  #15 item 3: a capture that fails (a host sync inside) must leave the stream and the
                  allocator as they were and run eagerly; and raw torch.cuda.graph's behaviour
  aoti_graph      #15 item 1: torch.export + AOTInductor, captured at batch 1, then batch 2
                  (run_single_threaded=True first: the variant expected to pass)
  compile_thread  #15 item 2: torch.compile(mode="reduce-overhead") warmed in one thread, called from another
  memory          torch.cuda.max_memory_reserved / allocated
One JSON line per result to --out (default $OUT/probe.jsonl), a table at the end (and beside it,
probe.md). On a CPU: the tiny preset at 64x64 with one torch thread, eager timings, the LCM step
and the levers; parts that need CUDA (graphs, sync_count, the repros, memory) are skipped with
"no CUDA".
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from stagekit import (
    Budget,
    Interrupted,
    Recorder,
    StageTimeout,
    alarm,
    fmt,
    markdown_table,
    on_termination,
    parse_timeouts,
    too_old,
    versions,
)

# Each part's deadline (s) on an H100/H200, in run order: 170 s in all (--budget, PROBE_BUDGET_S).
PLAN = {"build": 50, "unet_graphs": 15, "vae_graphs": 10, "lcm_step": 5, "sync_count": 15, "levers": 20,
        "failed_capture": 5, "aoti_graph": 25, "compile_thread": 25}
FIXED = ("failed_capture", "aoti_graph", "compile_thread")  # the repros: their share is kept for them
CPU_FACTOR = 2  # a CPU dry run: tiny shapes, but one thread of a core other jobs share


class Probe:
    def __init__(self, args: argparse.Namespace, rec: Recorder, budget: Budget) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.rec = rec
        self.budget = budget
        self.cuda = torch.cuda.is_available() and args.device != "cpu"
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.preset = "tiny" if args.tiny or not self.cuda else "sd15-random"
        if not self.cuda:  # a shared small CPU: one OpenMP thread, not a team stalled at every barrier
            torch.set_num_threads(1)
        self.side = 512 if self.preset == "sd15-random" else 64
        self.iters = args.iters or (5 if self.cuda else 2)
        self.status: dict[str, str] = {}
        self.pipe: Any = None
        self.work = pathlib.Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)

    def row(self, part: str, **fields: Any) -> None:
        self.rec.emit(part=part, status="row", **fields)

    def part(self, name: str, fn: Callable[[], dict[str, Any] | None], *, cuda: bool = False,
             needs: tuple[str, ...] = ("build",), always: bool = False) -> None:
        """Run one part under its deadline (SIGALRM); record ok / failed / timeout / skipped.
        `always`: a part of a few ms that runs (5 s deadline) even when the budget is spent."""
        later = list(PLAN)[list(PLAN).index(name) + 1:] if name in PLAN else []
        kept = sum(self.budget.overrides.get(n, PLAN[n]) for n in later if n in FIXED) if self.cuda else 0.0
        share = PLAN.get(name, 10) * (1 if self.cuda else CPU_FACTOR)
        limit = 5.0 if always else self.budget.limit(name, share, kept)
        reason = ("no CUDA" if cuda and not self.cuda else
                  f"needs {', '.join(needs)}" if any(self.status.get(n) != "ok" for n in needs) else
                  "no time left in --budget" if not always and self.budget.left() - kept < 2 else None)
        if reason:
            self.status[name] = "skipped"
            self.rec.emit(part=name, status="skipped", reason=reason)
            return
        start = time.monotonic()
        fields: dict[str, Any] = {}
        try:
            with alarm(limit):
                fields = fn() or {}
            status = "ok"
        except StageTimeout as exc:
            status, fields = "timeout", {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - recorded; the next part runs
            status, fields = "failed", {"error": f"{type(exc).__name__}: {exc}"[-600:]}
        if self.cuda:
            try:
                self.torch.cuda.empty_cache()
            except RuntimeError as exc:  # a sticky CUDA error: the later parts will say so too
                fields["after"] = f"empty_cache: {exc}"[:300]
        self.status[name] = status
        self.rec.emit(part=name, status=status, seconds=round(time.monotonic() - start, 1), limit_s=round(limit),
                      **fields)

    def free(self) -> None:
        """Give cached device memory back between measurements (a no-op on a CPU)."""
        if self.cuda:
            self.torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed_ms(self, fn: Callable[[], object], iters: int, warm: int = 1) -> float:
        """Median wall time of one call, ms, the device synchronized around each."""
        for _ in range(warm):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1e3, 3)

    def timed_pair(self, a: Callable[[], object], b: Callable[[], object], iters: int) -> tuple[float, float]:
        """Median ms of a and of b, their calls interleaved so that drifts in speed hit both alike."""
        a()
        b()
        self.sync()
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(iters):
            for fn, into in ((a, times[0]), (b, times[1])):
                start = time.perf_counter()
                fn()
                self.sync()
                into.append(time.perf_counter() - start)
        return round(statistics.median(times[0]) * 1e3, 3), round(statistics.median(times[1]) * 1e3, 3)

    # ---- parts --------------------------------------------------------------------------------

    def build(self) -> dict[str, Any]:
        from lcmserve.export.loading import load_pipeline

        self.pipe = load_pipeline(self.preset, dtype=self.dtype, device=str(self.device))
        params = sum(p.numel() for p in self.pipe.unet.parameters())
        return {"preset": self.preset, "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "unet_params_M": round(params / 1e6, 1), "side": self.side}

    def unet_call(self, latents: Any, timesteps: Any, text: Any) -> Any:
        return self.pipe.unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]

    def vae_call(self, latents: Any) -> Any:
        return self.pipe.vae.decode(latents, return_dict=False)[0]

    def unet_inputs(self, batch: int, seed: int) -> tuple[Any, ...]:
        torch = self.torch
        g = torch.Generator("cpu").manual_seed(seed)
        h = self.side // 8
        hidden = self.pipe.text_encoder.config.hidden_size
        return (torch.randn(batch, 4, h, h, generator=g).to(self.device, self.dtype),
                torch.randint(0, 1000, (batch,), generator=g).to(self.device),
                torch.randn(batch, 77, hidden, generator=g).to(self.device, self.dtype))

    def vae_inputs(self, batch: int, seed: int) -> tuple[Any, ...]:
        return self.unet_inputs(batch, seed)[:1]

    def graphs_part(self, part: str, fn: Callable[..., Any], make: Callable[[int, int], tuple[Any, ...]],
                    buckets: list[int]) -> dict[str, Any]:
        """Eager vs graph replay per bucket; rows per bucket, a summary of the worst diff."""
        torch = self.torch
        worst = 0.0
        with torch.inference_mode():
            for bucket in buckets:
                iters = self.iters if bucket <= 8 else max(2, self.iters // 2)
                inputs = make(bucket, 1)
                eager_ms = self.timed_ms(lambda: fn(*inputs), iters)
                fields: dict[str, Any] = {"bucket": bucket, "eager_ms": eager_ms}
                reference = fn(*inputs).float()
                fields["out_abs_max"] = round(float(reference.abs().max()), 3)
                fields["finite"] = bool(torch.isfinite(reference).all())
                if self.cuda:
                    from lcmserve.server.engine.cuda_graphs import BucketedGraphs

                    graphs = BucketedGraphs(fn, (bucket,), f"probe-{part}", max_resolutions=1)
                    start = time.perf_counter()
                    graphs(*make(bucket, 2))  # the capture, on other values than those compared
                    self.sync()
                    fields["capture_s"] = round(time.perf_counter() - start, 2)
                    if graphs.disabled:
                        fields["capture_error"] = graphs.disabled[:300]
                    diff = float((graphs(*inputs).float() - reference).abs().max())
                    fields["max_abs_diff"] = diff
                    worst = max(worst, diff)
                    fields["graph_ms"] = self.timed_ms(lambda: graphs(*inputs), iters)
                    if bucket > 1:  # padded: bucket - 1 real rows; eager at that size may pick other kernels
                        fewer = tuple(x[: bucket - 1] for x in inputs)
                        fields["padded_max_abs_diff"] = float((graphs(*fewer).float() - fn(*fewer).float()).abs().max())
                    fields["replays"] = graphs.replays
                    del graphs
                    torch.cuda.empty_cache()
                self.row(part, **fields)
        return {"buckets": buckets, "worst_max_abs_diff": worst if self.cuda else None}

    def lcm_step(self) -> dict[str, Any]:
        """One LCM step at batch 32, the engine's host work against device-only work."""
        torch = self.torch
        from lcmserve.server.engine.lcm import Coefficients, LcmSchedule, lcm_step, renoise

        batch, h = 32, self.side // 8
        schedule = LcmSchedule(self.pipe.scheduler, 8, device=self.device)
        steps = [schedule.steps[4][i % 3] for i in range(batch)]  # mixed steps, each with a next step
        latents, _, text = self.unet_inputs(batch, 3)
        latents = latents.float()
        unet: Callable[..., Any] = self.unet_call
        if self.cuda:
            from lcmserve.server.engine.cuda_graphs import BucketedGraphs

            unet = BucketedGraphs(self.unet_call, (batch,), "probe-lcm", max_resolutions=1)
        table_cpu = schedule.table.cpu()

        def with_host(generators: list[Any]) -> Any:
            timesteps = torch.tensor([s.timestep for s in steps], device=self.device)
            eps = unet(latents.to(self.dtype), timesteps, text).float()
            self.sync()  # as the engine did after every UNet call
            c = Coefficients(*(torch.stack([table_cpu[s.row, k] for s in steps]).view(-1, 1, 1, 1).to(self.device)
                               for k in range(6)))  # six stacks of 0-d constants per step
            noise = torch.cat([torch.randn((1, 4, h, h), generator=g, dtype=self.dtype) for g in generators])
            return renoise(lcm_step(latents, eps, c), noise.to(self.device).float(), c)  # pageable copy

        rows = torch.tensor([s.row for s in steps], device=self.device)

        def device_only(noise: Any) -> Any:
            c = schedule.coefficients(rows)
            eps = unet(latents.to(self.dtype), schedule.timesteps[rows], text).float()
            return renoise(lcm_step(latents, eps, c), noise, c)

        def fresh() -> list[Any]:
            return [torch.Generator("cpu").manual_seed(1000 + i) for i in range(batch)]

        with torch.inference_mode():
            drawn = torch.cat([torch.randn((1, 4, h, h), generator=g, dtype=self.dtype) for g in fresh()])
            noise = drawn.to(self.device).float()  # at admission, in the engine now
            diff = float((with_host(fresh()) - device_only(noise)).abs().max())
            gens = fresh()
            host_ms, device_ms = self.timed_pair(lambda: with_host(gens), lambda: device_only(noise), self.iters)
        self.row("lcm_step", batch=batch, with_host_ms=host_ms, device_only_ms=device_ms,
                 host_work_ms=round(host_ms - device_ms, 3), max_abs_diff=diff, graphs=self.cuda)
        return {"host_work_ms": round(host_ms - device_ms, 3), "max_abs_diff": diff}

    def memory(self) -> dict[str, Any]:
        torch = self.torch
        return {"max_memory_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                "max_memory_allocated_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}

    def run_all(self) -> None:
        import probe_levers
        import probe_repros
        import probe_syncs

        unet_buckets, vae_buckets = ([int(b) for b in text.split(",")] for text in (self.args.buckets,
                                                                                    self.args.vae_buckets))
        self.part("build", self.build, needs=())
        self.part("unet_graphs", lambda: self.graphs_part("unet_graphs", self.unet_call, self.unet_inputs,
                                                          unet_buckets))
        self.part("vae_graphs", lambda: self.graphs_part("vae_graphs", self.vae_call, self.vae_inputs, vae_buckets))
        self.part("lcm_step", self.lcm_step)
        self.part("sync_count", lambda: probe_syncs.sync_count(self), cuda=True)
        self.part("levers", lambda: probe_levers.levers(self))
        self.part("failed_capture", lambda: probe_repros.failed_capture(self), cuda=True, needs=())
        self.part("aoti_graph", lambda: probe_repros.aoti_graph(self), cuda=True, needs=())
        self.part("compile_thread", lambda: probe_repros.compile_thread(self), cuda=True, needs=())
        self.part("memory", self.memory, cuda=True, needs=(), always=True)


def render(records: list[dict[str, Any]]) -> str:
    """A row per record: a part's outcome (status, seconds / deadline) or one of its measurements."""
    rows: list[list[object]] = []
    skip = {"part", "status", "t_s", "seconds", "limit_s", "eager_ms", "graph_ms", "base_ms", "lever_ms",
            "max_abs_diff", "bucket", "variant", "reason"}
    for r in records:
        if "part" not in r:
            continue
        what = " ".join(str(x) for x in (r.get("variant"), f"bucket {r['bucket']}" if "bucket" in r else None) if x)
        status = r["status"] if r["status"] != "row" else ""
        if "reason" in r:
            status += f": {r['reason']}"
        if "seconds" in r:
            status += f" ({r['seconds']}/{r['limit_s']} s)"
        notes = {k: v for k, v in r.items() if k not in skip}
        rows.append([r["part"], status, what, fmt(r.get("eager_ms", r.get("base_ms")), 2),
                     fmt(r.get("graph_ms", r.get("lever_ms")), 2), fmt(r.get("max_abs_diff"), 4),
                     ", ".join(f"{k}={v}" for k, v in notes.items())[:400]])
    return markdown_table(["part", "status", "what", "eager / base ms", "graph / lever ms", "max abs diff", "notes"],
                          rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, help="JSON lines file (default $OUT/probe.jsonl)")
    p.add_argument("--work", default="/tmp/lcmserve-probe", help="scratch folder (AOTInductor package)")
    p.add_argument("--budget", type=float, default=170.0, metavar="S", help="seconds for all parts (default 170)")
    p.add_argument("--stage-timeout", action="append", default=[], metavar="PART=S",
                   help="override one part's deadline (repeatable), e.g. vae_graphs=10")
    p.add_argument("--buckets", default="1,8,32,64", help="UNet batch sizes (default 1,8,32,64)")
    p.add_argument("--vae-buckets", default="1,2,4,8",
                   help="VAE decode batch sizes (default 1,2,4,8: the engine decodes at most 8 at once)")
    p.add_argument("--iters", type=int, default=0, help="timed calls per measurement (default 5; 2 on a CPU)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset even on a GPU (a quick smoke run)")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    args = p.parse_args(argv)
    try:
        overrides = parse_timeouts(args.stage_timeout)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = args.out or pathlib.Path(os.environ.get("OUT", "/tmp/lcmserve-probe")) / "probe.jsonl"
    rec = Recorder(out)
    found = versions()
    rec.emit(part="env", status="row", **found)
    on_termination()
    probe: Probe | None = None
    problems = too_old(found)
    try:
        if problems:  # lcmserve.server imports the package, whose stubs need these
            rec.emit(part="versions", status="failed", error="; ".join(problems))
        else:
            probe = Probe(args, rec, Budget(args.budget, overrides, reserve_s=2))
            if probe.cuda:
                torch = probe.torch
                rec.emit(part="device", status="row", name=torch.cuda.get_device_name(),
                         capability=".".join(map(str, torch.cuda.get_device_capability())), cuda=torch.version.cuda)
            probe.run_all()
    except Interrupted as exc:
        rec.emit(part="interrupted", status="stopped", error=str(exc))
    finally:
        skipped = [r["part"] for r in rec.records if r.get("status") == "skipped"]
        text = (f"\n## lcmserve GPU probe ({probe.preset if probe else '?'}, {probe.device if probe else '?'})\n\n"
                f"{render([r for r in rec.records if r.get('part') != 'env'])}\n\n"
                f"skipped: {', '.join(skipped) or 'none'}\n")
        print(text, flush=True)
        out.with_suffix(".md").write_text(text)
    bad = [r for r in rec.records if r.get("status") in ("failed", "timeout")]
    return 2 if problems else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
