"""A like-for-like diffusers baseline for the GPU check (issue #15, item 8).

`lcmserve bench --baseline` times diffusers as a user first runs it: prompts encoded on every call,
a CUDA sync after every step (to time it), PIL images, JPEG encoded one by one inside the timed call.
The server does less of that per image: it caches prompt embeddings, never syncs per step, and
encodes in a pool of 4 threads while the GPU works on. This script gives diffusers the same:

  - the same prompt cache: each distinct prompt encoded once (`pipe.encode_prompt`), then
    `prompt_embeds=` per call;
  - the same threaded encoding: `output_type="pt"`, uint8 on the device, then JPEG q90 (the server's
    default) in 4 threads, overlapped with the next call; no per-step sync;
  - with --compile-unet, also CUDA graphs: the UNet under torch.compile(mode="reduce-overhead"),
    its cold compile timed apart (minutes on an H100: off by default in the check).

Per batch size: one warm-up call, then --iters calls back to back. A call's latency runs from its
start to the end of its last image's encoding; images/s counts from the first timed call's start to
the last encoding's end. Writes {"baseline": [...]} in the shape of `lcmserve bench --json`'s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import pathlib
import statistics
import sys
import time
from typing import Any

PROMPTS = ("a single split crack on a concrete wall", "hairline cracks in a grey concrete wall, photo",
           "a wide diagonal crack through a cast concrete wall", "spalled concrete with a vertical crack")


def jpeg(pixels: Any) -> float:
    """(H, W, 3) uint8 numpy -> JPEG q90 bytes, discarded; returns when it finished (perf_counter)."""
    from PIL import Image

    Image.fromarray(pixels).save(io.BytesIO(), format="JPEG", quality=90)
    return time.perf_counter()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return round(ordered[below] + (ordered[above] - ordered[below]) * (position - below), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export artifact, diffusers folder or preset")
    p.add_argument("--batch", default="1,32", help="batch sizes (default 1,32)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per batch size (default 5)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--side", type=int, default=512, help="width = height in pixels (default 512)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile-unet", action="store_true", help="UNet under torch.compile(mode='reduce-overhead')")
    p.add_argument("--json", type=pathlib.Path, required=True)
    args = p.parse_args(argv)

    import torch

    from lcmserve.export.loading import load_pipeline

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    pipe: Any = load_pipeline(args.model, dtype=dtype, device=args.device)  # diffusers' own API below
    how = "prompt cache + 4 encode threads, no per-step sync"
    if args.compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
        how += ", UNet torch.compile reduce-overhead"
    cache: dict[str, torch.Tensor] = {}
    for prompt in PROMPTS:
        cache[prompt] = pipe.encode_prompt(prompt, args.device, 1, False)[0]  # (1, 77, D)
    pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="encode")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def call(batch: int, seed: int) -> list[concurrent.futures.Future[float]]:
        embeds = torch.cat([cache[PROMPTS[i % len(PROMPTS)]] for i in range(batch)])
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        images = pipe(prompt_embeds=embeds, num_inference_steps=args.steps, guidance_scale=1.0, width=args.side,
                      height=args.side, generator=generators, output_type="pt").images  # (B, 3, H, W) in [0, 1]
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # the copy syncs
        return [pool.submit(jpeg, image) for image in pixels]

    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        start = time.perf_counter()
        for future in call(batch, 0):  # warm-up (and the compile, with --compile-unet)
            future.result()
        warmup_s = time.perf_counter() - start
        sync()
        starts: list[float] = []
        pending: list[list[concurrent.futures.Future[float]]] = []
        for i in range(args.iters):
            starts.append(time.perf_counter())
            pending.append(call(batch, 1000 * (i + 1)))
        ends = [max(f.result() for f in futures) for futures in pending]
        latencies = [(end - begin) * 1e3 for begin, end in zip(starts, ends)]
        wall = max(ends) - starts[0]
        results.append({
            "model": args.model, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch, "calls": args.iters, "images": batch * args.iters,
            "duration_s": round(wall, 3), "images_per_s": round(batch * args.iters / wall, 3),
            "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                           "mean": round(statistics.fmean(latencies), 3)},
            "first_step_ms": None, "warmup_s": round(warmup_s, 1), "how": how,
        })
        print(json.dumps(results[-1]), flush=True)
    pool.shutdown()
    args.json.write_text(json.dumps({"baseline": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
