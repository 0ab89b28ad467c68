"""The edge's transport-neutral half of a call: what the gRPC servicer (service.py) and an HTTP
handler both call. No transport here; no model work either.

    EdgeCore.generate(request, deadline)
        readiness -> init/mask images decoded and resized (a worker thread) -> validate (prompts
        tokenized) -> submit to the engine pool -> Ticket -> the engine's events, in order.
        Yields StepEvent..., ImageEvent..., Summary (its total_ms filled in here); raises Refused
        before the first event or instead of the next one. When the caller stops listening (it
        closes the generator: the client went away or its deadline passed) the request is cancelled:
        its samples leave the batch at the next step.
        Counts the call once, under the Status its client saw; counts it in flight between submit
        and its end; observes time to the first step, images, and time to the summary.
    EdgeCore.model()          what GetModelInfo reports, or Refused while loading or dead
    EdgeCore.count(status)    a call the transport refused itself (bytes that do not decode, a
                              missing token): counted like the others

Requests arrive as the proto's GenerateRequest: the schema, whatever carried it (gRPC parses it from
bytes, an HTTP handler would from JSON). Refusals leave as status.Refusal, for each transport to render.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from lcmserve.v1 import generation_pb2 as pb

from ..config import EngineConfig, Limits
from ..protocol import (
    AdapterRecord,
    BackendState,
    EngineInfo,
    EngineStopped,
    Failure,
    ImageEvent,
    StepEvent,
    Summary,
)
from .adapters import AdapterRegistry
from .images import prepare_images
from .metrics import Metrics
from .observe import Observed, refused_access
from .pool import EnginePool
from .status import Refusal, Refused, Status
from .tracing import CallInfo, Tracer
from .validation import InvalidRequest, adapters_off_reason, validate

log = logging.getLogger("lcmserve.edge")

RETRY_AFTER_S = 0.1  # the hint a RESOURCE_EXHAUSTED answer carries (queue full, out of memory)

Response = StepEvent | ImageEvent | Summary  # what a Generate call streams


@dataclass(frozen=True)
class ServedModel:
    """What GetModelInfo reports: the model every engine serves, and the server's limits."""

    info: EngineInfo  # the first engine's (they all load the same model)
    devices: tuple[str, ...]  # every engine's, in --devices order
    limits: Limits
    engine: EngineConfig
    version: str
    backend: BackendState  # the first engine's latest (CUDA graphs, eager fallbacks)
    adapters: tuple[AdapterRecord, ...] = ()  # per-request adapters loaded now, by name


