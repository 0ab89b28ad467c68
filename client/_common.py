"""What Client and AsyncClient share: channel settings, collecting a stream, health names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc

from .errors import ProtocolError
from .types import GenerateEvent, GenerateResult, Image, StepEvent, Summary

DEFAULT_TARGET = "127.0.0.1:50051"

# Reconnect backoff of the channel, in milliseconds. gRPC's defaults (1 s growing 1.6x up to
# 120 s) would let a client that polled a starting server notice it tens of seconds late.
_RECONNECT_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 2000,
}

# grpc.health.v1 ServingStatus numbers -> names.
HEALTH_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def channel_options(max_message_mb: float, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Channel arguments: message limits of ``max_message_mb`` MiB both ways, a short reconnect
    backoff, then ``options`` (which win over these)."""
    if (
        isinstance(max_message_mb, bool)
        or not isinstance(max_message_mb, (int, float))
        or max_message_mb <= 0
    ):
        raise ValueError(f"max_message_mb={max_message_mb!r} must be a number of MiB > 0")
    limit = int(max_message_mb * 1024 * 1024)  # bytes
    merged: dict[str, Any] = {
        "grpc.max_receive_message_length": limit,
        "grpc.max_send_message_length": limit,
        **_RECONNECT_OPTIONS,
    }
    merged.update(dict(options))
    return list(merged.items())


def channel_credentials(
    secure: bool,
    root_certificates: bytes | None,
    credentials: Any | None,
    client_cert: bytes | None = None,
    client_key: bytes | None = None,
) -> Any | None:
    """The grpc.ChannelCredentials to use, or None for a plaintext channel.

    ``credentials`` wins; else TLS when ``secure``, ``root_certificates`` (PEM bytes; None
    means the system's roots) or a client certificate is given. ``client_cert`` and
    ``client_key`` (PEM bytes, both or neither) are presented to a server that requires mTLS.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (PEM bytes of both, or neither)")
    if credentials is not None:
        return credentials
    if secure or root_certificates is not None or client_cert is not None:
        return grpc.ssl_channel_credentials(
            root_certificates=root_certificates, private_key=client_key, certificate_chain=client_cert
        )
    return None


TOKEN_ENV = "LCMSERVE_TOKEN"


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (else $LCMSERVE_TOKEN) as ``authorization: Bearer``.

    Sent as per-call metadata, not call credentials, so that it also works over plaintext (a
    loopback server, or one behind a TLS-terminating proxy); use TLS anywhere else.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None:
        return ()
    token = token.strip()
    if not token or any(ch.isspace() for ch in token):
        raise ValueError("token must be non-empty and contain no whitespace")
    return (("authorization", f"Bearer {token}"),)


def call_timeout(timeout: float | None, default: float | None) -> float | None:
    """The deadline of a call in seconds: its own ``timeout``, else the client's default."""
    return timeout if timeout is not None else default


class ResultCollector:
    """Collects the events of one Generate stream into a GenerateResult."""

    def __init__(self) -> None:
        self.steps: list[StepEvent] = []
        self.images: list[Image] = []
        self.summary: Summary | None = None

    def add(self, event: GenerateEvent) -> None:
        """Adds one event of the stream."""
        if isinstance(event, StepEvent):
            self.steps.append(event)
        elif isinstance(event, Image):
            self.images.append(event)
        else:
            self.summary = event

    def result(self) -> GenerateResult:
        """The result, images ordered by index. Raises ProtocolError when no summary came."""
        if self.summary is None:
            raise ProtocolError("the Generate stream ended without a summary")
        images = sorted(self.images, key=lambda image: image.index)
        return GenerateResult(images=images, summary=self.summary, steps=self.steps)
