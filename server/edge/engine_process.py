"""The edge's handle on the engine process: spawn it, submit requests, read their events back.

Why a process of its own: an eager UNet step is hundreds of small torch calls, each of which lets
go of the GIL and must take it back. With the event loop in the same process, every gRPC message
the loop handles sits between two of those calls; measured with `tiny` at 64x64 on 2 cores, the
UNet of a 12-row batch took 48 ms under 16 concurrent streams against 31 ms alone. vLLM and SGLang
split their API server from their scheduler for the same reason.

    edge process (this module)                        engine process (server/engine/main.py)
      EngineProcess.submit -> Ticket  --Submit-->       Engine.submit
      Ticket.cancel                   --Cancel-->       request.cancelled = True
      EngineProcess.stop              --Stop-->         Engine.stop (what is left fails UNAVAILABLE)
      load_adapter / unload_adapter   --LoadAdapter-->  between iterations: a slot written or released;
        (await the reply)             <--AdapterReply-- answered by ticket (the record, or a Failure)
      reader thread -> Ticket.deliver <--Events--       one message per engine iteration (and per
                                                        encoded picture), each request's events in order
The bridge is only transport: the engine orders each request's events itself. If the engine
process dies, or its loop does (LoopDied), every request in flight fails UNAVAILABLE and
`on_death` turns health NOT_SERVING.

What the engine process runs is given, not imported: an EngineEntry made by the composition root
(server/launch.py) with the model to load bound in. The edge imports neither the engine nor the
model (torch stays out of this process: tests/test_layout.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import grpc

from .. import logs
from ..config import EngineConfig
from ..logs import LogSettings
from ..placement import CpuSplit, cpu_split, pin_process
from ..protocol import (
    TERMINAL,
    AdapterReply,
    BackendState,
    Cancel,
    EngineInfo,
    EngineStopped,
    Event,
    Events,
    Failure,
    GenerationParams,
    LoadAdapter,
    LoadFailed,
    LoopDied,
    Ready,
    Stop,
    Submit,
    ToEngine,
    UnloadAdapter,
)
from .metrics import Metrics

log = logging.getLogger("lcmserve.engine_process")

# The engine process's target, run there after spawn (so it must pickle: a module-level function,
# or a functools.partial of one): (pipe end, config, torch threads or None, how to log, warm up?,
# CUDA graph capture side, CPU split or None). It loads the model, sends Ready or LoadFailed, then
# serves the pipe until Stop or EOF (server/engine/main.py engine_main).
EngineEntry = Callable[[multiprocessing.connection.Connection, EngineConfig, int | None, LogSettings, bool, int,
                        CpuSplit | None], None]


class EngineLoadError(Exception):
    """The engine process could not load the model; the message says why (protocol.LoadFailed)."""


class Ticket:
    """The edge's side of one request: what it asked for, and its events as an async iterator."""

    def __init__(self, rid: int, params: GenerationParams, deadline: float | None, arrival: float,
                 cancel: Callable[[int], None]) -> None:
        self.rid = rid
        self.params = params
        self.deadline = deadline
        self.arrival = arrival  # time.perf_counter() when the edge took it
        self._cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(self, event: Event) -> None:
        """From the reader thread: hand an event to the handler's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop closed under us (shutdown): nobody listens
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The request's events in order, ending after the terminal one (a Summary or a Failure)."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, TERMINAL):
                return

    def cancel(self) -> None:
        """The client went away: its samples leave the batch at the next step."""
        self._cancel(self.rid)


class EngineProcess:
    """Spawns the engine process and carries messages to and from it."""

    def __init__(self, entry: EngineEntry, config: EngineConfig, metrics: Metrics | None = None, *,
                 threads: int | None = None, warm_up: bool = True, capture_side: int = 512,
                 split: CpuSplit | None | Literal["auto"] = "auto", name: str = "lcmserve-engine") -> None:
        """`split`: where the edge and this engine run on a CPU device, (edge cpus, engine cpus);
        "auto": placement.cpu_split (the edge on the first CPU, the engine on the rest); None: the
        OS decides. An EnginePool (pool.py) gives each of its engines its own."""
        self.config = config
        self.metrics = metrics
        self.info: EngineInfo | None = None  # set by start()
        self.backend = BackendState(())  # the latest (GetModelInfo): at Ready, then when it changes
        self.on_death: Callable[[BaseException], None] | None = None
        self.dead: BaseException | None = None
        self._entry = entry
        self._threads = threads
        self._warm_up = warm_up
        self._capture_side = capture_side
        self._split = cpu_split(config.pin_cpus) if split == "auto" else split
        self._name = name
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _tickets and the sending end of the pipe
        self._tickets: dict[int, Ticket] = {}
        self._adapter_calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[AdapterReply]]] = {}
        self._stopping = False
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None

    # ---- start and stop ------------------------------------------------------------------------

    def start(self) -> EngineInfo:
        """Spawn the engine process and block until it has loaded and warmed up the model (or failed
        to: EngineLoadError with its message)."""
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        """Start the engine process (it loads the model from now on); returns at once."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process with gRPC threads (or CUDA)
        parent, child = ctx.Pipe(duplex=True)
        self._conn = parent
        self._process = ctx.Process(target=self._entry, name=self._name,
                                    args=(child, self.config, self._threads,
                                          logs.current(), self._warm_up,
                                          self._capture_side, self._split))
        self._process.start()
        child.close()  # ours: so that the child's exit reads as EOF here

    def wait_ready(self) -> EngineInfo:
        """Block until the spawned engine process is ready (see start)."""
        assert self._conn is not None and self._process is not None, "spawn() first"
        parent = self._conn
        try:
            message = parent.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while loading the model "
                               f"(exit code {self._process.exitcode})") from None
        match message:
            case Ready(info=info):
                self.info = info
                self.backend = info.backend
                if self.metrics is not None:
                    self.metrics.record(info.backend)
            case LoadFailed(message=why):
                self._process.join(10)
                raise EngineLoadError(why)
            case _:
                raise RuntimeError(f"unexpected first message from the engine process: {message!r}")
        if info.io_cpus:  # the edge on the CPU the engine left free
            pin_process(info.io_cpus)
        self._reader = threading.Thread(target=self._read, name="lcmserve-engine-reader", daemon=True)
        self._reader.start()
        return info

    def stop(self, timeout: float | None = None) -> None:
        """Ask the engine to stop (requests still there fail UNAVAILABLE), wait, and make sure it is gone."""
        self._stopping = True
        if self._process is None:
            return
        try:
            self._send(Stop())
        except (OSError, ValueError):
            pass  # already gone
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %s s; killing it", timeout)
            self._process.kill()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(5)
        self._fail_all("the server is shutting down")

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._tickets)

    @property
    def outstanding(self) -> int:
        """Requests submitted whose terminal event has not come back (and not cancelled by the edge)."""
        with self._lock:
            return len(self._tickets)

    @property
    def outstanding_rows(self) -> int:
        """UNet rows of the requests outstanding (samples x rows_per_image each): the load an
        EnginePool balances on."""
        with self._lock:
            return sum(t.params.samples * t.params.rows_per_image for t in self._tickets.values())

    @property
    def pid(self) -> int | None:
        """The engine process's id once spawned (for its process metrics)."""
        return self._process.pid if self._process is not None else None

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, params: GenerationParams, deadline: float | None, trace: bool = False) -> Ticket:
        """Hand a request to the engine (call from the event loop). A full queue comes back as a
        RESOURCE_EXHAUSTED Failure event, one round trip later. `trace`: its Summary brings the
        engine's timestamps (protocol.RequestTrace)."""
        with self._lock:
            if self._stopping or self.dead is not None or self._conn is None:
                raise EngineStopped("the engine is not running")
            ticket = Ticket(next(self._ids), params, deadline, time.perf_counter(), self._cancel)
            try:
                self._conn.send(Submit(ticket.rid, params, deadline, ticket.arrival, trace))
            except OSError as exc:  # the engine just died; the reader is about to say so
                raise EngineStopped(f"the engine process is gone: {exc}") from exc
            self._tickets[ticket.rid] = ticket
            return ticket

    def _cancel(self, rid: int) -> None:
        with self._lock:  # the edge stopped listening: forget it here at once, tell the engine
            if self._tickets.pop(rid, None) is None or self._conn is None:
                return
            try:
                self._conn.send(Cancel(rid))
            except (OSError, ValueError):
                pass  # the engine is gone; the reader fails the request

    # ---- adapters -------------------------------------------------------------------------------

    async def load_adapter(self, name: str, source: str, scale: float) -> AdapterReply:
        """Ask the engine to load a LoRA into a free slot (between its iterations) and wait for its reply:
        the AdapterRecord, or a Failure whose code is the answer (UNAVAILABLE when the engine is gone)."""
        return await self._adapter_call(lambda ticket: LoadAdapter(ticket, name, source, scale))

    async def unload_adapter(self, name: str) -> AdapterReply:
        """Ask the engine to refuse new requests naming `name` and free its slot once unused; wait for its reply."""
        return await self._adapter_call(lambda ticket: UnloadAdapter(ticket, name))

    async def _adapter_call(self, message: Callable[[int], LoadAdapter | UnloadAdapter]) -> AdapterReply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AdapterReply] = loop.create_future()
        with self._lock:
            ticket = next(self._ids)
            if self._stopping or self.dead is not None or self._conn is None:
                return AdapterReply(ticket, failure=Failure(grpc.StatusCode.UNAVAILABLE, "the engine is not running"))
            try:
                self._conn.send(message(ticket))
            except OSError as exc:  # the engine just died
                return AdapterReply(ticket, failure=Failure(grpc.StatusCode.UNAVAILABLE,
                                                            f"the engine process is gone: {exc}"))
            self._adapter_calls[ticket] = (loop, future)
        return await future

    def _adapter_reply(self, reply: AdapterReply) -> None:
        """From the reader thread: resolve the waiting call of that ticket."""
        with self._lock:
            waiting = self._adapter_calls.pop(reply.ticket, None)
        if waiting is None:
            log.error("an adapter reply nobody waits for: %r", reply)
            return
        loop, future = waiting

        def resolve() -> None:
            if not future.done():
                future.set_result(reply)
        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the event loop closed under us (shutdown)
            pass

    def _send(self, message: ToEngine) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.send(message)

    # ---- messages from the engine --------------------------------------------------------------

    def _read(self) -> None:
        assert self._conn is not None
        reason = None
        while reason is None:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: a bug, but the others go on
                log.exception("dropping a message from the engine process")
                continue
            match message:
                case Events(events=events, metrics=updates):
                    if self.metrics is not None:
                        for update in updates:
                            self.metrics.record(update)
                    for update in updates:
                        if isinstance(update, BackendState):  # the latest, for GetModelInfo
                            self.backend = update
                    for rid, event in events:
                        with self._lock:
                            ticket = self._tickets.get(rid)
                            if ticket is not None and isinstance(event, TERMINAL):
                                del self._tickets[rid]
                        if ticket is not None:  # (None: cancelled already)
                            ticket.deliver(event)
                case AdapterReply():
                    self._adapter_reply(message)
                case LoopDied(reason=why):
                    reason = f"the engine loop died ({why})"
                case _:
                    log.error("unexpected message from the engine process: %r", message)
        if self._stopping:  # (stop() reaps the process: one thread may wait for it)
            return
        if self._process is not None:
            self._process.join(5)
        if reason is None:
            reason = f"the engine process exited unexpectedly (exit code {getattr(self._process, 'exitcode', None)})"
        self.dead = RuntimeError(reason)
        log.critical("%s", reason)
        self._fail_all(f"{reason}; the server is not serving")
        if self.on_death is not None:
            self.on_death(self.dead)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            left = list(self._tickets.values())
            self._tickets.clear()
            calls = list(self._adapter_calls)
        for ticket in left:
            ticket.deliver(Failure(grpc.StatusCode.UNAVAILABLE, message))
        for call in calls:  # adapter calls waiting for a reply that will not come
            self._adapter_reply(AdapterReply(call, failure=Failure(grpc.StatusCode.UNAVAILABLE, message)))
