"""AsyncClient: the asyncio lcmserve SDK over one grpc.aio channel, mirror image of Client.

    async with AsyncClient("127.0.0.1:50051") as client:
        await client.wait_until_ready()
        async for event in client.stream("a cracked concrete wall", preview_mode="approx"):
            ...

The channel is opened at the first call, inside the running event loop (a grpc.aio channel is
bound to the loop it was made in), so an AsyncClient may be built anywhere. Targets, balancing
and retries as Client's (retry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, Sequence
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


class AsyncClient:
    """asyncio client of an lcmserve server; the same arguments and methods as Client.

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
        self._channel_args = channel_options(max_message_mb, [*balancing_options(target), *options])
        self._credentials = channel_credentials(secure, root_certificates, credentials, client_cert, client_key)
        self._auth = auth_metadata(token)  # on every call
        self._channel: grpc.aio.Channel | None = None
        self._generation: Any = None  # GenerationServiceStub of the open channel
        self._health: Any = None  # HealthStub of the open channel
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"

    # ---- generation -----------------------------------------------------------------------

    async def generate(
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
                async with contextlib.aclosing(self._stream(request, attempts.timeout())) as events:
                    async for event in events:
                        collector.add(event)
                return collector.result()
            except LcmServeError as exc:
                wait = attempts.wait_s(exc)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    def stream(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **fields: Unpack[GenerateFields],
    ) -> AsyncGenerator[GenerateEvent, None]:
        """Generates images for ``prompt``; use as ``async for event in client.stream(...)``.
        Yields a StepEvent per step of each image, then an Image per image, then one Summary.

        Arguments are checked now (TypeError/ValueError); the call starts at the first
        iteration. Leaving early (break, exception, task cancelled) cancels the call on the
        server once the iterator is closed: at once with ``contextlib.aclosing``, else when
        the event loop finalizes it.

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

    async def _retried_stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[GenerateEvent, None]:
        attempts = Attempts(self.retry_policy, timeout, request.seed, self._rng)
        while True:
            started = False
            try:
                async with contextlib.aclosing(self._stream(request, attempts.timeout())) as events:
                    async for event in events:  # (closed on every way out: its finally cancels the call)
                        started = True
                        yield event
                return
            except LcmServeError as exc:
                wait = None if started else attempts.wait_s(exc)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[GenerateEvent, None]:
        call = self._stubs()[0].Generate(request, timeout=timeout, metadata=self._metadata)
        summary_seen = False
        try:
            async for response in call:
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

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        """Describes the served model: base, fused LoRAs, dtype, device, backend, limits."""
        generation, _ = self._stubs()
        try:
            response = await generation.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=call_timeout(timeout, self.timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return model_info_from_proto(response)

    async def health_status(self, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status for service "" (the whole server): "SERVING",
        "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN". Raises LcmServeError when the check fails
        (UnavailableError: not reachable)."""
        _, health = self._stubs()
        try:
            response = await health.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=call_timeout(timeout, self.timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return HEALTH_STATUS_NAMES.get(response.status, "UNKNOWN")

    async def health(self, timeout: float | None = None) -> bool:
        """True when the server is SERVING; False when it answers otherwise, cannot be reached,
        or does not answer in time. Other failures (e.g. no health service) raise."""
        try:
            return await self.health_status(timeout) == "SERVING"
        except (UnavailableError, DeadlineExceededError):
            return False

    async def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Polls health until the server is SERVING. Raises DeadlineExceededError after
        ``timeout`` seconds, saying what the last check saw."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no check finished"
        while True:
            remaining = deadline - loop.time()  # seconds
            if remaining <= 0:
                message = f"server at {self.target} not SERVING after {timeout:g} s (last check: {last})"
                raise DeadlineExceededError(f"DEADLINE_EXCEEDED: {message}", details=message)
            try:
                status = await self.health_status(timeout=min(remaining, 2.0))
            except (UnavailableError, DeadlineExceededError) as exc:
                last = str(exc)
            else:
                if status == "SERVING":
                    return
                last = status
            await asyncio.sleep(max(0.0, min(_READY_POLL_S, deadline - loop.time())))

    # ---- per-request adapters (AdapterService) ---------------------------------------------

    async def list_adapters(self, timeout: float | None = None) -> AdapterList:
        """The adapters loaded now, the free slots, and whether this server loads and unloads them."""
        stub = self._adapter_stub()
        try:
            response = await stub.ListAdapters(
                pb.ListAdaptersRequest(), timeout=call_timeout(timeout, self.timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return adapter_list_from_proto(response)

    async def load_adapter(
        self, name: str, source: str, scale: float | None = None, *, timeout: float | None = None
    ) -> AdapterInfo:
        """Loads a LoRA file on the server as adapter ``name`` (see Client.load_adapter)."""
        request = load_adapter_request(name, source, scale)
        stub = self._adapter_stub()
        try:
            response = await stub.LoadAdapter(
                request, timeout=call_timeout(timeout, self.timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return adapter_info_from_proto(response.adapter)

    async def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """Unloads adapter ``name`` (see Client.unload_adapter)."""
        stub = self._adapter_stub()
        try:
            await stub.UnloadAdapter(
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

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Safe to call twice."""
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _stubs(self) -> tuple[Any, Any]:
        """(generation stub, health stub), opening the channel in the running loop at first use."""
        self._check_open()
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._channel_args)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._channel_args
                )
            self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        return self._generation, self._health

    def _adapter_stub(self) -> Any:
        """The AdapterService stub of the open channel (opened as _stubs does)."""
        self._stubs()
        return generation_pb2_grpc.AdapterServiceStub(self._channel)
