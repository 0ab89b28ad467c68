"""The security flags every client command takes, in one place: ``lcmserve generate``, ``info``,
``health``, ``bench`` and ``dataset`` all add them with `add_security_arguments` and read them with
`read_security_arguments`. Each command keeps its own ``--target`` and ``--timeout`` (their
defaults and meaning differ: one server or several, a call's deadline or a request's).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ._common import auth_metadata


class ConnectionFlagError(ValueError):
    """A security flag that cannot be used; `exit_code` 1 when a file cannot be read, 2 for bad usage."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Connection:
    """Client/AsyncClient keyword arguments from the flags: PEM bytes read once, the token as given
    (None: the SDK reads $LCMSERVE_TOKEN). Secrets stay out of the repr."""

    secure: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    client_cert: bytes | None = field(default=None, repr=False)
    client_key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--secure, --root-certificates, --client-cert, --client-key, --token."""
    parser.add_argument("--secure", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument(
        "--root-certificates", type=Path, default=None, metavar="PEM", help="use TLS trusting these roots"
    )
    parser.add_argument(
        "--client-cert", type=Path, default=None, metavar="PEM", help="mTLS: present this certificate chain"
    )
    parser.add_argument(
        "--client-key", type=Path, default=None, metavar="PEM", help="mTLS: the private key of --client-cert"
    )
    parser.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="bearer token for a server with --auth-token-file (default: $LCMSERVE_TOKEN)",
    )


def read_security_arguments(args: argparse.Namespace) -> Connection:
    """Reads the PEM files the flags name and checks the flags together; raises ConnectionFlagError
    naming the flag."""

    def read(flag: str) -> bytes | None:
        path: Path | None = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConnectionFlagError(f"cannot read {flag} {path}: {exc.strerror or exc}", 1) from exc

    client_cert, client_key = read("--client-cert"), read("--client-key")
    if (client_cert is None) != (client_key is None):
        raise ConnectionFlagError("--client-cert and --client-key go together", 2)
    if args.token is not None:
        try:
            auth_metadata(args.token)  # the SDK's own check of the token's form
        except ValueError as exc:
            raise ConnectionFlagError(f"--token: {exc}", 2) from exc
    return Connection(
        secure=args.secure,
        root_certificates=read("--root-certificates"),
        client_cert=client_cert,
        client_key=client_key,
        token=args.token,
    )
