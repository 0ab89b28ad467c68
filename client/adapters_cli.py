"""``lcmserve adapters list|load|unload``: the per-request LoRA adapters of a running server
(AdapterService; docs/adapters.md).

    lcmserve adapters list --target HOST:PORT
    lcmserve adapters load cracks /models/cracks.safetensors --scale 0.8 --target HOST:PORT
    lcmserve adapters unload cracks --target HOST:PORT

``load`` and ``unload`` need a server started with ``--allow-adapter-loading``; SRC is read by the
server, from its own disk (or the hub). Every command takes the usual TLS and token flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

from ._common import DEFAULT_TARGET
from ._connection import ConnectionFlagError, add_security_arguments, read_security_arguments
from ._plugins import CliExit
from .client import Client
from .types import AdapterInfo, AdapterList


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``adapters`` subcommands, each with --target, --timeout and the security flags."""
    commands = parser.add_subparsers(dest="adapters_command", metavar="{list,load,unload}")
    listing = commands.add_parser("list", help="list the loaded adapters and the free slots",
                                  description="List the server's per-request adapters and its free slots.")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    load = commands.add_parser(
        "load", help="load a LoRA file as a named adapter (server with --allow-adapter-loading)",
        description="Load a kohya_ss or diffusers/PEFT LoRA (a .safetensors file or a folder holding one, on the "
                    "server's disk, or a hub id) as adapter NAME, into a free slot, without a restart.")
    load.add_argument("name", metavar="NAME", help="name requests use: 1 to 64 of A-Z a-z 0-9 . _ -")
    load.add_argument("source", metavar="SRC", help="the LoRA, as the server sees it: file, folder or hub id")
    load.add_argument("--scale", type=_scale, default=None, metavar="S",
                      help="default scale of requests that name it without one, -8 to 8 (default 1.0)")
    unload = commands.add_parser(
        "unload", help="unload an adapter (server with --allow-adapter-loading)",
        description="Unload adapter NAME: requests already admitted finish with it; new ones naming it are refused.")
    unload.add_argument("name", metavar="NAME")
    for sub in (listing, load, unload):
        sub.add_argument("--target", default=os.environ.get("LCMSERVE_TARGET", DEFAULT_TARGET), metavar="TARGET",
                         help=f"server address, HOST:PORT (default: $LCMSERVE_TARGET, else {DEFAULT_TARGET})")
        sub.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                         help="deadline of the call in seconds (default: none; a load from the hub can take long)")
        add_security_arguments(sub)


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from -8 to 8, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number from -8 to 8, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def _client(args: argparse.Namespace) -> Client:
    try:
        c = read_security_arguments(args)
        return Client(args.target, secure=c.secure, root_certificates=c.root_certificates, client_cert=c.client_cert,
                      client_key=c.client_key, token=c.token, timeout=args.timeout)
    except ConnectionFlagError as exc:
        raise CliExit(f"lcmserve adapters: error: {exc}", exc.exit_code) from exc
    except ValueError as exc:  # e.g. a $LCMSERVE_TOKEN with whitespace
        raise CliExit(f"lcmserve adapters: error: {exc}", 2) from exc


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "adapters_command", None)
    if command is None:
        raise CliExit("lcmserve adapters: error: name a command: list, load NAME SRC [--scale S], or unload NAME", 2)
    with _client(args) as client:
        if command == "list":
            listing = client.list_adapters()
            print(json.dumps(dataclasses.asdict(listing), indent=2) if args.json else format_adapters(listing))
        elif command == "load":
            adapter = client.load_adapter(args.name, args.source, args.scale)
            print(f"loaded {describe(adapter)}")
        else:
            client.unload_adapter(args.name)
            print(f"unloaded {args.name} (requests already admitted finish with it)")
    return 0


def describe(adapter: AdapterInfo) -> str:
    """One line: name, rank, what it adapts, default scale, format and file."""
    return (f"{adapter.name}: rank {adapter.rank}, {'+'.join(adapter.targets) or 'nothing'} "
            f"({adapter.modules} modules, {adapter.format or '?'}), default scale {adapter.default_scale:g}, "
            f"sha256 {adapter.sha256[:12]}, from {adapter.source}")


def format_adapters(listing: AdapterList) -> str:
    lines = [describe(adapter) for adapter in listing.adapters] or ["no adapters loaded"]
    loading = ("loading allowed" if listing.loading_allowed else
               "loading not allowed (serve --allow-adapter-loading)")
    lines.append(f"{listing.free_slots} free slots; {loading}")
    return "\n".join(lines)
