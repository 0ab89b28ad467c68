"""Decode time of one image: the SD v1.5 VAE decoder against the tiny autoencoder (TAESD).

    .venv/bin/python scripts/decode_timing.py [--side 512] [--repeats 5] [--device cpu] [--dtype float32]
        [--jpeg] [--json PATH]

Both decoders have the real shapes (sd15-random's AutoencoderKL and TAESD's AutoencoderTiny, the
presets' configs); weights are PyTorch's default init, since the time of a decode does not depend on
them (building the seeded preset weights would only cost minutes). Prints the median and the best of
`--repeats` timed calls after one warm-up, the decoder parameters, and the ratio. On CUDA the device
is synchronized around each timed call. `--jpeg` also times JPEG q90 of the decoded images: PIL on
the host, and on CUDA torchvision's encode_jpeg (nvjpeg) on the device tensors, when importable.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import torch


def _time(fn, latents: torch.Tensor, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    sync = torch.cuda.synchronize if latents.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn(latents)  # warm-up (allocator, oneDNN / cuDNN algorithm choice)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn(latents)
            sync()
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=1, help="images per decode (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--jpeg", action="store_true", help="also time JPEG q90: host (PIL) and GPU (torchvision)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args()

    from diffusers import AutoencoderKL, AutoencoderTiny

    from lcmserve.export.presets import preset_spec

    spec = preset_spec("sd15-random")
    dtype = getattr(torch, args.dtype)
    vae = AutoencoderKL(**spec.vae).eval().to(args.device, dtype)
    tiny = AutoencoderTiny(**spec.tiny_vae).eval().to(args.device, dtype)
    latents = torch.randn(args.batch, 4, args.side // 8, args.side // 8, device=args.device, dtype=dtype)
    rows = []
    for name, model in (("vae", vae), ("tiny_vae", tiny)):
        times = _time(lambda x, m=model: m.decode(x, return_dict=False)[0], latents, args.repeats)
        params = sum(p.numel() for p in model.decoder.parameters())
        rows.append((name, statistics.median(times), min(times), params))
    print(f"decode of {args.batch} x {args.side}x{args.side}, {args.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} timed calls after 1 warm-up")
    print(f"{'decoder':10} {'median ms':>10} {'best ms':>10} {'decoder params':>15}")
    for name, median, best, params in rows:
        print(f"{name:10} {median * 1e3:10.1f} {best * 1e3:10.1f} {params / 1e6:14.2f}M")
    print(f"tiny_vae is {rows[0][1] / rows[1][1]:.1f}x faster (median)")
    result = {"decode": [dict(decoder=n, median_ms=m * 1e3, best_ms=b * 1e3, params=p) for n, m, b, p in rows],
              "side": args.side, "batch": args.batch, "device": args.device, "dtype": args.dtype}
    if args.jpeg:
        result["jpeg"] = _jpeg_rows(tiny, latents, args.repeats)
        for row in result["jpeg"]:
            print(f"jpeg q90 {row['encoder']:5} batch {args.batch}: median {row['median_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _jpeg_rows(tiny: torch.nn.Module, latents: torch.Tensor, repeats: int) -> list[dict[str, object]]:
    """JPEG q90 of the tiny decoder's images (B, 3, H, W) uint8: PIL per image on the host, and
    torchvision's encode_jpeg of the device tensors in one call, when it imports and runs there."""
    from PIL import Image

    with torch.inference_mode():
        pixels = ((tiny.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    host = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def pil(_: torch.Tensor) -> None:
        for image in host:
            Image.fromarray(image).save(io.BytesIO(), format="JPEG", quality=90)

    rows: list[dict[str, object]] = [dict(encoder="host", median_ms=statistics.median(_time(pil, pixels, repeats)) * 1e3)]
    if pixels.device.type == "cuda":
        try:
            from torchvision.io import encode_jpeg
        except ImportError as exc:
            rows.append(dict(encoder="gpu", error=f"torchvision: {exc}"))
            return rows

        def gpu(x: torch.Tensor) -> None:
            for data in encode_jpeg(list(x), 90):
                data.cpu()

        rows.append(dict(encoder="gpu", median_ms=statistics.median(_time(gpu, pixels, repeats)) * 1e3))
    return rows


if __name__ == "__main__":
    main()
