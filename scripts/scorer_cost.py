"""What scoring a candidate costs: the engine's CLIP scorer (server/model/scorer.py) on decoded images.

    python scripts/scorer_cost.py [--device cpu|cuda] [--side 512] [--batch 1,8] [--json PATH]

Times `ClipScorer.scores` (preprocessing on the device, the image tower, the cosine) per image, for
  tiny        the presets' random CLIP (`--scorer tiny`: 2 layers, 32-wide, 32x32 input)
  clip-b32    openai/clip-vit-base-patch32's shapes (transformers' CLIPConfig defaults: ViT-B/32, 224x224
              input, 512-d projection) with random weights: the real cost, no download
on uint8 images of --side x --side (the text embedding is cached per prompt, as in the engine: not timed).
Prints one markdown row per (scorer, batch): ms per call and per image, median of --iters after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build(name: str, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lcmserve.export.presets import write_tokenizer
    from lcmserve.export.records import ScorerRecord
    from lcmserve.export.scorer import build_tiny_scorer
    from lcmserve.server.model.scorer import ClipScorer

    if name == "tiny":
        model, processor = build_tiny_scorer()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tokenizer(Path(tmp))  # any CLIP tokenizer: only the text embedding (cached) reads it
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig()).eval()  # ViT-B/32 shapes, random weights
        processor_cls: Any = CLIPProcessor
        processor = processor_cls(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    model = model.to(device=device, dtype=dtype)
    record = ScorerRecord(source=name, kind="preset", sha256="", projection_dim=int(model.config.projection_dim),
                          image_size=int(model.config.vision_config.image_size))
    return ClipScorer(model, processor, record, torch.device(device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, help="float16 | float32 (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--side", type=int, default=512, help="decoded image side, pixels (default 512)")
    parser.add_argument("--batch", default="1,8", help="images per scoring call (default 1,8)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--scorers", default="tiny,clip-b32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: as the engine process, one per core but the edge's on a CPU, "
                             "4 beside a GPU: an OpenMP team sharing its cores stalls at every barrier)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    torch.set_num_threads(args.threads or (4 if device.startswith("cuda") else max(1, (os.cpu_count() or 2) - 1)))
    rows: list[dict[str, Any]] = []
    print(f"scorer cost on {device} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads), "
          f"{args.side}x{args.side} uint8 images")
    print("| scorer | batch | ms / call | ms / image |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.scorers.split(","):
        scorer = build(name, device, dtype)
        with torch.inference_mode():
            text = scorer.text_embedding(scorer.tokenize("a crack in a concrete wall"))
            for batch in [int(b) for b in args.batch.split(",")]:
                pixels = torch.randint(0, 256, (batch, 3, args.side, args.side), dtype=torch.uint8, device=device)
                texts = text.expand(batch, -1)
                times = []
                for i in range(args.iters + 2):
                    start = time.perf_counter()
                    scorer.scores(pixels, texts).tolist()  # (the copy to the host waits for the device)
                    if i >= 2:
                        times.append(time.perf_counter() - start)
                ms = statistics.median(times) * 1e3
                rows.append({"scorer": name, "batch": batch, "ms_per_call": round(ms, 3),
                             "ms_per_image": round(ms / batch, 3), "device": device, "side": args.side})
                print(f"| {name} | {batch} | {ms:.2f} | {ms / batch:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
