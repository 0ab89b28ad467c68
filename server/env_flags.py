"""Every `lcmserve serve` flag as an environment variable: `--max-batch-size` is `LCMSERVE_MAX_BATCH_SIZE`.

Generic over the parser: `apply_environment(parser)` walks its options (whoever added them), so a new
flag gets its variable without a line here. A variable that is set becomes that flag's default, so
the command line wins; its text is converted and checked as the flag's own value would be (type,
choices), and a bad one ends the command with exit code 2 and a line naming the variable.

    value flag          LCMSERVE_PORT=50051
    on/off flag         LCMSERVE_NO_REFLECTION=1 (1/true/yes/on, 0/false/no/off; off leaves the default)
    repeatable flag     LCMSERVE_LORA=a.safetensors:0.8,b.safetensors (comma-separated, each as one flag)

`--help` shows each flag's variable. Standard library only (the client CLI builds this parser).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

PREFIX = "LCMSERVE_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def variable(action: argparse.Action) -> str | None:
    """The variable of a flag (`--max-batch-size` -> LCMSERVE_MAX_BATCH_SIZE); None for positionals,
    --help and flags without a long name."""
    long = next((o for o in action.option_strings if o.startswith("--")), None)
    if long is None or action.dest == "help" or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    return PREFIX + long[2:].replace("-", "_").upper()


def flags(parser: argparse.ArgumentParser) -> list[tuple[argparse.Action, str]]:
    """(action, variable) for every option of `parser` that has one, in the parser's order."""
    found = [(action, variable(action)) for action in parser._actions]
    return [(action, name) for action, name in found if name is not None]


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Name each flag's variable in its help, and make the value of each variable that is set the
    flag's default (the command line still wins). Call it once, after the last add_argument."""
    env = os.environ if environ is None else environ
    for action, name in flags(parser):
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {name}]".strip()
        text = env.get(name)
        if text is None:
            continue
        try:
            default = _default_from(parser, action, text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            parser.error(f"{name}={text!r}: {_reason(action, exc)}")
        action.default = default
        action.required = False  # (a required flag given by its variable)


def _default_from(parser: argparse.ArgumentParser, action: argparse.Action, text: str) -> object:
    """What the flag would hold had `text` been given on the command line (each comma-separated
    item, for a repeatable or multi-value flag): the action itself stores it in a scratch namespace."""
    scratch = argparse.Namespace(**{action.dest: _copy(action.default)})
    option = action.option_strings[-1]
    if action.nargs == 0:  # on/off
        word = text.strip().lower()
        if word not in TRUE + FALSE:
            raise ValueError(f"expected one of {'/'.join(TRUE)} or {'/'.join(f for f in FALSE if f)}")
        if word in TRUE:
            action(parser, scratch, [], _positive_option(action))
        elif isinstance(action, argparse.BooleanOptionalAction):
            action(parser, scratch, [], next(o for o in action.option_strings if o.startswith("--no-")))
        return getattr(scratch, action.dest)
    items = [item.strip() for item in text.split(",")] if _many(action) else [text]
    if _many(action) and (not items or any(not item for item in items)):
        raise ValueError("expected comma-separated values, none empty")
    values: list[Any] = [_convert(action, item) for item in items]
    if isinstance(action, argparse._AppendAction):
        for value in values:
            action(parser, scratch, value, option)
    elif action.nargs in ("*", "+") or isinstance(action.nargs, int):
        action(parser, scratch, values, option)
    else:
        action(parser, scratch, values[0], option)
    return getattr(scratch, action.dest)


def _many(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int)


def _positive_option(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return next(o for o in action.option_strings if not o.startswith("--no-"))
    return action.option_strings[-1]


def _convert(action: argparse.Action, text: str) -> object:
    convert = action.type if callable(action.type) else None
    value = convert(text) if convert is not None else text
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return value


def _reason(action: argparse.Action, exc: BaseException) -> str:
    if isinstance(exc, argparse.ArgumentTypeError) or str(exc).startswith(("invalid choice", "expected")):
        return str(exc)
    kind = getattr(action.type, "__name__", "value")
    return f"invalid {kind} value for {action.option_strings[-1]} ({exc})"


def _copy(value: object) -> object:
    return list(value) if isinstance(value, list) else value
