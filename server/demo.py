"""`make demo`: serve the built-in tiny model, generate one image with its step previews, offline.

    python -m lcmserve.server.demo [--out DIR] [--prompt TEXT]

Starts `lcmserve serve --model tiny --port 0` as a real server process, calls it with the client
SDK over gRPC, writes DIR/image.png and DIR/previews/step-<k>.png, then stops the server (SIGTERM,
which drains). The tiny model has random weights: expect colourful noise, made the real way.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="folder for the image and previews (default out)")
    parser.add_argument("--prompt", default="a single split crack on a concrete wall")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    args = parser.parse_args(argv)

    from lcmserve import Client, Image, StepEvent, Summary

    out = pathlib.Path(args.out)
    (out / "previews").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print("starting: lcmserve serve --model tiny --port 0", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "lcmserve.cli", "serve", "--model", "tiny", "--port", "0",
                               "--metrics-port", "-1", "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None
        target = ""
        for line in server.stdout:
            if line.startswith("listening on "):
                target = line.split()[-1]
                break
        if not target:
            print("the server did not start; see the messages above", file=sys.stderr)
            return 1
        print(f"server ready at {target}", flush=True)
        start = time.perf_counter()
        with Client(target) as client:
            for event in client.stream(args.prompt, seed=42, width=args.size, height=args.size,
                                       num_inference_steps=4, output_format="png", preview_mode="approx"):
                if isinstance(event, StepEvent) and event.preview is not None:
                    path = event.preview.save(out / "previews" / f"step-{event.step}.png")
                    print(f"step {event.step + 1}/{event.num_steps} (timestep {event.timestep}): {path}", flush=True)
                elif isinstance(event, Image):
                    path = event.save(out / "image.png")
                    print(f"image {event.width}x{event.height}, seed {event.seed}: {path}", flush=True)
                elif isinstance(event, Summary):
                    t = event.timings
                    print(f"done in {(time.perf_counter() - start) * 1e3:.0f} ms (server: queue {t.queue_ms:.0f}, "
                          f"text {t.text_ms:.0f}, unet {t.unet_ms:.0f}, vae {t.vae_ms:.0f}, "
                          f"encode {t.encode_ms:.0f} ms)")
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
