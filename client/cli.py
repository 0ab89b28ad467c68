"""The ``lcmserve`` command: ``generate``, ``info`` and ``health`` here; ``serve``, ``export``,
``bench`` and ``dataset`` live in their own modules and are imported only when used (_plugins.py).

Exit codes: 0 done, 1 the server or the file system said no (one line on stderr), 2 bad usage
or a missing extra, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__
from ._common import DEFAULT_TARGET
from ._connection import ConnectionFlagError, add_security_arguments, read_security_arguments
from ._convert import parse_adapter_spec, parse_decoder, parse_output_format, parse_preview_mode
from ._plugins import PLUGINS, CliExit, Handler, load_plugin, plugin_handler
from ._terminal import ClosedPipeSafe, error_line, unknown_arguments
from .client import Client
from .errors import LcmServeError
from .names import DECODER_VALUES, PREVIEW_MODE_VALUES, cli_choice, cli_names
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


# ---- parser -------------------------------------------------------------------------------------


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv: its first word that is not an option (the top-level parser
    has no option that takes a value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``lcmserve`` parser. The subparser of a lazily imported subcommand gets its arguments
    only when it is ``command`` (that imports its module; raises CliExit if it cannot)."""
    parser = argparse.ArgumentParser(
        prog="lcmserve",
        description="Stable Diffusion v1.5 + LCM-LoRA over gRPC: serve, export, generate, info, health, "
        "bench (load tests) and dataset (labelled image sets).",
    )
    parser.add_argument("--version", action="version", version=f"lcmserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images from PROMPT on a running server and write them to files.",
    )
    _add_generate_arguments(generate)
    generate.set_defaults(handler=_run_generate, parser=generate)

    info = commands.add_parser(
        "info", help="describe the served model", description="Describe the served model."
    )
    _add_connection_arguments(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_run_info, parser=info)

    health = commands.add_parser(
        "health",
        help="exit 0 if the server is SERVING, else 1",
        description="Check grpc.health.v1 of the server: print its status; exit 0 if SERVING, else 1.",
    )
    _add_connection_arguments(health)
    health.set_defaults(handler=_run_health, parser=health)

    for name, plugin in PLUGINS.items():
        subparser = commands.add_parser(name, help=plugin.help, description=plugin.help)
        subparser.set_defaults(parser=subparser)
        if name == command:
            module = load_plugin(name)
            module.add_arguments(subparser)
            subparser.set_defaults(handler=plugin_handler(name, module))
    return parser


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("LCMSERVE_TARGET", DEFAULT_TARGET),
        metavar="TARGET",
        help="server address, HOST:PORT, or several servers to balance over: ipv4:HOST:PORT,HOST:PORT,... or "
        f"dns:///NAME:PORT (default: $LCMSERVE_TARGET, else {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                        help="deadline of the call in seconds, > 0 (default: none, the call waits as long as "
                        "it takes)")
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
    parser.add_argument("--candidates", type=int, default=None, metavar="K",
                        help="best-of-N: generate num-images x K and keep the best num-images by the server's CLIP "
                             "score (a server with --scorer; default 1); prints every candidate's seed and score")
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
        help="file to write (default out.<ext>); its suffix (.jpg, .png, .webp, .rgb) picks the format "
        "when --format is not given; several images go to <stem>-<i><suffix>",
    )
    parser.add_argument(
        "--previews",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each step's preview as DIR/image<i>-step<k>.<ext> (created at the first preview; "
        "previews of an earlier run there, named so, are replaced)",
    )
    parser.add_argument(
        "--preview-mode",
        type=cli_choice,
        choices=cli_names(PREVIEW_MODE_VALUES),
        default=None,
        help="approx: cheap, 1/8 size (default with --previews); full: a VAE decode per step; tiny-vae: the "
        "tiny autoencoder's decode per step, full size (a model with one); none: step events without "
        "pictures (default without --previews)",
    )
    parser.add_argument(
        "--decoder",
        type=cli_choice,
        choices=cli_names(DECODER_VALUES),
        default=None,
        help="decoder of the final images: vae, or tiny-vae (TAESD; a model with one) "
        "(default: the server's --default-decoder)",
    )
    parser.add_argument("--init-image", type=Path, metavar="FILE",
                        help="img2img: start from this PNG/JPEG/WEBP (width/height default to its size, floored to 8)")
    parser.add_argument("--strength", type=float, metavar="S", help="with --init-image: 0 < S <= 1, how far it is "
                        "noised; int(steps * S) of the steps run (server default 0.8)")
    parser.add_argument("--mask", type=Path, metavar="FILE", help="inpainting, with --init-image: white = repaint")
    parser.add_argument("--adapter", action="append", type=_adapter, default=[], metavar="NAME[:SCALE]",
                        help="a per-request LoRA adapter loaded on the server (lcmserve adapters list), at SCALE "
                        "(default: the adapter's default scale); repeatable, several add up")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0 (leave it out for no deadline), "
                                         f"got {text}")
    return value


