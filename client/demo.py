"""`make demo`: serve the built-in tiny model, generate one image with its step previews, offline.

    python -m lcmserve.demo [--out DIR] [--prompt TEXT] [--size PX]

Starts `lcmserve serve --model tiny --port 0` as a real server process (that needs the [server]
extra), calls it with the client SDK over gRPC, writes DIR/image.png and DIR/previews/image0-step<k>.png
(named as `lcmserve generate --previews` names them), then stops the server (SIGTERM, which drains). The tiny model has random weights: expect colourful
noise, made the real way. The demo itself is a client: it imports only the SDK.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from .client import Client
from .options import GenerateOptions
from .types import Image, StepEvent, Summary

_SERVE = ["serve", "--model", "tiny", "--port", "0", "--metrics-port", "-1", "--log-level", "WARNING"]
_STOP_GRACE_S = 30.0  # seconds the server gets to drain after SIGTERM, then it is killed


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the exit code (1 when the server did not start)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="folder for the image and previews (default out)")
    parser.add_argument("--prompt", default="a single split crack on a concrete wall")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    args = parser.parse_args(argv)

    out = pathlib.Path(args.out)
    (out / "previews").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the tiny preset needs no download: make sure of it
    print("starting: lcmserve serve --model tiny --port 0", flush=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "lcmserve.cli", *_SERVE], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        target = _wait_for_listening(server)
        if not target:
            print("the server did not start; see the messages above", file=sys.stderr)
            return 1
        print(f"server ready at {target}", flush=True)
        options = GenerateOptions(
            seed=42,
            width=args.size,
            height=args.size,
            num_inference_steps=4,
            output_format="png",
            preview_mode="approx",
        )
        with Client(target) as client:
            _write_events(client, args.prompt, options, out)
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_for_listening(server: subprocess.Popen[str]) -> str:
    """HOST:PORT from the server's `listening on HOST:PORT` line; "" when it exited before that."""
    assert server.stdout is not None
    for line in server.stdout:
        if line.startswith("listening on "):
            return line.split()[-1]
    return ""


def _write_events(client: Client, prompt: str, options: GenerateOptions, out: pathlib.Path) -> None:
    """Streams one request, writing each step's preview and the image as they arrive."""
    start = time.perf_counter()
    for event in client.stream(prompt, options):
        if isinstance(event, StepEvent) and event.preview is not None:
            path = event.preview.save(out / "previews" / f"image{event.image_index}-step{event.step}.png")
            print(f"step {event.step + 1}/{event.num_steps} (timestep {event.timestep}): {path}", flush=True)
        elif isinstance(event, Image):
            path = event.save(out / "image.png")
            print(f"image {event.width}x{event.height}, seed {event.seed}: {path}", flush=True)
        elif isinstance(event, Summary):
            t = event.timings
            print(
                f"done in {(time.perf_counter() - start) * 1e3:.0f} ms (server: queue {t.queue_ms:.0f}, "
                f"text {t.text_ms:.0f}, unet {t.unet_ms:.0f}, vae {t.vae_ms:.0f}, encode {t.encode_ms:.0f} ms)"
            )


if __name__ == "__main__":
    sys.exit(main())
