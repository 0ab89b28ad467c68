"""The ``lcmserve`` subcommands that live in their own modules (serve, export, bench, dataset): what
each needs, imported only when it is the command being run, and one line saying what to install
when it cannot be.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

Handler = Callable[[argparse.Namespace], int]


class CliExit(Exception):
    """Ends the command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Plugin:
    module: str  # provides add_arguments(parser) and run(args) -> int
    help: str
    what: str  # names it in "<what> needs the [extra] extra"
    extra: str | None  # the pip extra that brings its dependencies
    needs: tuple[str, ...]  # top-level modules of that extra it cannot start without


PLUGINS = {
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
    "adapters": _Plugin(
        "lcmserve.adapters_cli",
        "list, load and unload the per-request LoRA adapters of a running server",
        "the adapters command",
        None,
        (),
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


def _extra_error(command: str, plugin: _Plugin, missing: str) -> CliExit:
    if plugin.extra is None:
        return CliExit(f"lcmserve {command}: {plugin.what} needs {missing}: pip install {missing}", 2)
    return CliExit(
        f"lcmserve {command}: {plugin.what} needs the [{plugin.extra}] extra: "
        f"pip install 'lcmserve[{plugin.extra}]' (not installed: {missing})",
        2,
    )


def load_plugin(command: str) -> ModuleType:
    """Imports the module of ``command``, or raises CliExit saying what to install."""
    plugin = PLUGINS[command]
    missing = _missing_modules(plugin.needs)
    if missing:
        raise _extra_error(command, plugin, ", ".join(missing))
    try:
        module = importlib.import_module(plugin.module)
    except ImportError as exc:
        name = exc.name or ""
        if name == "lcmserve" or name.startswith("lcmserve."):
            raise CliExit(f"lcmserve {command}: not available in this build ({exc})", 2) from exc
        raise _extra_error(command, plugin, name or str(exc)) from exc
    for attribute in ("add_arguments", "run"):
        if not callable(getattr(module, attribute, None)):
            raise CliExit(f"lcmserve {command}: {plugin.module} has no {attribute}()", 2)
    return module


def plugin_handler(command: str, module: ModuleType) -> Handler:
    def handle(args: argparse.Namespace) -> int:
        try:
            code = module.run(args)
        except ImportError as exc:  # a dependency imported inside run()
            name = exc.name or ""
            if not name or name == "lcmserve" or name.startswith("lcmserve."):
                raise
            raise _extra_error(command, PLUGINS[command], name) from exc
        return int(code or 0)

    return handle