def _adapter(text: str) -> tuple[str, float | None]:
    try:
        return parse_adapter_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    """--format, else the suffix of -o, else jpeg. Before anything is sent, refuses an -o suffix that
    names no format lcmserve writes, or another format than --format (the file would lie)."""
    named = parse_output_format(args.format, "--format") if args.format is not None else None
    suffix = args.output.suffix.lower() if args.output is not None else ""
    if not suffix:
        return named or "jpeg"
    by_suffix = SUFFIX_FORMATS.get(suffix)
    if by_suffix is None:
        raise CliExit(f"lcmserve generate: error: -o {args.output}: {suffix} names no format lcmserve writes "
                       f"({', '.join(SUFFIX_FORMATS)}): use one of these, or no suffix and --format", 2)
    if named is not None and named != by_suffix:
        raise CliExit(f"lcmserve generate: error: --format {args.format} contradicts -o {args.output} "
                       f"(a {by_suffix} file name): leave one out, or make them agree", 2)
    return by_suffix


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
        raise CliExit(f"lcmserve {args.command}: error: {exc}", exc.exit_code) from exc
    except ValueError as exc:  # e.g. a $LCMSERVE_TOKEN with whitespace
        raise CliExit(f"lcmserve {args.command}: error: {exc}", 2) from exc


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
        preview_mode=parse_preview_mode(args.preview_mode or ("approx" if args.previews else "none"),
                                        "--preview-mode"),
        decoder=parse_decoder(args.decoder or "unspecified", "--decoder"),
        init_image=args.init_image,
        strength=args.strength,
        mask_image=args.mask,
        adapters=args.adapter or None,
        candidates=args.candidates,
    )


def _run_generate(args: argparse.Namespace) -> int:
    if args.preview_mode not in (None, "none") and args.previews is None:
        raise CliExit(f"lcmserve generate: error: --preview-mode {args.preview_mode} needs --previews DIR", 2)
    fmt = _output_format(args)
    with _client(args) as client:
        try:
            events = client.stream(args.prompt, _generate_options(args, fmt))
        except (ValueError, TypeError) as exc:  # arguments the SDK refused before sending
            raise CliExit(f"lcmserve generate: error: {exc}", 2) from exc
        try:
            _write_events(events, args, fmt)
        except ImportError as exc:  # Pillow, to convert to the format that -o's suffix names
            raise CliExit(f"lcmserve generate: error: {exc}", 1) from exc
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise CliExit(
                f"lcmserve generate: error: cannot write{where}: {exc.strerror or exc}", 1
            ) from exc
    return 0


def _write_events(events: Iterator[GenerateEvent], args: argparse.Namespace, fmt: OutputFormat) -> None:
    """Writes previews and images as they arrive; prints each image's path, then the summary."""
    several = args.num_images is not None and args.num_images > 1
    num_previews = 0
    for event in events:
        if isinstance(event, StepEvent) and event.preview is not None and args.previews is not None:
            if not num_previews:  # the server took the request: now the folder, without an older run's
                _clear_previews(args.previews)
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
            score = f", score {event.score:.2f}" if event.score is not None else ""
            print(f"wrote {path} ({size}, seed {event.seed}{score})")
        elif isinstance(event, Summary):
            if num_previews:
                print(f"wrote {num_previews} previews to {args.previews}")
            print(_summary_line(event))
            if event.candidates:
                print("candidates: " + ", ".join(f"seed {c.seed} {c.score:.2f}{' (returned)' if c.returned else ''}"
                                                 for c in event.candidates))
            if event.prompt_truncated:
                tokens = event.prompt_tokens
                print(f"warning: the prompt ({tokens} tokens) was cut to CLIP's 77", file=sys.stderr)


_PREVIEW_NAME = re.compile(r"image\d+-step\d+\.(jpg|png|webp|rgb)")  # what --previews writes


def _clear_previews(folder: Path) -> None:
    """Makes the --previews folder; removes previews an earlier run wrote there (only files named as
    this command names them), so that the folder holds this run's steps only."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if _PREVIEW_NAME.fullmatch(path.name) and path.is_file():
            path.unlink()


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
        ("backend", "; ".join([info.backend, *(f"{k} {v}" for k, v in sorted(info.backend_details.items()))])),
        ("decoders", f"{', '.join(info.decoders) or 'vae'} (default {info.default_decoder or 'vae'}); "
                     f"JPEG on the {info.jpeg_encoder or 'host'}"),
        ("adapters", "; ".join(f"{a.name} (rank {a.rank}, {'+'.join(a.targets)}, default scale {a.default_scale:g})"
                               for a in info.adapters) or "none"),
        ("scorer", f"{info.scorer.source} (CLIP, projection {info.scorer.projection_dim}, image "
                   f"{info.scorer.image_size} px, sha256 {info.scorer.sha256[:12]}); candidates 1 to "
                   f"{limits.max_candidates}" if info.scorer else "none (candidates 1 only)"),
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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``lcmserve`` command with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    stdout = sys.stdout
    sys.stdout = ClosedPipeSafe(stdout)  # a TextIO in all that is used
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
        return code
    finally:
        sys.stdout = stdout


def _main(argv: list[str]) -> int:
    command = _command_in(argv)
    args = argparse.Namespace()
    try:
        parser = build_parser(command)
        try:
            args, extras = parser.parse_known_args(argv)
            if extras:  # the subcommand's usage, not the top level's, and the closest option
                command_parser = getattr(args, "parser", None) or parser
                command_parser.error(unknown_arguments(command_parser, extras))
        except SystemExit as exc:  # --help, --version, or a usage error argparse printed
            return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        return handler(args)
    except CliExit as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except LcmServeError as exc:
        print(error_line(command or "", args, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lcmserve {command or ''}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
