"""Errors of the export side, each with a one-line message meant for the user.

`UserInputError` (exit code 2 in the CLI) means the arguments were wrong: a missing file, a scale
that is not a number, a LoRA that fits no module, an unknown model. `ExportError` alone (exit 1)
means valid input that failed, e.g. the fused model does not match the unfused one.
The server can catch the same classes to turn `--model` / `--lora` problems into one line too.
"""

from __future__ import annotations


class ExportError(Exception):
    """An export step failed; str(e) is one line for the user."""

    exit_code = 1


class UserInputError(ExportError, ValueError):
    """Bad input (arguments, files): the CLI prints the message and exits 2."""

    exit_code = 2


class LoraError(UserInputError):
    """A --lora argument that cannot be used: missing, unreadable, bad scale, or matching nothing."""


class ModelNotFoundError(UserInputError):
    """A base model that is not a preset, a folder, an artifact or a reachable hub id."""


class ParityError(ExportError):
    """The fused model's image differs from the unfused adapters' image by more than the tolerance."""
