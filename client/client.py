"""Client: the synchronous lcmserve SDK over one grpc.Channel (see aio.py for AsyncClient).

    with Client("127.0.0.1:50051") as client:
        client.wait_until_ready()
        result = client.generate("a photo of a cracked concrete wall", seed=7)
        result.images[0].save("wall.jpg")

Every call takes ``timeout`` (seconds, the gRPC deadline of the whole call; None: the client's
default, itself None = no deadline). Every gRPC failure is raised as an ``LcmServeError``.

A target may name several servers (``ipv4:10.0.0.1:50051,10.0.0.2:50051``,
``dns:///lcmserve-headless.ns.svc.cluster.local:50051``): calls are spread over the SERVING ones by
gRPC's round_robin, and ``generate`` retries UNAVAILABLE and RESOURCE_EXHAUSTED with the same seed,
so a request that a dying or full server refused gives the same images elsewhere (retry.py).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Generator, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._common import (
    DEFAULT_TARGET,
    HEALTH_STATUS_NAMES,
    ResultCollector,
    auth_metadata,
    call_timeout,
    channel_credentials,
    channel_options,
)
from ._convert import (
    adapter_info_from_proto,
    adapter_list_from_proto,
    build_generate_request,
    event_from_proto,
    load_adapter_request,
    model_info_from_proto,
)
from ._tracing import with_trace_context
from .errors import DeadlineExceededError, LcmServeError, ProtocolError, UnavailableError, from_rpc_error
from .options import GenerateFields, GenerateOptions
from .retry import Attempts, RetryPolicy, balancing_options, pick_seed
from .types import AdapterInfo, AdapterList, GenerateEvent, GenerateResult, ModelInfo, Summary
from .v1 import generation_pb2 as pb
from .v1 import generation_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

_READY_POLL_S = 0.2  # seconds between health checks in wait_until_ready


class Client:
    """Synchronous client of an lcmserve server. One Client may be shared by many threads (its
    channel multiplexes their calls over one connection).

    Args:
        target: any gRPC target: ``host:port``, or several servers to balance over,
            ``ipv4:a:p1,b:p2,...`` or ``dns:///name:port`` (round_robin over the SERVING ones).
        secure: use TLS (with the system's root certificates unless ``root_certificates``).
        root_certificates: PEM bytes of the roots to trust; implies TLS.
        client_cert: PEM bytes of a client certificate chain, for a server that requires mTLS
            (with ``client_key``); implies TLS.
        client_key: PEM bytes of the private key of ``client_cert``.
        token: bearer token sent with every call (``authorization: Bearer <token>``); None
            reads ``$LCMSERVE_TOKEN`` (unset: no token).
        credentials: channel credentials to use as they are (wins over ``secure`` and the
            certificate arguments).
        timeout: default deadline of every call, in seconds; None = no deadline.
        max_message_mb: largest message sent or received, in MiB (a RAW 1024x1024 image is 3 MiB).
        options: extra gRPC channel arguments, ``(name, value)`` pairs; they win over ours.
        retries: how many times ``generate`` (and ``stream``, before its first event) retries
            UNAVAILABLE and RESOURCE_EXHAUSTED, with backoff, inside the call's deadline; 0: never.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        secure: bool = False,
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        max_message_mb: float = 64,
        options: Sequence[tuple[str, Any]] = (),
        retries: int = 3,
    ) -> None:
        self.target = target
        self.timeout = timeout  # seconds
        self.retry_policy = RetryPolicy(retries=retries)
        self._rng = random.Random()
        channel_args = channel_options(max_message_mb, [*balancing_options(target), *options])
        creds = channel_credentials(secure, root_certificates, credentials, client_cert, client_key)
        self._auth = auth_metadata(token)  # on every call (health included: harmless, and proxies may want it)
        if creds is None:
            self._channel = grpc.insecure_channel(target, options=channel_args)
        else:
            self._channel = grpc.secure_channel(target, creds, options=channel_args)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._adapters = generation_pb2_grpc.AdapterServiceStub(self._channel)
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
        quality 90), but for the seed: without one the SDK picks a random 31-bit seed, so that a
        retry reproduces the images. See ``stream`` for the events.

        A try that fails UNAVAILABLE or RESOURCE_EXHAUSTED (with a RetryInfo) is retried up to
        ``retries`` times, even after events came (the result is collected whole), with the same
        seed, inside ``timeout``.
        """
        request = self._request(prompt, options, fields)
        attempts = Attempts(self.retry_policy, call_timeout(timeout, self.timeout), request.seed, self._rng)
        while True:
            collector = ResultCollector()
            try:
                for event in self._stream(request, attempts.timeout()):
                    collector.add(event)
                return collector.result()
            except LcmServeError as exc:
                wait = attempts.wait_s(exc)
                if wait is None:
                    raise
            time.sleep(wait)

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

        Retries (``retries``, as ``generate``) happen only before the first event: once events
        were yielded, a failure is raised (a retry would repeat them). Without a seed the SDK
        picks one, as ``generate``.
        """
        request = self._request(prompt, options, fields)
        return self._retried_stream(request, call_timeout(timeout, self.timeout))

    def _request(self, prompt: str, options: GenerateOptions | None, fields: GenerateFields) -> pb.GenerateRequest:
        request = build_generate_request(prompt, options, **fields)
        self._check_open()
        if not request.HasField("seed"):
            request.seed = pick_seed()  # fixed before the first try: every try gives the same images
        return request

    def _retried_stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[GenerateEvent]:
        attempts = Attempts(self.retry_policy, timeout, request.seed, self._rng)
        while True:
            started = False
            try:
                with contextlib.closing(self._stream(request, attempts.timeout())) as events:  # closed: cancelled
                    for event in events:
                        started = True
                        yield event
                return
            except LcmServeError as exc:
                wait = None if started else attempts.wait_s(exc)
                if wait is None:
                    raise
            time.sleep(wait)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Generator[GenerateEvent, None, None]:
        call = self._generation.Generate(request, timeout=timeout, metadata=self._metadata)
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
                pb.GetModelInfoRequest(), timeout=call_timeout(timeout, self.timeout), metadata=self._metadata
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
                health_pb2.HealthCheckRequest(service=""),
                timeout=call_timeout(timeout, self.timeout),
                metadata=self._metadata,
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

    # ---- per-request adapters (AdapterService) ---------------------------------------------

    def list_adapters(self, timeout: float | None = None) -> AdapterList:
        """The adapters loaded now, the free slots, and whether this server loads and unloads them
        (``serve --allow-adapter-loading``)."""
        self._check_open()
        try:
            response = self._adapters.ListAdapters(
                pb.ListAdaptersRequest(), timeout=call_timeout(timeout, self.timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return adapter_list_from_proto(response)

    def load_adapter(
        self, name: str, source: str, scale: float | None = None, *, timeout: float | None = None
    ) -> AdapterInfo:
        """Loads a LoRA file on the server (``source``: a .safetensors file or folder on the server's disk,
        or a hub id) as adapter ``name``, with ``scale`` the default of requests that name it without one
        (None: 1.0). Needs ``serve --allow-adapter-loading`` (else FailedPreconditionError). Errors:
        InvalidArgumentError (unreadable, no LoRA keys, another base, rank over the limit, bad name),
        AlreadyExistsError (name taken), ResourceExhaustedError (no free slot)."""
        request = load_adapter_request(name, source, scale)
        self._check_open()
        try:
            response = self._adapters.LoadAdapter(
                request, timeout=call_timeout(timeout, self.timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return adapter_info_from_proto(response.adapter)

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """Unloads adapter ``name``: requests already admitted finish with it, new ones naming it are
        refused (InvalidArgumentError). NotFoundError for a name not loaded."""
        self._check_open()
        try:
            self._adapters.UnloadAdapter(
                pb.UnloadAdapterRequest(name=name), timeout=call_timeout(timeout, self.timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # ---- lifetime --------------------------------------------------------------------------

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """Every call's metadata: the token, and the caller's OpenTelemetry trace context if any."""
        return with_trace_context(self._auth)

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
