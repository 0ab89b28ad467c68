"""The ``lcmserve`` command: ``generate``, ``info`` and ``health`` here; ``serve``, ``export`` and
``bench`` live in their own modules and are imported only when used.

Exit codes: 0 done, 1 the server or the file system said no (one line on stderr), 2 bad usage
or a missing extra, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from . import __version__
from ._common import DEFAULT_TARGET
from ._connection import ConnectionFlagError, add_security_arguments, read_security_arguments
from ._convert import parse_decoder, parse_output_format, parse_preview_mode
from .client import Client
from .errors import LcmServeError, UnavailableError
from .options import GenerateOptions
from .types import (
    FORMAT_SUFFIXES,
    SUFFIX_FORMATS,
    GenerateEvent,
    Image,
    ModelInfo,
    OutputFormat,
    StepEvent,
    Summary,
)

_Handler = Callable[[argparse.Namespace], int]


class _CliExit(Exception):
    """Ends the command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---- subcommands owned by other modules, imported lazily ---------------------------------------


@dataclass(frozen=True)
class _Plugin:
    module: str  # provides add_arguments(parser) and run(args) -> int
    help: str
    what: str  # names it in "<what> needs the [extra] extra"
    extra: str | None  # the pip extra that brings its dependencies
    needs: tuple[str, ...]  # top-level modules of that extra it cannot start without


_PLUGINS = {
    "serve": _Plugin(
        "lcmserve.server.cli",
        "serve a model over gRPC (needs the [server] extra)",
        "the server",
        "server",
        ("torch", "diffusers", "transformers"),
    ),
    "export": _Plugin(
        "lcmserve.export.cli",
        "fuse LoRAs into a base model, check and compile it into an artifact folder "
        "(needs the [server] extra)",
        "the export",
        "server",
        ("torch", "diffusers", "transformers"),
    ),
    "bench": _Plugin(
        "lcmserve.bench.cli", "load-test a server: throughput and latency", "the benchmark", None, ()
    ),
    "dataset": _Plugin(
        "lcmserve.dataset.cli",
        "make a labelled, resumable image dataset from a YAML spec (imagefolder layout)",
        "the dataset job",
        None,
        (),
    ),
}


