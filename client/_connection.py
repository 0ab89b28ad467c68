"""The security flags every client command takes, in one place: ``lcmserve generate``, ``info``,
``health``, ``bench`` and ``dataset`` all add them with `add_security_arguments` and read them with
`read_security_arguments`. Each command keeps its own ``--target`` and ``--timeout`` (their
defaults and meaning differ: one server or several, a call's deadline or a request's).
"""

from __future__ import annotations

import argparse
import re
import urllib.parse
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


# ---- what an UNAVAILABLE means --------------------------------------------------------------------

# grpc target schemes (https://github.com/grpc/grpc/blob/master/doc/naming.md); any other "x://" is a URL.
_GRPC_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds")
_DIALLED = re.compile(r"ipv[46]:(\[[^\]]*\]|[^:\s,\[\]]+):(\d+)")  # the address in grpc's message


def _url_host_port(target: str) -> str | None:
    """HOST:PORT of a target written as a URL (``http://h:50051/``), None for a gRPC target."""
    scheme, sep, _ = target.partition("://")
    if not sep or scheme.lower() in _GRPC_SCHEMES:
        return None
    parts = urllib.parse.urlsplit(target)
    host = parts.hostname or "HOST"
    host = f"[{host}]" if ":" in host else host
    try:
        port = str(parts.port) if parts.port is not None else "PORT"
    except ValueError:
        port = "PORT"
    return f"{host}:{port}"


def _names_no_port(target: str) -> bool:
    """Whether a one-address target names no port, so that grpc dials its default, 443."""
    if "," in target or target.split(":", 1)[0].lower() in _GRPC_SCHEMES[1:]:
        return False  # several addresses, or an address grpc takes as it is (ipv4:, unix:, ...)
    address = target.removeprefix("dns:///").removeprefix("dns:")
    if address.startswith("["):  # [IPv6] or [IPv6]:PORT
        return not address.partition("]")[2].startswith(":")
    return ":" not in address


def unavailable_hint(target: str, details: str, *, tls: bool, client_cert: bool) -> str:
    """What an UNAVAILABLE from ``target`` most likely means, and what to do, in words for a user.

    ``details`` is the error's message (the server's, or grpc's when the connection failed);
    ``tls`` and ``client_cert`` say how the client connected. The server's own messages (loading,
    draining, shutting down: server/edge/service.py) come first, then what grpc says about the
    connection: TLS on one side only, a missing client certificate, an HTTP/1 port, no port,
    nothing listening.
    """
    url = _url_host_port(target)
    if url is not None:
        return f"{target} is a URL; gRPC targets are HOST:PORT (no http:// or https://): pass --target {url}"
    if "still loading" in details:
        return (f"the server at {target} is up but still loading its model: wait until "
                f"'lcmserve health --target {target}' prints SERVING (seconds to minutes), or retry")
    if "draining" in details or "shutting down" in details:
        return (f"the server at {target} is draining (stopping) and takes no new requests: "
                "use another server, or retry once it has restarted")
    if "not serving" in details:
        return f"the server at {target} is not serving (its engine died; it exits to be restarted): retry later"
    found = _DIALLED.search(details)
    port = found.group(2) if found else None
    if _names_no_port(target) and port is not None:
        return (f"--target {target} names no port, so gRPC dialled port {port} (its default): "
                f"pass --target {target}:PORT ('lcmserve serve' listens on 50051 unless --port says otherwise)")
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (f"the server at {target} serves TLS with a certificate this client does not trust: "
                "pass --root-certificates CA.pem (the CA that signed the server's certificate)")
    if tls and ("WRONG_VERSION_NUMBER" in details or "handshake" in details.lower() and "ssl" in details.lower()):
        return (f"the server at {target} does not answer TLS (a plaintext server?): "
                "leave out --secure and --root-certificates")
    if "HTTP/2" in details or "SETTINGS frame" in details:
        return (f"{target} answered, but not as a gRPC server (an HTTP/1 port, such as the metrics port, "
                "8002 by default?): use serve's --port (50051 by default)")
    if "Socket closed" in details or "Connection reset" in details:
        if not tls:
            return (f"the server at {target} closed the connection at once: if it serves TLS (--tls-cert), "
                    "pass --root-certificates CA.pem (or --secure for a publicly signed certificate)")
        if not client_cert:
            return (f"the server at {target} closed the TLS handshake: if it requires client certificates "
                    "(serve --tls-client-ca), pass --client-cert PEM --client-key PEM")
        return (f"the server at {target} refused the TLS handshake: is --client-cert signed by a CA the "
                "server trusts (its --tls-client-ca)?")
    if "resolv" in details.lower():
        return f"the host of {target} does not resolve: check the name, or pass --target HOST:PORT"
    if "refused" in details:
        shown = port or target.rpartition(":")[2]
        shown = shown if shown.isdigit() else "50051"
        return (f"no server is listening at {target}: start one with 'lcmserve serve --model tiny --port {shown}', "
                "or pass --target HOST:PORT")
    return f"no server at {target} answered: is one running there ('lcmserve serve'), and is the address right?"
