"""`lcmserve serve`: arguments and entry point. Nothing heavy is imported at module level: the client
CLI builds this parser even where torch is not installed."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import EngineConfig, FaultInjection, Limits, ServerConfig

_ENGINE = EngineConfig()
_SERVER = ServerConfig()
_LIMITS = Limits()
BACKENDS = ("auto", "eager", "compile", "aoti", "onnx")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="export artifact DIR, diffusers folder, preset (tiny, sd15-random) or hub id")
    p.add_argument("--lora", action="append", default=[], metavar="SRC[:SCALE]",
                   help="LoRA to fuse at start (file, folder or hub id; scale default 1.0); repeatable")
    p.add_argument("--allow-partial-lora", action="store_true",
                   help="fuse a --lora some of whose modules match nothing in the model (warns; default: refuse)")
    p.add_argument("--host", default=_SERVER.host, help=f"address to bind (default {_SERVER.host}; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=_SERVER.port,
                   help=f"gRPC port (default {_SERVER.port}; 0 picks a free one)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="runtime (default auto: the best compiled artifact present for this machine, else eager)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: the artifact's, else float16 on CUDA and float32 on CPU")
    p.add_argument("--max-batch-size", type=int, default=_ENGINE.max_batch_size,
                   help=f"most rows in one UNet call; a guided image takes two (default {_ENGINE.max_batch_size})")
    p.add_argument("--max-queued-requests", type=int, default=_ENGINE.max_queued_requests,
                   help=f"waiting requests before RESOURCE_EXHAUSTED (default {_ENGINE.max_queued_requests})")
    p.add_argument("--batch-wait-ms", type=float, default=_ENGINE.batch_wait_ms,
                   help=f"wait this long to fill an idle batch (default {_ENGINE.batch_wait_ms:g}: never delay a "
                        "lone request)")
    p.add_argument("--max-images", type=int, default=_LIMITS.max_images,
                   help=f"most images per request (default {_LIMITS.max_images})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the engine process (default on a CPU device: cores - 1, leaving one "
                        "for the gRPC process and encoding; an OpenMP team that shares its cores with another busy "
                        "thread stalls at every barrier)")
    p.add_argument("--no-cpu-pinning", action="store_true",
                   help="on a CPU device, leave process placement to the OS (default: the engine process runs "
                        "on all CPUs but the first, the gRPC process on the first)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the UNet and VAE eagerly on CUDA")
    p.add_argument("--buckets", type=_buckets, default=None, metavar="N,N,...",
                   help="batch sizes that CUDA graphs are captured for; a batch is padded up to the next one and "
                        f"a larger batch runs eagerly (default {','.join(map(str, _ENGINE.buckets))})")
    p.add_argument("--metrics-port", type=int, default=_SERVER.metrics_port,
                   help=f"Prometheus /metrics port (default {_SERVER.metrics_port}; 0 picks a free one; -1 disables)")
    p.add_argument("--drain-timeout", type=float, default=_SERVER.drain_timeout_s,
                   help=f"seconds in-flight requests get to finish on SIGTERM (default {_SERVER.drain_timeout_s:g})")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def _buckets(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4,8; got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers; got {text!r}")
    return tuple(sizes)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import asyncio
    import functools

    from lcmserve import __version__

    from lcmserve.export.errors import ExportError

    from .app import serve
    from .loader import LoadError, load_runtime

    try:
        faults = FaultInjection.from_env()
    except ValueError as exc:
        print(f"lcmserve serve: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(host=args.host, port=args.port, drain_timeout_s=args.drain_timeout,
                          metrics_port=None if args.metrics_port < 0 else args.metrics_port, threads=args.threads)
    engine_config = EngineConfig(max_batch_size=args.max_batch_size, max_queued_requests=args.max_queued_requests,
                                 batch_wait_ms=args.batch_wait_ms, cuda_graphs=not args.no_cuda_graphs,
                                 pin_cpus=not args.no_cpu_pinning, faults=faults,
                                 **({"buckets": args.buckets} if args.buckets else {}))
    limits = Limits(max_images=args.max_images)
    if args.max_batch_size < 2:
        print("lcmserve serve: --max-batch-size must be at least 2 (a guided image takes two rows)", file=sys.stderr)
        return 2
    make_runtime = functools.partial(load_runtime, args.model, loras=args.lora, backend=args.backend,
                                     device=args.device, dtype=args.dtype,
                                     allow_partial_lora=args.allow_partial_lora)
    try:
        asyncio.run(serve(make_runtime, config, engine_config, limits, __version__))
    except (LoadError, ExportError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"lcmserve serve: {exc}", file=sys.stderr)
        return 2
    return 0
