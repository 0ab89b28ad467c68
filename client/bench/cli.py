"""The command line of `lcmserve bench` (also `python -m lcmserve.bench`): options -> BenchConfig,
the run with Ctrl-C handling, then the table and the files asked for. See the package's docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from .._common import DEFAULT_TARGET
from .._connection import ConnectionFlagError, add_security_arguments, read_security_arguments
from ..names import DECODER_VALUES, OUTPUT_FORMAT_VALUES, PREVIEW_MODE_VALUES, canonical_name, cli_choice, cli_names
from ..types import Decoder, OutputFormat, PreviewMode
from .._convert import parse_adapter_spec
from .config import DEFAULT_PROMPTS, AdapterSet, BenchConfig, BenchError, Level, RequestShape
from .driver import run_bench
from .report import BenchReport, format_table, write_csv, write_json, write_plot

DESCRIPTION = "load-test an lcmserve server: throughput and latency, level by level"


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0 or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lcmserve bench`."""
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help=f"server to load (default: $LCMSERVE_TARGET, else {DEFAULT_TARGET}; http://HOST:PORT or https://HOST:PORT "
        "loads its HTTP port (serve --http-port) through /v1/generate instead of gRPC; with --baseline, only --target "
        "adds a server: without it only diffusers is timed)",
    )
    add_security_arguments(parser)  # --secure, --root-certificates, --client-cert, --client-key, --token
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_positive_ints,
        metavar="N[,N...]",
        help="closed-loop levels: that many clients sending back to back (default 1)",
    )
    load.add_argument(
        "--rate",
        type=_positive_floats,
        metavar="R[,R...]",
        help="open-loop levels: Poisson arrivals at R requests/s",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="with --rate: at most N requests in flight (latency counts from the send)",
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="requests per level (default: 4 x concurrency, or 10 s of arrivals; at least 32)",
    )
    span.add_argument("--duration", type=float, metavar="S", help="seconds per level to send requests for")
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        metavar="N",
        help="requests before each level, not counted (default 4)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="deadline of each request (default 60)"
    )
    parser.add_argument("--connections", type=int, default=1, metavar="N", help="gRPC channels (default 1)")
    shape = parser.add_argument_group("request shape")
    shape.add_argument("--steps", type=int, default=4, metavar="N", help="num_inference_steps (default 4)")
    shape.add_argument("--width", type=int, default=512, metavar="PX", help="pixels (default 512)")
    shape.add_argument("--height", type=int, default=512, metavar="PX", help="pixels (default 512)")
    shape.add_argument(
        "--num-images", type=int, default=1, metavar="N", help="images per request (default 1)"
    )
    shape.add_argument(
        "--candidates", type=int, default=1, metavar="K",
        help="best-of-N: the server generates num-images x K per request and returns the best num-images "
             "(a server with --scorer); the report gives images/s of both (default 1)"
    )
    shape.add_argument(
        "--format", choices=tuple(OUTPUT_FORMAT_VALUES), default="jpeg", help="(default jpeg)"
    )
    shape.add_argument(
        "--guidance", type=float, default=1.0, metavar="SCALE", help="guidance_scale (default 1.0: no CFG)"
    )
    shape.add_argument(
        "--preview-mode",
        type=cli_choice,
        choices=cli_names(PREVIEW_MODE_VALUES),
        default="none",
        help="preview in each step event (default none)",
    )
    shape.add_argument(
        "--decoder",
        type=cli_choice,
        choices=["unspecified", *cli_names(DECODER_VALUES)],
        default="unspecified",
        help="decoder of the final images (default unspecified: the server's default decoder)",
    )
    shape.add_argument(
        "--init-image", type=Path, metavar="FILE", help="img2img: every request starts from this PNG/JPEG/WEBP"
    )
    shape.add_argument(
        "--strength", type=float, metavar="S", help="with --init-image: 0 < S <= 1 (server default 0.8)"
    )
    shape.add_argument("--mask", type=Path, metavar="FILE", help="inpainting, with --init-image: white = repaint")
    shape.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME[:SCALE]",
        help="every request names this per-request adapter (loaded on the server), at SCALE (default: its "
        "default scale); repeatable",
    )
    shape.add_argument(
        "--adapter-mix",
        action="append",
        default=[],
        metavar="SET",
        help="each request a random adapter set of those given (seeded by --seed); SET is none or "
        "NAME[:SCALE][+NAME[:SCALE]...], e.g. --adapter-mix none --adapter-mix cracks:0.8 --adapter-mix "
        "cracks:0.6+spalling:0.4; repeatable; the report gives each set's latency",
    )
    shape.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="prompts, one a line (default: a built-in list of cracked concrete walls)",
    )
    shape.add_argument(
        "--seed", type=int, default=0, metavar="N", help="base seed: request i uses seed + i x num-images"
    )
    out = parser.add_argument_group("results")
    out.add_argument("--slo-ms", type=float, metavar="MS", help="goodput: ok requests/s within MS end to end")
    out.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    out.add_argument("--csv", type=Path, metavar="PATH", help="write one CSV row per level")
    out.add_argument(
        "--plot",
        type=Path,
        metavar="PATH.png",
        help="plot latency p50/p99 against images/s (needs the [plot] extra)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    base = parser.add_argument_group("baseline (plain diffusers in this process; needs the [server] extra)")
    base.add_argument(
        "--baseline",
        metavar="MODEL",
        help="time diffusers on MODEL (hub id, folder or preset such as tiny) for the same request shape",
    )
    base.add_argument(
        "--baseline-batch",
        type=_positive_ints,
        metavar="B[,B...]",
        help="batch sizes (default: 1 and the largest concurrency)",
    )
    base.add_argument(
        "--baseline-iters",
        type=int,
        default=3,
        metavar="N",
        help="timed calls per batch size, after one warm-up call (default 3)",
    )
    base.add_argument("--baseline-device", metavar="DEVICE", help="default: cuda if available, else cpu")
    base.add_argument(
        "--baseline-dtype",
        choices=("float16", "bfloat16", "float32"),
        help="default: float16 on cuda, float32 on cpu",
    )
    base.add_argument(
        "--baseline-threads",
        type=int,
        metavar="N",
        help="torch threads on a CPU (default: as the server's engine, one per CPU but the first, on "
        "those CPUs; the report says which)",
    )


def _read_image(flag: str, path: Path | None) -> bytes | None:
    """The file's bytes, read once for the whole run (the server decodes them per request)."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BenchError(f"{flag} {path}: {exc.strerror or exc}") from exc


def _adapter_spec(flag: str, text: str) -> tuple[str, float | None]:
    try:
        return parse_adapter_spec(text)
    except ValueError as exc:
        raise BenchError(f"{flag} {text}: {exc}") from None


def _adapter_set(text: str) -> AdapterSet:
    """--adapter-mix SET: "none", or NAME[:SCALE] joined by '+'; each name once."""
    if text.strip().lower() == "none":
        return ()
    pairs = tuple(_adapter_spec("--adapter-mix", part) for part in text.split("+"))
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise BenchError(f"--adapter-mix {text}: names an adapter twice")
    return pairs


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Checks the options and builds the config; raises BenchError naming the option."""
    target = args.target
    if target is None and args.baseline is None:  # as generate, info, health and dataset
        target = os.environ.get("LCMSERVE_TARGET") or DEFAULT_TARGET
    if args.max_concurrency is not None and (args.rate is None or args.max_concurrency < 1):
        raise BenchError(f"--max-concurrency {args.max_concurrency}: needs --rate and a value >= 1")
    try:
        connection = read_security_arguments(args)
    except ConnectionFlagError as exc:
        raise BenchError(str(exc)) from exc
    for name in ("requests", "connections", "steps", "width", "height", "num_images", "candidates", "baseline_iters",
                 "baseline_threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    for name in ("duration", "timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise BenchError(f"--{name} {value}: must be > 0")
    if args.warmup < 0:
        raise BenchError(f"--warmup {args.warmup}: must be >= 0")
    prompts = DEFAULT_PROMPTS
    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise BenchError(f"--prompts {args.prompts}: {e.strerror}") from e
        prompts = tuple(line.strip() for line in lines if line.strip())
        if not prompts:
            raise BenchError(f"--prompts {args.prompts}: no prompts in the file")
    if args.mask is not None and args.init_image is None:
        raise BenchError("--mask needs --init-image (inpainting repaints part of an init image)")
    if args.adapter and args.adapter_mix:
        raise BenchError("--adapter and --adapter-mix: give one (--adapter-mix cracks:0.8 is one set of one)")
    adapters = tuple(_adapter_spec("--adapter", text) for text in args.adapter)
    mix = tuple(_adapter_set(text) for text in args.adapter_mix)
    if args.rate is not None:
        levels = tuple(Level(rate=r, max_concurrency=args.max_concurrency) for r in args.rate)
    else:
        levels = tuple(Level(concurrency=c) for c in (args.concurrency or [1]))
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'lcmserve[plot]'")
    if args.baseline is not None:
        missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
        if missing:
            raise BenchError(
                f"--baseline runs diffusers in this process and needs the server extra "
                f"(missing {', '.join(missing)}): pip install 'lcmserve[server]'"
            )
    _check_output_files(args)
    return BenchConfig(
        target=target,
        levels=levels,
        requests=args.requests,
        duration_s=args.duration,
        warmup=args.warmup,
        timeout_s=args.timeout,
        shape=RequestShape(
            num_inference_steps=args.steps,
            width=args.width,
            height=args.height,
            num_images=args.num_images,
            candidates=args.candidates,
            output_format=cast(OutputFormat, args.format),
            guidance_scale=args.guidance,
            preview_mode=cast(PreviewMode, canonical_name(args.preview_mode)),
            decoder=cast(Decoder, canonical_name(args.decoder)),
            init_image=_read_image("--init-image", args.init_image),
            strength=args.strength,
            mask_image=_read_image("--mask", args.mask),
            adapters=adapters or None,
        ),
        prompts=prompts,
        seed=args.seed,
        adapter_mix=mix,
        slo_ms=args.slo_ms,
        secure=connection.secure,
        root_certificates=connection.root_certificates,
        client_cert=connection.client_cert,
        client_key=connection.client_key,
        token=connection.token,
        connections=args.connections,
        progress=not args.no_progress,
        baseline_model=args.baseline,
        baseline_batches=tuple(args.baseline_batch or ()),
        baseline_iters=args.baseline_iters,
        baseline_device=args.baseline_device,
        baseline_dtype=args.baseline_dtype,
        baseline_threads=args.baseline_threads,
    )


def _check_output_files(args: argparse.Namespace) -> None:
    """Makes the folders of --json, --csv and --plot and checks that each file can be written, before
    the run: a run takes minutes, and its results must not be lost to a missing folder."""
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if path is None:
            continue
        existed = path.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab"):  # the real test (permissions, a folder of that name, a read-only disk)
                pass
        except OSError as exc:
            raise BenchError(f"{flag} {path}: cannot write there: {exc.strerror or exc}") from exc
        if not existed:
            path.unlink()


async def _run_until_interrupted(config: BenchConfig) -> BenchReport:
    """run_bench, with the first Ctrl-C ending the current level early (a second one aborts)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        print("\ninterrupted: finishing with the results so far (Ctrl-C again to abort)", file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows' event loop
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    return await run_bench(config, stop=stop)


def run(args: argparse.Namespace) -> int:
    """`lcmserve bench`: 0 when every level ran (failed requests are results), 130 when interrupted,
    2 when it could not run (bad option, smoke request failed)."""
    try:
        config = config_from_args(args)
        report = asyncio.run(_run_until_interrupted(config))
    except BenchError as e:
        print(f"lcmserve bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the second Ctrl-C
        print("lcmserve bench: aborted", file=sys.stderr)
        return 130
    print(format_table(report))
    try:
        if args.json is not None:
            write_json(report, args.json)
        if args.csv is not None:
            write_csv(report, args.csv)
        if args.plot is not None:
            write_plot(report, args.plot)
    except (BenchError, OSError) as e:
        print(f"lcmserve bench: error: {e}", file=sys.stderr)
        return 2
    for path in (args.json, args.csv, args.plot):
        if path is not None:
            print(f"wrote {path}", file=sys.stderr)
    return 130 if report.interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lcmserve.bench ARGS`: the same as `lcmserve bench ARGS`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="lcmserve bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
