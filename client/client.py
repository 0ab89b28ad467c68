"""Client: the synchronous lcmserve SDK over one grpc.Channel (see aio.py for AsyncClient).

    with Client("127.0.0.1:50051") as client:
        client.wait_until_ready()
        result = client.generate("a photo of a cracked concrete wall", seed=7)
        result.images[0].save("wall.jpg")

Every call takes ``timeout`` (seconds, the gRPC deadline of the whole call; None: the client's
default, itself None = no deadline). Every gRPC failure is raised as an ``LcmServeError``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._common import (
    DEFAULT_TARGET,
    HEALTH_STATUS_NAMES,
    ResultCollector,
    call_timeout,
    channel_credentials,
    channel_options,
)
from ._convert import build_generate_request, event_from_proto, model_info_from_proto
from .errors import DeadlineExceededError, ProtocolError, UnavailableError, from_rpc_error
from .options import GenerateFields, GenerateOptions
from .types import GenerateEvent, GenerateResult, ModelInfo, Summary
from .v1 import generation_pb2 as pb
from .v1 import generation_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

_READY_POLL_S = 0.2  # seconds between health checks in wait_until_ready


class Client:
    """Synchronous client of an lcmserve server. One Client may be shared by many threads (its
    channel multiplexes their calls over one connection).

    Args:
        target: ``host:port`` of the server (any gRPC target string).
        secure: use TLS (with the system's root certificates unless ``root_certificates``).
        root_certificates: PEM bytes of the roots to trust; implies TLS.
        credentials: channel credentials to use as they are (wins over ``secure``).
        timeout: default deadline of every call, in seconds; None = no deadline.
        max_message_mb: largest message sent or received, in MiB (a RAW 1024x1024 image is 3 MiB).
        options: extra gRPC channel arguments, ``(name, value)`` pairs; they win over ours.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        secure: bool = False,
        root_certificates: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        max_message_mb: float = 64,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout  # seconds
        channel_args = channel_options(max_message_mb, options)
        creds = channel_credentials(secure, root_certificates, credentials)
        if creds is None:
            self._channel = grpc.insecure_channel(target, options=channel_args)
        else:
            self._channel = grpc.secure_channel(target, creds, options=channel_args)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = False

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    # ---- generation -----------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **fields: Unpack[GenerateFields],
    ) -> GenerateResult:
        """Generates images for ``prompt`` and returns them with the summary and step events.

        ``options`` (a GenerateOptions) with ``fields`` changed, e.g. ``seed=7, width=64``; those
        left None take the server's defaults (4 steps, guidance 1.0, 512x512, one image, JPEG
        quality 90, a seed chosen by the server). See ``stream`` for the events.
        """
        collector = ResultCollector()
        for event in self.stream(prompt, options, timeout=timeout, **fields):
            collector.add(event)
        return collector.result()

    def stream(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **fields: Unpack[GenerateFields],
    ) -> Iterator[GenerateEvent]:
        """Generates images for ``prompt``, yielding events as the server sends them: a
        StepEvent per step of each image, then an Image per image, then one Summary.

        Arguments are checked now (TypeError/ValueError); the call starts at the first
        ``next()``. Leaving the loop early (break, exception, ``close()``) cancels the call on
        the server, so its batch slots are freed.
        """
        request = build_generate_request(prompt, options, **fields)
        self._check_open()
        return self._stream(request, call_timeout(timeout, self.timeout))

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[GenerateEvent]:
        call = self._generation.Generate(request, timeout=timeout)
        summary_seen = False
        try:
            for response in call:
                event = event_from_proto(response)
                summary_seen = summary_seen or isinstance(event, Summary)
                yield event
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            # Since grpcio 1.83 a call dropped without cancel() is never cancelled on the server
            # (grpc/grpc#43462): cancel on every way out. A finished call ignores it.
            call.cancel()
        if not summary_seen:
            raise ProtocolError("the Generate stream ended without a summary")

    # ---- model and health ------------------------------------------------------------------

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        """Describes the served model: base, fused LoRAs, dtype, device, backend, limits."""
        self._check_open()
        try:
            response = self._generation.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=call_timeout(timeout, self.timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return model_info_from_proto(response)

    def health_status(self, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status for service "" (the whole server): "SERVING",
        "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN". Raises LcmServeError when the check fails
        (UnavailableError: not reachable)."""
        self._check_open()
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=call_timeout(timeout, self.timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return HEALTH_STATUS_NAMES.get(response.status, "UNKNOWN")

    def health(self, timeout: float | None = None) -> bool:
        """True when the server is SERVING; False when it answers otherwise, cannot be reached,
        or does not answer in time. Other failures (e.g. no health service) raise."""
        try:
            return self.health_status(timeout) == "SERVING"
        except (UnavailableError, DeadlineExceededError):
            return False

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Polls health until the server is SERVING. Raises DeadlineExceededError after
        ``timeout`` seconds, saying what the last check saw."""
        deadline = time.monotonic() + timeout
        last = "no check finished"
        while True:
            remaining = deadline - time.monotonic()  # seconds
            if remaining <= 0:
                message = f"server at {self.target} not SERVING after {timeout:g} s (last check: {last})"
                raise DeadlineExceededError(f"DEADLINE_EXCEEDED: {message}", details=message)
            try:
                status = self.health_status(timeout=min(remaining, 2.0))
            except (UnavailableError, DeadlineExceededError) as exc:
                last = str(exc)
            else:
                if status == "SERVING":
                    return
                last = status
            time.sleep(max(0.0, min(_READY_POLL_S, deadline - time.monotonic())))

    # ---- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
