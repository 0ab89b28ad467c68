"""`lcmserve serve`: arguments and entry point. Nothing heavy is imported at module level: the client
CLI builds this parser even where torch is not installed."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from lcmserve.export.artifact import BACKENDS as ARTIFACT_BACKENDS
from lcmserve.export.artifact import DTYPES

from .config import (
    ADAPTER_NAME,
    MAX_ADAPTER_SCALE,
    AdapterConfig,
    EngineConfig,
    FaultInjection,
    Limits,
    ServerConfig,
    TlsConfig,
)
from .env_flags import apply_environment
from .logs import FORMATS, LEVELS, LogSettings
from .logs import setup as setup_logging

_ENGINE = EngineConfig()
_SERVER = ServerConfig()
_LIMITS = Limits()
_ADAPTERS = AdapterConfig()
BACKENDS = ("auto", *ARTIFACT_BACKENDS)
AUTH_TOKEN_ENV = "LCMSERVE_AUTH_TOKEN"


class UsageError(Exception):
    """A flag's value cannot be used; one line for stderr, exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="export artifact DIR, diffusers folder, preset (tiny, sd15-random) or hub id")
    p.add_argument("--lora", action="append", default=[], metavar="SRC[:SCALE]",
                   help="LoRA to fuse at start (file, folder or hub id; scale default 1.0); repeatable")
    p.add_argument("--allow-partial-lora", action="store_true",
                   help="fuse a --lora some of whose modules match nothing in the model (warns; default: refuse)")
    p.add_argument("--tiny-vae", default=None, metavar="SRC",
                   help="serve a tiny autoencoder (TAESD) beside the VAE: a hub id (madebyollin/taesd), an "
                        "AutoencoderTiny folder, or a preset's (tiny, sd15-random); default: the artifact's tiny_vae/")
    p.add_argument("--default-decoder", default="vae", choices=("vae", "tiny-vae"),
                   help="decoder of requests that leave `decoder` unset (default vae; tiny-vae needs a tiny autoencoder)")
    p.add_argument("--scorer", default=None, metavar="SRC",
                   help="CLIP model that scores images (Image.score) and picks best-of-N candidates (a request's "
                        "candidates > 1 needs one): a hub id (openai/clip-vit-base-patch32), a folder holding a "
                        "CLIPModel and its processor, or tiny (a small random CLIP, for tests); default: the "
                        "artifact's scorer/ (docs/candidates.md)")
    ad = p.add_argument_group("per-request LoRA adapters (docs/adapters.md)")
    ad.add_argument("--adapter", action="append", default=[], metavar="NAME=SRC[:SCALE]",
                    help="load a LoRA (kohya_ss or diffusers/PEFT: a .safetensors file, a folder holding one, or a hub "
                         "id) unfused, as adapter NAME that requests may name with their own scale; SCALE is the "
                         "default of requests that give none (default 1.0); repeatable")
    ad.add_argument("--max-adapters", type=int, default=_ADAPTERS.max_adapters, metavar="N",
                    help=f"adapter slots, the most adapters loaded at once; each slot holds a LoRA of up to "
                         f"--max-adapter-rank (default {_ADAPTERS.max_adapters})")
    ad.add_argument("--max-adapter-rank", type=int, default=_ADAPTERS.max_adapter_rank, metavar="R",
                    help=f"highest LoRA rank a slot holds; a LoRA of higher rank is refused "
                         f"(default {_ADAPTERS.max_adapter_rank})")
    ad.add_argument("--max-adapters-per-request", type=int, default=_ADAPTERS.max_adapters_per_request,
                    metavar="N", help=f"most adapters one request may name (default "
                                      f"{_ADAPTERS.max_adapters_per_request})")
    ad.add_argument("--allow-adapter-loading", action="store_true",
                    help="serve AdapterService.LoadAdapter/UnloadAdapter (lcmserve adapters load|unload): clients "
                         "may load LoRA files from this server's disk or the hub (default: only --adapter)")
    p.add_argument("--host", default=_SERVER.host, help=f"address to bind (default {_SERVER.host}; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=_SERVER.port,
                   help=f"gRPC port (default {_SERVER.port}; 0 picks a free one)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="runtime (default auto: the best compiled artifact present for this machine, else eager)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--devices", default=None, metavar="D,D,...|all",
                   help="one engine process per device behind this one server, e.g. cuda:0,cuda:1 or all (every "
                        "GPU); cpu,cpu runs two CPU engines, each on cores of its own where there are enough. Each "
                        "request goes to the engine with the fewest outstanding rows (default: one, on --device)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
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
    p.add_argument("--metrics-host", default=None,
                   help="address of the /metrics endpoint (default: the --host value)")
    sec = p.add_argument_group("security (docs/security.md)")
    sec.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                     help="serve TLS only, with this certificate chain (needs --tls-key)")
    sec.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the private key of --tls-cert")
    sec.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                     help="mTLS: require client certificates signed by these CAs (needs --tls-cert)")
    sec.add_argument("--auth-token-file", type=Path, default=None, metavar="FILE",
                     help=f"require 'authorization: Bearer <token>' on every RPC but health; one token a line "
                          f"(or set ${AUTH_TOKEN_ENV})")
    sec.add_argument("--no-reflection", action="store_true",
                     help="do not serve gRPC reflection (with auth on, reflection needs the token)")
    conn = p.add_argument_group("connections")
    conn.add_argument("--max-concurrent-rpcs", type=int, default=_SERVER.max_concurrent_rpcs, metavar="N",
                     help=f"RPCs in flight server-wide, beyond which RESOURCE_EXHAUSTED; also streams per "
                          f"connection (default {_SERVER.max_concurrent_rpcs})")
    conn.add_argument("--http-port", type=int, default=None, metavar="PORT",
                      help="also serve HTTP on this port (docs/http.md: the OpenAI Images API, /v1/generate, the "
                           "playground at /), same TLS and tokens; 0 picks a free one (default: no HTTP)")
    conn.add_argument("--http-host", default=None, metavar="HOST",
                      help="address of the HTTP port (default: the --host value)")
    conn.add_argument("--max-connection-age", type=float, default=None, metavar="S",
                     help="close connections after S seconds (GOAWAY; streams get --drain-timeout to "
                          "finish) so that clients rebalance over new replicas (default: never)")
    p.add_argument("--drain-timeout", type=float, default=_SERVER.drain_timeout_s,
                   help=f"seconds in-flight requests get to finish on SIGTERM (default {_SERVER.drain_timeout_s:g})")
    obs = p.add_argument_group("logs and traces (docs/deploy.md)")
    obs.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS,
                     help="DEBUG, INFO, WARNING, ERROR (default INFO), both processes")
    obs.add_argument("--log-format", default="text", choices=FORMATS,
                     help="text, or json: one object a line on stderr (time, level, logger, message; request, "
                          "trace and span ids in a request) from both processes (default text)")
    obs.add_argument("--log-prompts", action="store_true",
                     help="put each request's prompt in its access log line (default: never logged)")
    obs.add_argument("--otlp-endpoint", default=None, metavar="URL",
                     help="export OpenTelemetry traces to this OTLP endpoint, e.g. http://collector:4318 "
                          "(OTEL_EXPORTER_OTLP_PROTOCOL http/protobuf or grpc; default: "
                          "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT, else off)")
    # Every flag above as a LCMSERVE_<FLAG> variable (env_flags.py): keep this the last line.
    apply_environment(p)


