"""The engine process's main: load the model, warm up, then turn pipe messages into engine calls.

    main thread      conn.recv(): Submit -> Engine.submit, Cancel -> request.cancelled, Stop -> Engine.stop,
                     LoadAdapter / UnloadAdapter -> Engine.load_adapter / unload_adapter, answered by AdapterReply
    engine thread    the loop (engine.py); at the end of each iteration the Outbox sends one Events
                     message with that iteration's events (each request's in order) and metric updates
    encoder threads  an encoded picture is sent as soon as it is ready (work.OrderedEvents)

The process loads the model, captures CUDA graphs and warms up before it sends Ready; a load
failure is sent as LoadFailed and the process exits. If the loop thread dies it sends LoopDied
and the process exits at once (the edge then fails what was in flight). When the pipe closes (the
edge is gone) it stops, so it never outlives the edge.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable

import grpc

from ..config import EngineConfig
from .loop import Engine, bind_device
from .memory import memory_reporter
from ..logs import LogSettings
from ..logs import setup as setup_logging
from ..placement import CpuSplit, pin_process
from ..protocol import (
    TERMINAL,
    AdapterReply,
    Cancel,
    EngineInfo,
    Event,
    Events,
    Failure,
    FromEngine,
    GenerationParams,
    LoadAdapter,
    LoadFailed,
    LoopDied,
    MetricUpdate,
    Ready,
    RequestTrace,
    Stop,
    Submit,
    Summary,
    UnloadAdapter,
)
from ..model.runtime import Runtime
from ..edge.validation import tokenize
from .work import EngineStopped, OrderedEvents, QueueFull, Request
from ..model.adapters import AdapterError

log = logging.getLogger("lcmserve.engine_main")

_WARM_UP_RID = -1  # rids from the edge count up from 0


class Outbox:
    """Events and metric updates of the engine process waiting to be sent, one message per flush."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the engine and encoder threads put, flush and send
        self._events: list[tuple[int, Event]] = []
        self._metrics: list[MetricUpdate] = []

    def put(self, rid: int, event: Event) -> None:
        with self._lock:
            self._events.append((rid, event))

    def record(self, update: MetricUpdate) -> None:
        with self._lock:
            self._metrics.append(update)

    def flush(self) -> None:
        with self._lock:
            if not self._events and not self._metrics:
                return
            message = Events(tuple(self._events), tuple(self._metrics))
            self._events, self._metrics = [], []
            try:
                self._conn.send(message)
            except (OSError, ValueError, pickle.PicklingError):
                log.exception("could not send %d events to the edge", len(message.events))

    def send(self, message: FromEngine) -> None:
        """A message of its own, in order with the flushes."""
        with self._lock:
            self._conn.send(message)


