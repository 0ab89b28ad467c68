"""What the edge records of one Generate call besides metrics: its log context, its access log line,
and its trace span when tracing is on (tracing.py). The core (core.py) makes one `Observed` per call,
whatever the transport, and ends it once with the status its client saw."""

from __future__ import annotations

import contextvars
import os
import time

from lcmserve.v1 import generation_pb2 as pb

from .. import logs
from ..protocol import GenerationParams, ImageEvent, RequestTrace, Summary
from .status import Status
from .tracing import CallInfo, ServerSpan, Tracer


def refused_access(transport: str, call: CallInfo, status: Status) -> None:
    """The access log line of a call its transport refused before the core saw a request (bytes that
    do not decode, a body that is not a request)."""
    logs.access(transport, call.method, call.peer, status.name, None, 0, 0.0)


class Observed:
    """One call: `request_id` (16 hex digits, in its log lines), its span when traced (`traced`)."""

    def __init__(self, tracer: Tracer | None, call: CallInfo | None, transport: str, request: pb.GenerateRequest) -> None:
        self.start = time.perf_counter()
        self.call = call or CallInfo(method="Generate")
        self.transport = transport
        self.prompt = request.prompt
        self.seed: int | None = request.seed if request.HasField("seed") else None
        self.images = 0
        self.message = ""
        self._engine: tuple[float, RequestTrace] | None = None  # its spans are made at the end
        self.span: ServerSpan | None = tracer.start(self.call, transport) if tracer is not None else None
        self.request_id = os.urandom(8).hex()
        self.context = logs.RequestContext(self.request_id, self.span.trace_id if self.span else None,
                                           self.span.span_id if self.span else None)
        self._token: contextvars.Token[logs.RequestContext | None] | None = logs.REQUEST.set(self.context)

    @property
    def traced(self) -> bool:
        """Its span records (tracing on, sampled): the engine sends its timestamps for the children."""
        return self.span is not None and self.span.recording

    def validated(self, params: GenerationParams, backend: str) -> None:
        self.seed = params.seed
        if self.span is not None:
            self.span.request(params, backend)

    def saw(self, event: object) -> None:
        if isinstance(event, ImageEvent):
            self.images += 1
        elif isinstance(event, Summary):
            self.seed = event.seed

    def engine(self, arrival: float, trace: RequestTrace | None) -> None:
        """The engine's timestamps (its Summary's); recorded as spans in end(), after the summary left."""
        if self.span is not None and self.span.recording and trace is not None:
            self._engine = (arrival, trace)

    def end(self, status: Status) -> None:
        """Once, with the status the client saw: the access line, then the span ends."""
        logs.access(self.transport, self.call.method, self.call.peer, status.name, self.seed, self.images,
                    (time.perf_counter() - self.start) * 1e3, self.prompt, self.context)
        if self.span is not None:
            if self._engine is not None:
                self.span.engine(*self._engine)
            self.span.end(status.name, self.message)
        if self._token is not None:
            try:
                logs.REQUEST.reset(self._token)
            except ValueError:  # ended from another context (a generator closed elsewhere)
                logs.REQUEST.set(None)
            self._token = None
