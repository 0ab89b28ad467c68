"""What per-request adapters cost: UNet calls of the in-process engine, no adapters vs every row the same
adapter vs the rows over several adapters with different scales (issue 21).

    python scripts/adapter_cost.py                                   # sd15-random, 256x256, 8 rows, CPU
    python scripts/adapter_cost.py --device cuda --side 512 --rows 8,32 --graphs   # the GPU check's rows

Each case submits `rows` one-image requests (unguided, --steps LCM steps) to one engine and times its UNet
calls (the engine's own UNet timing: CUDA events on a GPU, wall time on a CPU). The cases take turns, round
after round (so a machine that gets busier or quieter meanwhile weighs on all three alike); the first round
is a warm-up (allocator, CUDA-graph captures) and is not counted. The adapters are rank --rank kohya LoRAs of
the usual kohya_ss targets (attention, feed-forward, proj_in/out, and the text encoder), made with
tests/synthetic.py, held in --adapters slots of rank --rank. Cases:

    none     no row has an adapter: the UNet call carries no extras (the base model only)
    single   every row the same adapter at scale 1
    mixed    row i adapter i mod N at scale 0.4 + 0.1 * (i mod 7): N adapters, every row its own scale

Prints one markdown table (median ms per UNet call; mixed / single is the issue's target, >= 0.9x as fast)
and, with --json, writes the rows there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
# kohya_ss's default LoRA network (no conv_dim): the transformer blocks' linear and 1x1 layers
KOHYA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def make_loras(pipe: Any, folder: pathlib.Path, count: int, rank: int) -> list[pathlib.Path]:
    sys.path.insert(0, str(REPO / "tests"))  # tests/ is no package: its modules import by name
    make_lora = importlib.import_module("synthetic").make_lora
    return [make_lora(pipe, folder / f"adapter{i}.safetensors", fmt="kohya", rank=rank, seed=100 + i,
                      targets=KOHYA_TARGETS, include_text_encoder=True) for i in range(count)]


def cases(rows: int, adapters: int) -> dict[str, list[tuple[tuple[str, float], ...]]]:
    """Each case's adapters per row."""
    return {
        "none": [() for _ in range(rows)],
        "single": [(("adapter0", 1.0),) for _ in range(rows)],
        "mixed": [((f"adapter{i % adapters}", round(0.4 + 0.1 * (i % 7), 2)),) for i in range(rows)],
    }


def run_round(engine: Any, make_params: Any, per_row: list[tuple[tuple[str, float], ...]],
              timings: list[Any]) -> list[float]:
    """ms of each UNet call of one round of a case: all rows admitted together, --steps calls."""
    import torch

    from lcmserve.server.engine.work import OrderedEvents, Request
    from lcmserve.server.protocol import UNetTiming

    requests = [Request(rid=i, params=make_params(seed=i, adapters=adapters), events=OrderedEvents(i, _drop, None),
                        arrival=time.perf_counter()) for i, adapters in enumerate(per_row)]
    for request in requests:
        engine.submit(request)
    del timings[:]
    with torch.inference_mode():
        while any(r.unfinished and not r.failed for r in requests):
            engine.iteration()
    failed = [r.rid for r in requests if r.failed]
    if failed:
        raise RuntimeError(f"requests {failed} failed")
    calls = [t for t in timings if isinstance(t, UNetTiming)]
    if any(t.rows != len(per_row) for t in calls):
        raise RuntimeError(f"the rows did not share their UNet calls: {[t.rows for t in calls]}")
    return [t.seconds * 1e3 for t in calls]