def _missing_modules(names: Sequence[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _extra_error(command: str, plugin: _Plugin, missing: str) -> _CliExit:
    if plugin.extra is None:
        return _CliExit(f"lcmserve {command}: {plugin.what} needs {missing}: pip install {missing}", 2)
    return _CliExit(
        f"lcmserve {command}: {plugin.what} needs the [{plugin.extra}] extra: "
        f"pip install 'lcmserve[{plugin.extra}]' (not installed: {missing})",
        2,
    )


def _load_plugin(command: str) -> ModuleType:
    """Imports the module of ``command``, or raises _CliExit saying what to install."""
    plugin = _PLUGINS[command]
    missing = _missing_modules(plugin.needs)
    if missing:
        raise _extra_error(command, plugin, ", ".join(missing))
    try:
        module = importlib.import_module(plugin.module)
    except ImportError as exc:
        name = exc.name or ""
        if name == "lcmserve" or name.startswith("lcmserve."):
            raise _CliExit(f"lcmserve {command}: not available in this build ({exc})", 2) from exc
        raise _extra_error(command, plugin, name or str(exc)) from exc
    for attribute in ("add_arguments", "run"):
        if not callable(getattr(module, attribute, None)):
            raise _CliExit(f"lcmserve {command}: {plugin.module} has no {attribute}()", 2)
    return module


def _plugin_handler(command: str, module: ModuleType) -> _Handler:
    def handle(args: argparse.Namespace) -> int:
        try:
            code = module.run(args)
        except ImportError as exc:  # a dependency imported inside run()
            name = exc.name or ""
            if not name or name == "lcmserve" or name.startswith("lcmserve."):
                raise
            raise _extra_error(command, _PLUGINS[command], name) from exc
        return int(code or 0)

    return handle


# ---- parser -------------------------------------------------------------------------------------


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv: its first word that is not an option (the top-level parser
    has no option that takes a value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``lcmserve`` parser. The subparser of a lazily imported subcommand gets its arguments
    only when it is ``command`` (that imports its module; raises _CliExit if it cannot)."""
    parser = argparse.ArgumentParser(
        prog="lcmserve",
        description="Stable Diffusion v1.5 + LCM-LoRA over gRPC: serve, generate, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"lcmserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images from PROMPT on a running server and write them to files.",
    )
    _add_generate_arguments(generate)
    generate.set_defaults(handler=_run_generate)

    info = commands.add_parser(
        "info", help="describe the served model", description="Describe the served model."
    )
    _add_connection_arguments(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_run_info)

    health = commands.add_parser(
        "health",
        help="exit 0 if the server is SERVING, else 1",
        description="Check grpc.health.v1 of the server: print its status; exit 0 if SERVING, else 1.",
    )
    _add_connection_arguments(health)
    health.set_defaults(handler=_run_health)

    for name, plugin in _PLUGINS.items():
        subparser = commands.add_parser(name, help=plugin.help, description=plugin.help)
        if name == command:
            module = _load_plugin(name)
            module.add_arguments(subparser)
            subparser.set_defaults(handler=_plugin_handler(name, module))
    return parser


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("LCMSERVE_TARGET", DEFAULT_TARGET),
        metavar="TARGET",
        help="server address, HOST:PORT, or several servers to balance over: ipv4:HOST:PORT,HOST:PORT,... or "
        f"dns:///NAME:PORT (default: $LCMSERVE_TARGET, else {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline in seconds")
    add_security_arguments(parser)


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", metavar="PROMPT", help="text to generate from")
    _add_connection_arguments(parser)
    parser.add_argument(
        "--retries",
        type=_retries,
        default=3,
        metavar="N",
        help="retry UNAVAILABLE and RESOURCE_EXHAUSTED up to N times, before the first event, with the "
        "same seed (default 3; 0: never)",
    )
    parser.add_argument(
        "--negative-prompt", default=None, help="text to steer away from (with --guidance > 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N", help="denoising steps, 1-8 (server default 4)"
    )
    parser.add_argument(
        "--guidance", type=float, default=None, metavar="G", help="guidance scale (server default 1.0: none)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="N", help="seed of image 0 (default: random)"
    )
    parser.add_argument("--width", type=int, default=None, metavar="PX", help="pixels (server default 512)")
    parser.add_argument("--height", type=int, default=None, metavar="PX", help="pixels (server default 512)")
    parser.add_argument("--num-images", type=int, default=None, metavar="N", help="images (server default 1)")
    parser.add_argument(
        "--format",
        choices=list(FORMAT_SUFFIXES),
        default=None,
        help="image encoding (default: from the suffix of -o, else jpeg); raw = uint8 RGB, no header",
    )
    parser.add_argument(
        "--quality", type=int, default=None, help="JPEG/WEBP quality, 1-100 (server default 90)"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="PATH",
        help="file to write (default out.<ext>); several images go to <stem>-<i><suffix>",
    )
    parser.add_argument(
        "--previews",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each step's preview as DIR/image<i>-step<k>.<ext>",
    )
    parser.add_argument(
        "--preview-mode",
        choices=["approx", "full", "tiny-vae", "tiny_vae"],
        default=None,
        help="approx: cheap, 1/8 size (default); full: a VAE decode per step; tiny-vae: the tiny "
        "autoencoder's decode per step, full size (a model with one)",
    )
    parser.add_argument(
        "--decoder",
        choices=["vae", "tiny-vae", "tiny_vae"],
        default=None,
        help="decoder of the final images: vae, or tiny-vae (TAESD; a model with one) "
        "(default: the server's --default-decoder)",
    )
    parser.add_argument("--init-image", type=Path, metavar="FILE",
                        help="img2img: start from this PNG/JPEG/WEBP (width/height default to its size, floored to 8)")
    parser.add_argument("--strength", type=float, metavar="S", help="with --init-image: 0 < S <= 1, how far it is "
                        "noised; int(steps * S) of the steps run (server default 0.8)")
    parser.add_argument("--mask", type=Path, metavar="FILE", help="inpainting, with --init-image: white = repaint")


def _retries(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: no retries), got {value}")
    return value


# ---- generate -----------------------------------------------------------------------------------


def _output_format(args: argparse.Namespace) -> OutputFormat:
    """--format, else the suffix of -o, else jpeg."""
    if args.format is not None:
        return parse_output_format(args.format, "--format")
    if args.output is not None and args.output.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[args.output.suffix.lower()]
    return "jpeg"


def _image_path(output: Path | None, fmt: OutputFormat, index: int, several: bool) -> Path:
    """Where image ``index`` goes: PATH, or <stem>-<index><suffix> when there are several."""
    path = output if output is not None else Path("out" + FORMAT_SUFFIXES[fmt])
    if not path.suffix:
        path = path.with_name(path.name + FORMAT_SUFFIXES[fmt])
    if several:
        path = path.with_name(f"{path.stem}-{index}{path.suffix}")
    return path


def _client(args: argparse.Namespace) -> Client:
    try:
        c = read_security_arguments(args)
        return Client(args.target, secure=c.secure, root_certificates=c.root_certificates, client_cert=c.client_cert,
                      client_key=c.client_key, token=c.token, timeout=args.timeout, retries=getattr(args, "retries", 3))
    except ConnectionFlagError as exc:  # an unreadable PEM file (1), flags that do not go together (2)
        raise _CliExit(f"lcmserve {args.command}: error: {exc}", exc.exit_code) from exc
    except ValueError as exc:  # e.g. a $LCMSERVE_TOKEN with whitespace
        raise _CliExit(f"lcmserve {args.command}: error: {exc}", 2) from exc


def _generate_options(args: argparse.Namespace, fmt: OutputFormat) -> GenerateOptions:
    """The request's options from the command line; options not given take the server's defaults."""
    return GenerateOptions(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        output_format=fmt,
        quality=args.quality,
        preview_mode=parse_preview_mode(args.preview_mode or "approx", "--preview-mode")
        if args.previews is not None else "none",
        decoder=parse_decoder(args.decoder or "unspecified", "--decoder"),
        init_image=args.init_image,
        strength=args.strength,
        mask_image=args.mask,
    )


def _run_generate(args: argparse.Namespace) -> int:
    if args.preview_mode is not None and args.previews is None:
        raise _CliExit("lcmserve generate: error: --preview-mode needs --previews DIR", 2)
    fmt = _output_format(args)
    with _client(args) as client:
        try:
            events = client.stream(args.prompt, _generate_options(args, fmt))
        except (ValueError, TypeError) as exc:  # arguments the SDK refused before sending
            raise _CliExit(f"lcmserve generate: error: {exc}", 2) from exc
        try:
            _write_events(events, args, fmt)
        except ImportError as exc:  # Pillow, to convert to the format that -o's suffix names
            raise _CliExit(f"lcmserve generate: error: {exc}", 1) from exc
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise _CliExit(
                f"lcmserve generate: error: cannot write{where}: {exc.strerror or exc}", 1
            ) from exc
    return 0


def _write_events(events: Iterator[GenerateEvent], args: argparse.Namespace, fmt: OutputFormat) -> None:
    """Writes previews and images as they arrive; prints each image's path, then the summary."""
    several = args.num_images is not None and args.num_images > 1
    if args.previews is not None:
        args.previews.mkdir(parents=True, exist_ok=True)
    num_previews = 0
    for event in events:
        if isinstance(event, StepEvent) and event.preview is not None and args.previews is not None:
            ext = FORMAT_SUFFIXES[event.preview.format]
            event.preview.save(args.previews / f"image{event.image_index}-step{event.step}{ext}")
            num_previews += 1
        elif isinstance(event, Image):
            path = _image_path(args.output, fmt, event.index, several)
            path.parent.mkdir(parents=True, exist_ok=True)
            event.save(path)
            written = SUFFIX_FORMATS.get(path.suffix.lower(), event.format)  # Picture.save converts
            layout = ", uint8 RGB HxWx3, no header" if written == "raw" else ""
            size = f"{event.width}x{event.height} {written}{layout}"
            print(f"wrote {path} ({size}, seed {event.seed})")
        elif isinstance(event, Summary):
            if num_previews:
                print(f"wrote {num_previews} previews to {args.previews}")
            print(_summary_line(event))
            if event.prompt_truncated:
                tokens = event.prompt_tokens
                print(f"warning: the prompt ({tokens} tokens) was cut to CLIP's 77", file=sys.stderr)


def _summary_line(summary: Summary) -> str:
    t = summary.timings
    images = "image" if summary.num_images == 1 else "images"
    return (
        f"seed {summary.seed}, {summary.num_images} {images} in {t.total_ms:.1f} ms "
        f"(queue {t.queue_ms:.1f}, text {t.text_ms:.1f}, unet {t.unet_ms:.1f}, "
        f"vae {t.vae_ms:.1f}, encode {t.encode_ms:.1f} ms)"
    )


# ---- info and health ----------------------------------------------------------------------------


def _run_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info()
    if args.json:
        print(json.dumps(dataclasses.asdict(info), indent=2))
    else:
        print(_format_model_info(info, args.target))
    return 0


def _format_model_info(info: ModelInfo, target: str) -> str:
    limits = info.limits
    loras = [f"{lora.source} (scale {lora.scale:g}, sha256 {lora.sha256[:12]})" for lora in info.loras]
    rows = [
        ("server", f"lcmserve {info.server_version} at {target}"),
        ("base", info.base),
        ("loras", "; ".join(loras) or "none"),
        ("dtype", info.dtype),
        ("device", ", ".join(info.devices) if len(info.devices) > 1 else info.device),
        ("backend", info.backend),
        ("decoders", f"{', '.join(info.decoders) or 'vae'} (default {info.default_decoder or 'vae'}); "
                     f"JPEG on the {info.jpeg_encoder or 'host'}"),
        ("steps", f"1 to {limits.max_steps}"),
        ("sides", f"{limits.min_side} to {limits.max_side} px, multiples of {limits.side_multiple}"),
        ("images", f"at most {limits.max_images} per request"),
        ("guidance", f"{limits.min_guidance_scale:g} to {limits.max_guidance_scale:g}"),
        ("prompt", f"at most {limits.max_prompt_chars} characters"),
        ("batch", f"at most {limits.max_batch_size} rows per UNet call"),
        ("queue", f"at most {limits.max_queued_requests} waiting requests"),
    ]
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


def _run_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health_status()
    print(status)
    return 0 if status == "SERVING" else 1


# ---- entry point --------------------------------------------------------------------------------


def _port_of(target: str) -> str:
    _, _, port = target.rpartition(":")
    return port if port.isdigit() else "50051"


def _error_line(command: str, args: argparse.Namespace, error: LcmServeError) -> str:
    target = getattr(args, "target", None)
    if isinstance(error, UnavailableError) and target is not None:
        return (
            f"lcmserve {command}: no server available at {target} ({error}); start one with "
            f"'lcmserve serve --model tiny --port {_port_of(target)}', or pass --target HOST:PORT"
        )
    return f"lcmserve {command}: error: {error}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``lcmserve`` command with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    args = argparse.Namespace()
    try:
        parser = build_parser(command)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a usage error argparse printed
            return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
        handler: _Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        return handler(args)
    except _CliExit as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except LcmServeError as exc:
        print(_error_line(command or "", args, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lcmserve {command or ''}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