def engine_main(conn: multiprocessing.connection.Connection, make_runtime: Callable[[], Runtime],
                config: EngineConfig, threads: int | None, log_settings: LogSettings, do_warm_up: bool,
                capture_side: int, split: CpuSplit | None) -> None:
    """`split`: (edge cpus, engine cpus) chosen by the edge for all its engines (placement.py), used
    on a CPU device only; None leaves this process where the OS puts it."""
    # Ctrl-C, `kill -TERM -PGID`, systemd and `docker stop` signal the whole process group: the edge
    # alone decides (it drains, then sends Stop); a signal here would drop in-flight work.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(log_settings, "engine")  # as the edge logs (server/logs.py)
    outbox = Outbox(conn)
    requests: dict[int, Request] = {}  # rid -> request, until its terminal event is handed on
    warm_up_events: queue.Queue[Event] = queue.Queue()
    counting = False  # the warm-up's metrics are not the server's traffic

    def sink(rid: int, event: Event) -> None:
        if rid == _WARM_UP_RID:
            warm_up_events.put(event)
            return
        if isinstance(event, TERMINAL):
            requests.pop(rid, None)
        outbox.put(rid, event)

    def record(update: MetricUpdate) -> None:
        # Requests are counted at the edge, under the status the client saw (metrics.py). The
        # warm-up's measurements are not the server's traffic.
        if counting:
            outbox.record(update)

    try:
        import torch

        from .device import CUDA_TORCH_THREADS
        from .faults import make_engine

        planned = torch.device(name) if (name := _planned_device(make_runtime)) else None
        if planned is not None:  # bound before the model loads: its warm-ups run on it, not on cuda:0
            bind_device(planned)
        if threads:
            torch.set_num_threads(threads)
        elif planned is not None and planned.type == "cuda":
            torch.set_num_threads(CUDA_TORCH_THREADS)  # beside a GPU: a few, not every core
        start = time.perf_counter()
        runtime = make_runtime()
        device = runtime.spec.device
        bind_device(device)
        if device.type != "cpu":
            split = None
        if split is not None:
            pin_process(split[1])
        if not threads and device.type == "cpu":
            # One thread per core of its own: an OpenMP team that shares its cores with another busy
            # thread stalls at every barrier (measured 100x slower steps on 2 cores).
            torch.set_num_threads(len(split[1]) if split else max(1, (os.cpu_count() or 2) - 1))
        elif not threads and device.type == "cuda":
            torch.set_num_threads(CUDA_TORCH_THREADS)
        engine = make_engine(runtime, config, sink, record)  # faults.py: Engine, unless a test asks for faults
        graphs = engine.capture_graphs(capture_side, capture_side)

        def died(exc: BaseException) -> None:  # the loop is gone: say so, and go (nothing here works now)
            try:
                outbox.flush()
                outbox.send(LoopDied(f"{type(exc).__name__}: {exc}"))
            finally:
                os._exit(3)

        engine.on_death = died
        engine.start()
        if do_warm_up:
            warm_up(engine, warm_up_events)
        info = EngineInfo(spec=runtime.spec, tokenizer=runtime.tokenizer, graphs=graphs,
                          load_s=time.perf_counter() - start, threads=torch.get_num_threads(),
                          io_cpus=split[0] if split else (), compute_cpus=split[1] if split else (),
                          jpeg_encoder=engine.jpeg_encoder, backend=engine.backend_state(),
                          adapters=engine.adapters.records() if engine.adapters is not None else ())
        counting = True
        outbox.send(Ready(info))
        memory = memory_reporter(engine.device, outbox.record)  # GPU memory for /metrics; None off CUDA
        if memory is not None:
            memory()

        def after_iteration() -> None:
            if memory is not None:
                memory()
            outbox.flush()

        engine.after_iteration = after_iteration  # from now on the edge's reader takes event lists
    except BaseException as exc:  # noqa: BLE001 - everything goes to the edge, which raises it
        conn.send(LoadFailed(_picklable(exc)))
        return

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the edge is gone: stop, nobody is listening
            engine.stop(10)
            return
        match message:
            case Submit(rid=rid, params=params, deadline=deadline, arrival=arrival, trace=traced):
                request = Request(rid=rid, params=params, events=OrderedEvents(rid, sink, outbox.flush),
                                  deadline=deadline, arrival=arrival,
                                  trace=RequestTrace(device=str(engine.device)) if traced else None)
                requests[rid] = request
                try:
                    engine.submit(request)
                except QueueFull as exc:
                    request.events.put(Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)))
                    outbox.flush()
                except EngineStopped as exc:
                    request.events.put(Failure(grpc.StatusCode.UNAVAILABLE, str(exc)))
                    outbox.flush()
                except AdapterError as exc:  # an adapter not loaded (any more), or no adapters here
                    request.events.put(Failure(grpc.StatusCode[exc.code], f"invalid request: {exc}"))
                    outbox.flush()
            case LoadAdapter(ticket=ticket, name=name, source=source, scale=scale):
                try:  # here, between the loop's iterations or beside them: the slot is one no request uses
                    outbox.send(AdapterReply(ticket, adapter=engine.load_adapter(name, source, scale)))
                except AdapterError as exc:
                    outbox.send(AdapterReply(ticket, failure=Failure(grpc.StatusCode[exc.code], str(exc))))
                except Exception as exc:  # noqa: BLE001 - a bad file must not end the engine process
                    logging.getLogger(__name__).exception("loading adapter %s from %s failed", name, source)
                    outbox.send(AdapterReply(ticket, failure=Failure(
                        grpc.StatusCode.INVALID_ARGUMENT, f"adapter {name}: {type(exc).__name__}: {exc}")))
            case UnloadAdapter(ticket=ticket, name=name):
                try:
                    engine.unload_adapter(name)
                    outbox.send(AdapterReply(ticket))
                except AdapterError as exc:
                    outbox.send(AdapterReply(ticket, failure=Failure(grpc.StatusCode[exc.code], str(exc))))
            case Cancel(rid=rid):
                cancelled = requests.pop(rid, None)
                if cancelled is not None:
                    cancelled.cancelled = True
            case Stop():
                engine.stop(10)
                outbox.flush()
                conn.close()
                return
            case _:
                log.error("unexpected message from the edge: %r", message)


def _planned_device(make_runtime: Callable[[], Runtime]) -> str | None:
    """The device `make_runtime` will load on, known before it loads: the `device` keyword of the
    serve CLI's functools.partial(load_runtime, ...), or the loader's default (cuda when there is
    one); None for any other callable (the device is then bound once the model has loaded)."""
    import functools

    import torch

    if not isinstance(make_runtime, functools.partial):
        return None
    device = make_runtime.keywords.get("device")
    return str(device) if device else "cuda" if torch.cuda.is_available() else "cpu"  # as loader.default_device


def warm_up(engine: Engine, events: queue.Queue[Event]) -> None:
    """One small generation through the whole path (allocator, kernels, CUDA graphs at batch 1)."""
    side = 512 if engine.device.type == "cuda" else 64
    ids, _, _ = tokenize(engine.runtime.tokenizer, "warm-up")
    params = GenerationParams(prompt_ids=ids, negative_ids=ids, num_steps=2, guidance_scale=1.0, seed=0, width=side,
                              height=side, num_images=1, output_format="jpeg", quality=90, preview_mode="approx",
                              include_latents=False)
    engine.submit(Request(rid=_WARM_UP_RID, params=params,
                          events=OrderedEvents(_WARM_UP_RID, engine.sink, None), arrival=time.perf_counter()))
    while True:
        event = events.get(timeout=600)
        if isinstance(event, Failure):
            raise RuntimeError(f"warm-up failed: {event.message}")
        if isinstance(event, Summary):
            return


def _picklable(exc: BaseException) -> BaseException:
    from ..model.loader import LoadError

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ takes other arguments
        return LoadError(f"{type(exc).__name__}: {exc}")
