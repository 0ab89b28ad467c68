"""Parity of the served images with diffusers (issue 18 item 8; the `parity` stage of gpu_check.py).

    python scripts/parity_check.py --target HOST:PORT --model ARTIFACT --json parity.json \
        [--device cuda] [--dtype float16] [--side 512] [--steps 4] [--seeds 4] [--wave 32]

1. alone: each of --seeds seeds (1, 2, ...) as one RAW request, one after the other;
2. in a wave: the same requests again, sent at once among --wave concurrent requests in all (the
   others: other prompts and seeds, JPEG), so they share UNet calls and VAE decodes with them;
3. the reference: diffusers' StableDiffusionPipeline (load_pipeline: the same folder the server
   serves, the LCM scheduler, no safety checker) in --dtype on --device, at batch 1, with
   torch.Generator("cpu").manual_seed(seed), output_type="np" rounded to uint8 as its PIL output is.
Per seed: max and mean |difference| in 1/255 units of alone vs diffusers, wave vs diffusers, and alone
vs wave (a sample's pixels must not depend on its batch). Writes JSON; prints one line per seed.
On the GPU this measures fp16 (the README's unmeasured claim); the tests run it on a CPU in float32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

PROMPT = "a single split crack on a concrete wall"
OTHER_PROMPTS = ("hairline cracks in a grey concrete wall, photo", "a wide diagonal crack through a cast concrete wall",
                 "spalled concrete with a vertical crack")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil does."""
    scaled: np.ndarray = (np.asarray(images, dtype=np.float64) * 255).round().clip(0, 255)
    return scaled.astype(np.uint8)


def pixel_diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two uint8 images of one shape -> max and mean |a - b|, in 1/255 units (pixel levels)."""
    if a.shape != b.shape:
        raise ValueError(f"images of shapes {a.shape} and {b.shape} cannot be compared")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_255": int(diff.max()), "mean_255": round(float(diff.mean()), 4)}


def compare(alone: dict[int, np.ndarray], wave: dict[int, np.ndarray],
            reference: dict[int, np.ndarray]) -> list[dict[str, Any]]:
    """One row per seed: alone vs diffusers, wave vs diffusers, alone vs wave."""
    return [{"seed": seed, "alone_vs_diffusers": pixel_diff(alone[seed], reference[seed]),
             "wave_vs_diffusers": pixel_diff(wave[seed], reference[seed]),
             "alone_vs_wave": pixel_diff(alone[seed], wave[seed]),
             "std": round(float(reference[seed].std()), 2)}  # a flat image would make the comparison moot
            for seed in sorted(reference)]


def worst(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The largest max and mean of each comparison over the seeds."""
    return {key: {"max_255": max(r[key]["max_255"] for r in rows), "mean_255": max(r[key]["mean_255"] for r in rows)}
            for key in ("alone_vs_diffusers", "wave_vs_diffusers", "alone_vs_wave")}


def describe(row: dict[str, Any]) -> str:
    """"alone/diffusers max 2 mean 0.31, ..." (1/255 units) for a table's notes."""
    return ", ".join(f"{key.replace('_vs_', '/')} max {row[key]['max_255']} mean {row[key]['mean_255']}"
                     for key in ("alone_vs_diffusers", "wave_vs_diffusers", "alone_vs_wave")) + " (/255)"


def _pixels(result: Any) -> np.ndarray:
    image = result.images[0]
    if image.format != "raw":
        raise ValueError(f"asked for a RAW image, got {image.format}")
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 3)


async def served(args: argparse.Namespace, seeds: list[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], float]:
    """RAW pixels of each seed requested alone, then inside a wave; and the wave's seconds."""
    from lcmserve import AsyncClient

    shape = dict(num_inference_steps=args.steps, guidance_scale=1.0, width=args.side, height=args.side)
    async with AsyncClient(args.target, timeout=args.timeout, retries=0) as client:
        alone = {seed: _pixels(await client.generate(PROMPT, seed=seed, output_format="raw", **shape))
                 for seed in seeds}
        calls: list[Any] = []
        spacing = max(args.wave // len(seeds), 1)  # the seeds spread through the wave's arrivals
        for i in range(max(args.wave, len(seeds))):
            if i % spacing == 0 and i // spacing < len(seeds):
                calls.append(client.generate(PROMPT, seed=seeds[i // spacing], output_format="raw", **shape))
            else:
                calls.append(client.generate(OTHER_PROMPTS[i % len(OTHER_PROMPTS)], seed=10_000 + i,
                                             output_format="jpeg", **shape))
        start = time.perf_counter()
        results = await asyncio.gather(*calls)
        wave_s = time.perf_counter() - start
    raw = [r for r in results if r.images[0].format == "raw"]
    wave = {r.images[0].seed: _pixels(r) for r in raw}
    return alone, wave, wave_s


def reference(args: argparse.Namespace, seeds: list[int]) -> tuple[dict[int, np.ndarray], float]:
    """diffusers' image of each seed at batch 1, uint8 (H, W, 3); and the load's seconds."""
    import torch

    from lcmserve.export.loading import load_pipeline, parse_dtype

    start = time.perf_counter()
    pipe: Any = load_pipeline(args.model, dtype=parse_dtype(args.dtype), device=args.device)
    load_s = time.perf_counter() - start
    images = {}
    for seed in seeds:
        out = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=1.0, width=args.side, height=args.side,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
        images[seed] = to_uint8(out[0])
    return images, load_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the server, HOST:PORT")
    p.add_argument("--model", required=True, help="what the server serves: artifact, diffusers folder or preset")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--side", type=int, default=512, help="width = height in pixels (default 512)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seeds", type=int, default=4, help="how many seeds (1, 2, ...; default 4)")
    p.add_argument("--wave", type=int, default=32, help="concurrent requests in the wave (default 32)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each request, s")
    p.add_argument("--json", type=pathlib.Path, required=True)
    args = p.parse_args(argv)
    seeds = list(range(1, args.seeds + 1))
    alone, wave, wave_s = asyncio.run(served(args, seeds))
    ref, load_s = reference(args, seeds)
    rows = compare(alone, wave, ref)
    for row in rows:
        print(f"seed {row['seed']}: {describe(row)}", flush=True)
    result = {"prompt": PROMPT, "side": args.side, "steps": args.steps, "dtype": args.dtype, "device": args.device,
              "wave": args.wave, "wave_s": round(wave_s, 2), "reference_load_s": round(load_s, 1), "seeds": rows,
              "worst": worst(rows)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
