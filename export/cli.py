"""`lcmserve export`: fuse LoRAs into a base model and write an artifact folder.

    lcmserve export --base tiny --lora crack.safetensors:0.8 --lora latent-consistency/lcm-lora-sdv1-5 \\
        --out artifacts/crack-tiny [--backend eager] [--dtype float32] [--device cpu] [--force]

The client's CLI imports this module to build its parser, where torch may be absent: nothing heavy
is imported until `run`. Bad input (missing file, scale that is not a number, a LoRA that matches
nothing, unknown model) prints one line on stderr and returns 2; other failures return 1. Either
way no artifact is left behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lcmserve.export.artifact import BACKENDS, DTYPES, Manifest  # no torch import: the client CLI builds this parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        metavar="MODEL",
        help="base model: a preset (tiny, sd15-random), a diffusers folder, an export artifact, or a hub id",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="SRC[:SCALE]",
        help="LoRA to fuse (repeatable): a .safetensors file (diffusers or kohya_ss keys), a folder "
        "holding one, or a hub id; SCALE defaults to 1.0",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write")
    parser.add_argument("--backend", choices=BACKENDS, default="eager", help="runtime backend to prepare")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights dtype (default: float16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--device", default=None, metavar="cpu|cuda", help="device (default: cuda when available, else cpu)"
    )
    parser.add_argument("--allow-partial-lora", action="store_true",
                        help="apply a LoRA some of whose modules match nothing in the model (warns and records "
                             "them in the manifest; default: refuse it)")
    parser.add_argument("--tiny-vae", default=None, metavar="SRC",
                        help="also ship a tiny autoencoder (TAESD) as DIR/tiny_vae/: a hub id (madebyollin/taesd), "
                             "a local AutoencoderTiny folder, or a preset's (tiny, sd15-random)")
    parser.add_argument("--scorer", default=None, metavar="SRC",
                        help="also ship a CLIP model that scores best-of-N candidates as DIR/scorer/: a hub id "
                             "(openai/clip-vit-base-patch32), a folder holding a CLIPModel and its processor, or tiny "
                             "(a small random CLIP, for tests)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the export described by `args`; returns the process exit code (0, 1 failure, 2 bad input)."""
    # Argument-only checks first: a bad --lora scale fails before torch is even imported.
    from lcmserve.export.errors import ExportError
    from lcmserve.export.lora import parse_lora_arg

    try:
        specs = [parse_lora_arg(a, allow_partial=args.allow_partial_lora) for a in args.lora]
    except ExportError as e:
        return _fail(e)

    from lcmserve.export.fuse import export_model

    _quiet_libraries()
    try:
        manifest = export_model(
            args.base,
            specs,
            args.out,
            dtype=args.dtype,
            device=args.device,
            backend=args.backend,
            force=args.force,
            progress=not args.no_progress,
            tiny_vae=args.tiny_vae,
            scorer=args.scorer,
        )
    except ExportError as e:
        return _fail(e)

    print(
        f"exported {args.base} + {len(manifest.loras)} LoRA(s) -> {args.out} "
        f"({manifest.dtype}, {manifest.device}, {manifest.backend}); {'; '.join(_checks(manifest))}"
        + (f"; tiny autoencoder {manifest.tiny_vae.source}" if manifest.tiny_vae else "")
        + (f"; scorer {manifest.scorer.source}" if manifest.scorer else "")
    )
    return 0


def _checks(manifest: Manifest) -> list[str]:
    """The parity checks the manifest holds, in words: the fused LoRAs against the unfused
    adapters, and each compiled backend's parts against eager."""
    parity = manifest.parity
    checks = [f"fused parity max|diff| {parity.max_abs_diff:.2g} <= {parity.tolerance:g}" if parity
              else "no LoRA: no fuse parity check"]
    for backend, entry in manifest.compiled.items():
        parts = ", ".join(f"{part} {diff:.2g}" if isinstance(diff, float) else f"{part} {diff}"
                          for part, diff in entry.parity_max_abs_diff.items())
        checks.append(f"{backend} parity max|diff| against eager: {parts or 'none'}")
    return checks


def _fail(e: Exception) -> int:
    message = " ".join(str(e).split())  # one line, whatever the library put in the message
    print(f"lcmserve export: error: {message}", file=sys.stderr)
    return int(getattr(e, "exit_code", 1))


def _quiet_libraries() -> None:
    """The CLI reports problems itself, in one line, and shows one progress bar over the stages.
    The libraries' own logs about the same things (diffusers' "No LoRA keys associated to
    CLIPTextModel", "Loading lora_0 was unsuccessful", transformers' MISSING-keys table while a
    text-encoder LoRA loads, though the weights are unchanged) and their loading bars would only
    confuse: silence them for this process (the CLI owns it)."""
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity(logging.CRITICAL)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # untyped in transformers
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcmserve export", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