def _drop(rid: int, event: Any) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="sd15-random")
    parser.add_argument("--side", type=int, default=256, help="image side, pixels")
    parser.add_argument("--rows", default="8", help="rows per UNet call, comma-separated (one engine each)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4, help="adapters of the mixed case (and slots)")
    parser.add_argument("--steps", type=int, default=2, help="UNet calls per round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per case (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--graphs", action="store_true", help="CUDA graphs, one bucket per --rows")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from lcmserve.export.loading import load_pipeline
    from lcmserve.server.config import AdapterConfig, EngineConfig
    from lcmserve.server.edge.validation import tokenize
    from lcmserve.server.engine.loop import Engine
    from lcmserve.server.model.loader import runtime_from_pipeline
    from lcmserve.server.protocol import GenerationParams

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("float16" if args.device.startswith("cuda") else "float32")]
    start = time.perf_counter()
    pipe = load_pipeline(args.base, dtype=dtype, device=args.device)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="adapter-cost-"))
    loras = make_loras(load_pipeline(args.base, dtype=torch.float32, device="cpu") if dtype != torch.float32
                       else pipe, folder, args.adapters, args.rank)
    runtime = runtime_from_pipeline(pipe, args.base)
    print(f"loaded {args.base} on {args.device} ({dtype}) and made {len(loras)} rank-{args.rank} LoRAs in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    ids, _, _ = tokenize(runtime.tokenizer, "a photo of a crack in a concrete wall")

    def make_params(seed: int, adapters: tuple[tuple[str, float], ...]) -> GenerationParams:
        return GenerationParams(prompt_ids=ids, negative_ids=ids, num_steps=args.steps, guidance_scale=1.0, seed=seed,
                                width=args.side, height=args.side, num_images=1, output_format="raw", quality=90,
                                preview_mode="none", include_latents=False, adapters=adapters)

    results: list[dict[str, Any]] = []
    for rows in [int(r) for r in args.rows.split(",")]:
        adapters = AdapterConfig(initial=tuple((f"adapter{i}", str(p), 1.0) for i, p in enumerate(loras)),
                                 max_adapters=args.adapters, max_adapter_rank=args.rank)
        timings: list[Any] = []
        engine = Engine(runtime, EngineConfig(max_batch_size=rows, cuda_graphs=args.graphs, buckets=(rows,),
                                              encode_threads=1, adapters=adapters), _drop, timings.append)
        if args.graphs:
            engine.capture_graphs(args.side, args.side)
        ms: dict[str, list[float]] = {case: [] for case in cases(rows, args.adapters)}
        for round_ in range(args.rounds + 1):
            this: dict[str, float] = {}
            for case, per_row in cases(rows, args.adapters).items():
                took = run_round(engine, make_params, per_row, timings)
                this[case] = statistics.median(took)
                if round_:
                    ms[case] += took
            print(f"round {round_}{' (warm-up)' if not round_ else ''}: "
                  + ", ".join(f"{c} {v:.0f} ms" for c, v in this.items()), flush=True)
        base: dict[str, float] = {}
        for case in ms:
            base[case] = statistics.median(ms[case])
            row = {"rows": rows, "case": case, "side": args.side, "device": args.device, "dtype": str(dtype),
                   "graphs": args.graphs, "rank": args.rank, "calls": len(ms[case]), "unet_ms": round(base[case], 2),
                   "vs_none": round(base["none"] / base[case], 3)}
            if case == "mixed":
                row["mixed_vs_single"] = round(base["single"] / base[case], 3)  # speed: >= 0.9 is the target
            results.append(row)
            print(json.dumps(row), flush=True)
        engine.stop(10)
        if engine.adapters is not None:
            print(f"slot memory: {engine.adapters.bytes_per_slot() / 2**20:.1f} MiB per slot "
                  f"({args.adapters} slots of rank {args.rank}, {len(engine.adapters.layers)} layers)")
    print()
    print("| rows | case | UNet ms/call (median) | speed vs none | speed mixed/single |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        mixed = f"{r['mixed_vs_single']:.2f}x" if "mixed_vs_single" in r else ""
        print(f"| {r['rows']} | {r['case']} | {r['unet_ms']:.1f} | {r['vs_none']:.2f}x | {mixed} |")
    if args.json is not None:
        args.json.write_text("\n".join(json.dumps(r) for r in results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