@dataclass
class EdgeCore:
    """The server's state as calls see it (app.py sets engine, serving and draining); see the module doc."""

    limits: Limits
    version: str
    metrics: Metrics | None = None
    engine: EnginePool | None = None  # set once every engine is ready (one per device)
    serving: bool = False
    draining: bool = False
    inflight: int = 0  # Generate calls between submit and their end
    tracer: Tracer | None = None  # OpenTelemetry, when configured (tracing.py; app.py sets it)
    adapters: AdapterRegistry | None = None  # per-request adapters requests may name (app.py sets it)

    # ---- readiness ------------------------------------------------------------------------------

    def not_serving(self) -> Refusal | None:
        """Why Generate must answer UNAVAILABLE now, or None when it may take the request."""
        engine = self.engine
        if engine is not None and engine.dead is not None:
            return Refusal(Status.UNAVAILABLE, f"the server is not serving: {engine.dead}")
        if engine is not None and engine.info is not None and self.serving:
            return None
        if self.draining:
            return Refusal(Status.UNAVAILABLE, "the server is draining")
        return Refusal(Status.UNAVAILABLE, "the model is still loading")

    def model(self) -> ServedModel:
        """The served model once loaded (while draining too); Refused UNAVAILABLE before, or once dead."""
        engine = self.engine
        if engine is not None and engine.dead is not None:  # a dead engine answers nothing as if healthy
            raise Refused(Refusal(Status.UNAVAILABLE, f"the server is not serving: {engine.dead}"))
        if engine is None or engine.info is None:
            raise Refused(Refusal(Status.UNAVAILABLE, "the model is still loading"))
        return ServedModel(engine.info, tuple(engine.devices), self.limits, engine.config, self.version,
                           engine.engines[0].backend, self.adapters.records() if self.adapters else ())

    # ---- one Generate call ----------------------------------------------------------------------

    def count(self, status: Status, transport: str = "grpc", call: CallInfo | None = None) -> None:
        """One Generate call ended with `status` (exactly once per call: metrics.py's contract);
        `transport`: "grpc" or "http", the front door it came in by (metrics.TRANSPORTS). `call`: a
        call its transport refused itself gets its access log line here (generate() logs its own)."""
        if self.metrics is not None:
            self.metrics.request_done(status, transport)
        if call is not None:
            refused_access(transport, call, status)

    async def generate(self, request: pb.GenerateRequest, deadline: float | None,
                       transport: str = "grpc", call: CallInfo | None = None) -> AsyncGenerator[Response, None]:
        """See the module doc. `deadline`: time.monotonic() past which the client no longer waits;
        `transport`: the label the call is counted under (count's); `call`: its method, peer and
        headers, for its access log line and trace span (observe.py)."""
        status = Status.UNKNOWN
        observed = Observed(self.tracer, call, transport, request)
        try:
            async with contextlib.aclosing(self._generate(request, deadline, observed)) as events:
                async for event in events:  # (closed at once on every way out: its finally cancels)
                    observed.saw(event)
                    yield event
            status = Status.OK
        except Refused as exc:
            status = exc.refusal.status
            observed.message = exc.refusal.message
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away, or its deadline passed
            expired = deadline is not None and deadline - time.monotonic() <= 0.001
            status = Status.DEADLINE_EXCEEDED if expired else Status.CANCELLED
            raise  # (re-raise: a handler that swallows its cancellation leaks, grpc/grpc#43360)
        except Exception:
            log.exception("Generate failed")
            raise
        finally:
            self.count(status, transport)
            observed.end(status)

    async def _generate(self, request: pb.GenerateRequest, deadline: float | None,
                        observed: Observed) -> AsyncGenerator[Response, None]:
        refusal = self.not_serving()
        if refusal is not None or self.engine is None or self.engine.info is None:
            raise Refused(refusal or Refusal(Status.UNAVAILABLE, "the model is still loading"))
        engine, info = self.engine, self.engine.info
        # Init/mask images decode and resize in a worker thread, never on this loop (tokenizing stays
        # here: a fast tokenizer is not safe to call from several threads at once).
        images = (await asyncio.to_thread(prepare_images, request, self.limits)
                  if request.init_image or request.mask_image else None)
        try:
            params = validate(request, info.tokenizer, self.limits, images=images, decoders=info.model.decoders,
                              default_decoder=info.model.default_decoder,
                              adapters=self.adapters.scales() if self.adapters else None,
                              max_adapters_per_request=engine.config.adapters.max_adapters_per_request,
                              adapters_off=adapters_off_reason(info.model),
                              has_scorer=info.model.scorer is not None)
        except InvalidRequest as exc:
            raise Refused(Refusal(Status.INVALID_ARGUMENT, f"invalid request: {exc}",
                                  violations=tuple(exc.violations))) from None
        observed.validated(params, info.model.backend)
        try:
            ticket = engine.submit(params, deadline, trace=observed.traced)
        except EngineStopped:
            raise Refused(Refusal(Status.UNAVAILABLE, "the engine is not running")) from None

        self.inflight += 1
        ended = False  # the engine has ended the request: nothing to cancel
        first_step = True
        try:
            async for event in ticket.events():  # in order, pictures encoded
                match event:
                    case Failure(code=code, message=message):
                        ended = True
                        raise Refused(failure_refusal(Status.named(code.name), message))
                    case StepEvent():
                        if first_step and self.metrics:
                            self.metrics.first_step.observe(time.perf_counter() - ticket.arrival)
                        first_step = False
                        yield event
                    case ImageEvent():
                        if self.metrics:
                            self.metrics.images.inc()
                        yield event
                    case Summary():
                        ended = True
                        total = time.perf_counter() - ticket.arrival
                        observed.engine(ticket.arrival, event.trace)
                        if self.metrics:
                            self.metrics.request_time.observe(total)
                            self.metrics.adapter_requests(name for name, _ in params.adapters)
                        yield dataclasses.replace(event, timings=dataclasses.replace(event.timings,
                                                                                     total_ms=total * 1e3))
        finally:
            self.inflight -= 1
            if not ended:
                ticket.cancel()  # its samples leave the batch at the next step


def failure_refusal(status: Status, message: str) -> Refusal:
    """The engine's Failure as the client gets it: RESOURCE_EXHAUSTED (queue full, out of memory)
    says so and carries a retry hint; the others pass as they are."""
    if status is Status.RESOURCE_EXHAUSTED:
        return Refusal(status, f"server overloaded: {message}; retry after {RETRY_AFTER_S:g} s",
                       retry_after_s=RETRY_AFTER_S)
    return Refusal(status, message)