def _buckets(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4,8; got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers; got {text!r}")
    return tuple(sizes)


def run(args: argparse.Namespace) -> int:
    setup_logging(LogSettings(level=args.log_level, format=args.log_format, prompts=args.log_prompts))
    import asyncio
    import functools

    from lcmserve import __version__

    # Light on purpose: the edge process imports no torch (the engine processes do), so a port in
    # use or a bad flag is reported at once, not after seconds of imports.
    from .edge.app import StartupError, serve
    from .edge.pool import EngineSlot
    from .launch import engine_entry, load_runtime

    try:
        faults = FaultInjection.from_env()
        config = ServerConfig(host=args.host, port=args.port, drain_timeout_s=args.drain_timeout,
                              metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                              metrics_host=args.metrics_host, threads=args.threads, tls=_tls(args),
                              auth_tokens=_tokens(args.auth_token_file), reflection=not args.no_reflection,
                              max_concurrent_rpcs=_positive(args.max_concurrent_rpcs, "--max-concurrent-rpcs"),
                              max_connection_age_s=args.max_connection_age,
                              http_port=_http_port(args.http_port), http_host=args.http_host,
                              otlp_endpoint=args.otlp_endpoint)
    except (UsageError, ValueError) as exc:
        print(f"lcmserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        adapters = adapter_config(args)
    except UsageError as exc:
        print(f"lcmserve serve: {exc}", file=sys.stderr)
        return 2
    engine_config = EngineConfig(max_batch_size=args.max_batch_size, max_queued_requests=args.max_queued_requests,
                                 batch_wait_ms=args.batch_wait_ms, cuda_graphs=not args.no_cuda_graphs,
                                 pin_cpus=not args.no_cpu_pinning, faults=faults, adapters=adapters,
                                 **({"buckets": args.buckets} if args.buckets else {}))
    limits = Limits(max_images=args.max_images)
    if args.max_batch_size < 2:
        print("lcmserve serve: --max-batch-size must be at least 2 (a guided image takes two rows)", file=sys.stderr)
        return 2
    try:
        devices = parse_devices(args.devices, args.device)
    except UsageError as exc:
        print(f"lcmserve serve: {exc}", file=sys.stderr)
        return 2
    slots = [EngineSlot(device, engine_entry(functools.partial(
                 load_runtime, args.model, loras=args.lora, backend=args.backend, device=device, dtype=args.dtype,
                 allow_partial_lora=args.allow_partial_lora, tiny_vae=args.tiny_vae,
                 default_decoder=args.default_decoder, scorer=args.scorer)))
             for device in devices]  # each engine process loads the model on its own device
    try:
        return asyncio.run(serve(slots, config, engine_config, limits, __version__))
    except (StartupError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"lcmserve serve: {exc}", file=sys.stderr)
        return 2


def parse_devices(devices: str | None, device: str | None) -> tuple[str | None, ...]:
    """--devices (or --device) -> one device per engine process; (None,) is the loader's default.

    "all" is every CUDA device (cuda:0 ... cuda:N-1), or one "cpu" engine on a machine without CUDA.
    Refused: mixing cpu and cuda (a retry on the other kind would not give the same image), a CUDA
    device twice (each engine holds a whole model and its CUDA graphs), and --device with --devices.
    """
    if devices is None:
        return (device,)
    if device is not None:
        raise UsageError("give --device or --devices, not both (--devices cuda:0 is --device cuda:0)")
    if devices.strip() == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return tuple(f"cuda:{i}" for i in range(count)) or ("cpu",)
    names = tuple(name.strip() for name in devices.split(","))
    if not names or any(not name for name in names):
        raise UsageError(f"--devices: expected devices like cuda:0,cuda:1 or cpu,cpu or all; got {devices!r}")
    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise UsageError(f"--devices: {name!r} is not a device (cpu, cuda or cuda:N)")
    kinds = {name.partition(":")[0] for name in names}
    if len(kinds) > 1:
        raise UsageError(f"--devices {devices}: mixes cpu and cuda; images would differ between them, so a "
                         "retry on another engine would not reproduce one")
    cuda = ["cuda:0" if name == "cuda" else name for name in names if name != "cpu"]
    twice = sorted({name for name in cuda if cuda.count(name) > 1})
    if twice:
        raise UsageError(f"--devices {devices}: {twice[0]} is listed twice; one engine per GPU (each holds the "
                         "whole model and its CUDA graphs)")
    return names


def adapter_config(args: argparse.Namespace) -> AdapterConfig:
    """--adapter (repeatable), --max-adapters, --max-adapter-rank, --max-adapters-per-request and
    --allow-adapter-loading -> AdapterConfig; UsageError naming the flag and the limit."""
    for flag, value, least in (("--max-adapters", args.max_adapters, 1),
                               ("--max-adapter-rank", args.max_adapter_rank, 1),
                               ("--max-adapters-per-request", args.max_adapters_per_request, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}; got {value}")
    initial = tuple(parse_adapter(text) for text in args.adapter)
    names = [name for name, _, _ in initial]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"--adapter: the name {twice[0]!r} is given twice; each adapter needs a name of its own")
    if len(initial) > args.max_adapters:
        raise UsageError(f"{len(initial)} --adapter flags but --max-adapters {args.max_adapters} slots; raise "
                         "--max-adapters or load fewer")
    return AdapterConfig(initial=initial, max_adapters=args.max_adapters, max_adapter_rank=args.max_adapter_rank,
                         max_adapters_per_request=args.max_adapters_per_request,
                         allow_loading=args.allow_adapter_loading)


def parse_adapter(text: str) -> tuple[str, str, float]:
    """--adapter NAME=SRC[:SCALE] -> (name, source, default scale). The scale is what follows the last ':'
    when that is a number (so a source may hold ':' itself); default 1.0."""
    name, sep, rest = text.partition("=")
    name, rest = name.strip(), rest.strip()
    if not sep or not name or not rest:
        raise UsageError(f"--adapter {text!r}: expected NAME=SRC[:SCALE], e.g. cracks=./cracks.safetensors:0.8")
    if not ADAPTER_NAME.fullmatch(name):
        raise UsageError(f"--adapter {text!r}: the name {name!r} must be 1 to 64 of A-Z a-z 0-9 . _ -")
    source, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
            source = head
        except ValueError:
            pass  # no number after the last ':': part of the source
    if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
        raise UsageError(f"--adapter {text!r}: the scale {scale:g} is out of range: -{MAX_ADAPTER_SCALE:g} to "
                         f"{MAX_ADAPTER_SCALE:g}")
    return name, source, scale


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror}") from None


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS with client certificates)")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    tls = TlsConfig(cert_chain=_read(args.tls_cert, "--tls-cert"), private_key=_read(args.tls_key, "--tls-key"),
                    client_ca=_read(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None)
    for name, pem in (("--tls-cert", tls.cert_chain), ("--tls-key", tls.private_key),
                      ("--tls-client-ca", tls.client_ca)):
        if pem is not None and b"-----BEGIN " not in pem:
            raise UsageError(f"{name} is not a PEM file (no '-----BEGIN' line)")
    return tls


def _tokens(path: Path | None) -> tuple[str, ...]:
    """Accepted tokens: one a line of --auth-token-file (blank lines and '#' comments skipped), else
    $LCMSERVE_AUTH_TOKEN; () means no authentication."""
    if path is not None:
        lines = _read(path, "--auth-token-file").decode("utf-8", "replace").splitlines()
        tokens = tuple(t for t in (line.strip() for line in lines) if t and not t.startswith("#"))
        if not tokens:
            raise UsageError(f"--auth-token-file {path} holds no token (one a line)")
    else:
        tokens = tuple(t for t in os.environ.get(AUTH_TOKEN_ENV, "").split(",") if t.strip())
    if any(any(ch.isspace() for ch in t.strip()) for t in tokens):
        raise UsageError("a token must not contain spaces")
    return tuple(t.strip() for t in tokens)


def _http_port(port: int | None) -> int | None:
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--http-port must be 0 to 65535 (0 picks a free one); got {port}")
    return port


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise UsageError(f"{flag} must be at least 1; got {value}")
    return value
