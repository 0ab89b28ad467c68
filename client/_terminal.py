"""What the ``lcmserve`` command prints when something goes wrong: a failed call explained (what an
UNAVAILABLE most likely means, which deadline passed), the closest option to a mistyped one, and a
stdout that survives its reader going away (``lcmserve info | head -1``).
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Sequence
from typing import Any

from ._connection import unavailable_hint
from .errors import DeadlineExceededError, LcmServeError, UnavailableError


def error_line(command: str, args: argparse.Namespace, error: LcmServeError) -> str:
    """One line for a failed call: for UNAVAILABLE what it most likely means, for DEADLINE_EXCEEDED
    which deadline passed."""
    target = getattr(args, "target", None)
    if isinstance(error, UnavailableError) and isinstance(target, str):
        tls = bool(args.secure or args.root_certificates or args.client_cert)
        hint = unavailable_hint(target, error.details or str(error), tls=tls, client_cert=bool(args.client_cert))
        return f"lcmserve {command}: {hint} ({error})"
    if isinstance(error, DeadlineExceededError) and getattr(args, "timeout", None) is not None:
        return (f"lcmserve {command}: error: {error} (--timeout {args.timeout:g} s passed before the server "
                "finished: raise it, or leave it out for no deadline)")
    return f"lcmserve {command}: error: {error}"


def unknown_arguments(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """argparse's "unrecognized arguments", and the closest option of ``parser`` to the first unknown
    one ("--num_images" -> "--num-images", the SDK's spelling -> the command line's)."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    for word in extras:
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            spelled = "--" + name.lstrip("-").replace("_", "-")
            close = [spelled] if spelled in flags else difflib.get_close_matches(spelled, flags, n=1, cutoff=0.6)
            if close:
                return f"{message} (did you mean {close[0]}?)"
            break
    return message


class ClosedPipeSafe:
    """sys.stdout for a command whose reader may go away (``lcmserve info | head -1``): once the pipe
    is closed, the rest of the output is dropped (fd 1 goes to /dev/null, so that nothing fails at
    exit either) and the command finishes its work: generate still writes every image."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
