"""The proto's enums as the short lowercase names the SDK, CLI and server use ("jpeg", "approx").

Derived once from the generated enum descriptors, so that a value added to the proto appears here
by itself, and client and server cannot disagree: `OUTPUT_FORMAT_JPEG` -> "jpeg",
`PREVIEW_MODE_APPROX` -> "approx". The `*_UNSPECIFIED` zero values are not names; they read as the
proto's documented default (DEFAULT_OUTPUT_FORMAT, DEFAULT_PREVIEW_MODE).
"""

from __future__ import annotations

from typing import Any

from lcmserve.v1 import generation_pb2 as pb


def enum_names(enum: Any, prefix: str) -> dict[str, int]:
    """{"jpeg": 1, ...} for the values of a generated enum wrapper, less its *_UNSPECIFIED value."""
    return {name.removeprefix(prefix).lower(): int(number) for name, number in enum.items()
            if not name.endswith("_UNSPECIFIED")}


OUTPUT_FORMAT_VALUES: dict[str, int] = enum_names(pb.OutputFormat, "OUTPUT_FORMAT_")
OUTPUT_FORMAT_NAMES: dict[int, str] = {number: name for name, number in OUTPUT_FORMAT_VALUES.items()}
PREVIEW_MODE_VALUES: dict[str, int] = enum_names(pb.PreviewMode, "PREVIEW_MODE_")
PREVIEW_MODE_NAMES: dict[int, str] = {number: name for name, number in PREVIEW_MODE_VALUES.items()}
DECODER_VALUES: dict[str, int] = enum_names(pb.Decoder, "DECODER_")  # {"vae": 1, "tiny_vae": 2}
DECODER_NAMES: dict[int, str] = {number: name for name, number in DECODER_VALUES.items()}

DEFAULT_OUTPUT_FORMAT = "jpeg"  # what OUTPUT_FORMAT_UNSPECIFIED means (generation.proto)
DEFAULT_PREVIEW_MODE = "none"  # what PREVIEW_MODE_UNSPECIFIED means
DEFAULT_DECODER = "unspecified"  # DECODER_UNSPECIFIED: the server picks (GetModelInfo.default_decoder)


def output_format_name(number: int) -> str | None:
    """The name of an OutputFormat value (UNSPECIFIED -> the default), None for an unknown number."""
    return DEFAULT_OUTPUT_FORMAT if number == pb.OUTPUT_FORMAT_UNSPECIFIED else OUTPUT_FORMAT_NAMES.get(number)


def preview_mode_name(number: int) -> str | None:
    """The name of a PreviewMode value (UNSPECIFIED -> the default), None for an unknown number."""
    return DEFAULT_PREVIEW_MODE if number == pb.PREVIEW_MODE_UNSPECIFIED else PREVIEW_MODE_NAMES.get(number)


def decoder_name(number: int) -> str | None:
    """The name of a Decoder value ("vae", "tiny_vae"; UNSPECIFIED -> "unspecified": the server's own
    default, which only the server knows), None for an unknown number."""
    return DEFAULT_DECODER if number == pb.DECODER_UNSPECIFIED else DECODER_NAMES.get(number)


def canonical_name(text: str) -> str:
    """A name as a user may type it on a command line -> the proto-derived name: "tiny-vae" -> "tiny_vae"."""
    return text.strip().lower().replace("-", "_")


def cli_choice(text: str) -> str:
    """``type=`` of an enum flag: a name in either spelling and any case -> the command line's
    spelling ("tiny_vae", "TINY-VAE" -> "tiny-vae"); `--help` then lists one spelling of each."""
    return text.strip().lower().replace("_", "-")


def cli_names(values: dict[str, int]) -> list[str]:
    """The names of an enum as the command line spells them: "tiny_vae" -> "tiny-vae"."""
    return [cli_choice(name) for name in values]
