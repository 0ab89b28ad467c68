"""The engine in a process of its own, so that the gRPC edge and the model loop never share a GIL.

Why: an eager UNet step is hundreds of small torch calls, each of which lets go of the GIL and must
take it back. With the event loop in the same process, every gRPC message the loop handles sits
between two of those calls; measured with `tiny` at 64x64 on 2 cores, the UNet of a 12-row batch
took 48 ms under 16 concurrent streams against 31 ms alone. vLLM and SGLang split their API server
from their scheduler for the same reason.

    edge process (app.py, service.py)             engine process (_child_main)
      EngineProcess.submit  --("submit", rid, params)-->  receiver thread -> Engine.submit
      Request.cancel        --("cancel", rid)-------->    Request.cancel
      EngineProcess.stop    --("stop",)-------------->    Engine.stop (what is left fails UNAVAILABLE)
      reader thread  <--[(rid, event) | (None, (metric, args)), ...]--  one message per engine
        request.sink(event)                                                iteration, and one per
                                                                           encoded picture
Each request's events leave the child in the order the engine made them: an event waits for the
pictures before it to be encoded (_Forward), so the edge passes them on as they come.
The child loads the model, captures CUDA graphs and warms up before it says ("ready", RuntimeInfo).
Engine-side metrics are relayed (MetricsRelay) into the edge's registry, so /metrics is one page.
If the child dies, every request in flight fails UNAVAILABLE and `on_death` turns health NOT_SERVING.
The child exits when its pipe closes, so it never outlives the edge.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import Engine, EngineConfig
from .runtime import ModelSpec, Runtime
from .validation import tokenize
from .work import EngineStopped, Failure, GenerationParams, QueueFull, Request, SummaryOut

log = logging.getLogger("lcmserve.engine_process")

_TERMINAL = (SummaryOut, Failure)


@dataclass(frozen=True)
class RuntimeInfo:
    """What the edge needs of the runtime: the spec (model info) and the tokenizer (validation)."""

    spec: ModelSpec
    tokenizer: Any


class EngineProcess:
    """The edge's handle on an Engine running in a child process; the surface the edge uses of Engine."""

    def __init__(self, make_runtime: Callable[[], Runtime], config: EngineConfig, metrics: Any = None, *,
                 threads: int | None = None, warm_up: bool = True, capture_side: int = 512) -> None:
        self.config = config
        self.metrics = metrics
        self.runtime: RuntimeInfo | None = None  # set by start()
        self.on_death: Callable[[BaseException], None] | None = None
        self.dead: BaseException | None = None
        self.ready_info: dict[str, Any] = {}
        self._make_runtime = make_runtime
        self._threads = threads
        self._warm_up = warm_up
        self._capture_side = capture_side
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _requests and the sending end of the pipe
        self._requests: dict[int, Request] = {}
        self._stopping = False
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None

    # ---- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the child and block until it has loaded and warmed up the model (or failed to:
        the child's exception is raised here, e.g. LoadError with its message)."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process with gRPC threads (or CUDA)
        parent, child = ctx.Pipe(duplex=True)
        self._conn = parent
        self._process = ctx.Process(target=_child_main, name="lcmserve-engine",
                                    args=(child, self._make_runtime, self.config, self._threads,
                                          logging.getLogger().getEffectiveLevel(), self._warm_up,
                                          self._capture_side))
        self._process.start()
        child.close()  # ours: so that the child's exit reads as EOF here
        try:
            message = parent.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while loading the model "
                               f"(exit code {self._process.exitcode})") from None
        if message[0] == "error":
            self._process.join(10)
            raise message[1]
        _, self.runtime, self.ready_info = message
        if self.ready_info.get("io_cpus"):  # the edge on the CPU the engine left free
            pin_process(self.ready_info["io_cpus"])
        self._reader = threading.Thread(target=self._read, name="lcmserve-engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the child to stop (requests still there fail UNAVAILABLE), wait, and make sure it is gone."""
        self._stopping = True
        if self._process is None:
            return
        try:
            self._send(("stop",))
        except (OSError, ValueError):
            pass  # already gone
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %s s; killing it", timeout)
            self._process.kill()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(5)
        self._fail_all("UNAVAILABLE", "the server is shutting down")

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._requests)

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Hand a request to the child. A full queue comes back as a Failure("RESOURCE_EXHAUSTED")
        event, one round trip later, and not as QueueFull here."""
        with self._lock:
            if self._stopping or self.dead is not None or self._conn is None:
                raise EngineStopped("the engine is not running")
            rid = next(self._ids)
            try:
                self._conn.send(("submit", rid, request.params, request.deadline, request.arrival))
            except OSError as exc:  # the child just died; the reader is about to say so
                raise EngineStopped(f"the engine process is gone: {exc}") from exc
            self._requests[rid] = request
            request.on_cancel = lambda: self._cancel(rid)

    def _cancel(self, rid: int) -> None:
        with self._lock:  # the edge stopped listening: forget it here at once, tell the child
            if self._requests.pop(rid, None) is None or self._conn is None:
                return
            try:
                self._conn.send(("cancel", rid))
            except (OSError, ValueError):
                pass  # the child is gone; the reader fails the request

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.send(message)

    # ---- events from the child -----------------------------------------------------------------

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                batch = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an event that does not unpickle: a bug, but the others go on
                log.exception("dropping a message from the engine process")
                continue
            for rid, value in batch:
                if rid is None:
                    if self.metrics is not None:
                        name, args = value
                        getattr(self.metrics, name)(*args)
                    continue
                with self._lock:
                    request = self._requests.get(rid)
                if request is None:
                    continue  # finished or cancelled already
                try:
                    request.sink(value)
                except RuntimeError:  # the edge's event loop closed under us (shutdown): nobody listens
                    value = Failure("UNAVAILABLE", "the server is shutting down")
                if isinstance(value, _TERMINAL):
                    with self._lock:
                        self._requests.pop(rid, None)
        if not self._stopping:  # (when stopping, stop() reaps the child: one thread may wait for it)
            exitcode = None
            if self._process is not None:
                self._process.join(5)
                exitcode = self._process.exitcode
            self.dead = RuntimeError(f"the engine process exited unexpectedly (exit code {exitcode})")
            log.critical("%s", self.dead)
            self._fail_all("UNAVAILABLE", f"{self.dead}; the server is not serving")
            if self.on_death is not None:
                self.on_death(self.dead)

    def _fail_all(self, code: str, message: str) -> None:
        with self._lock:
            left = list(self._requests.values())
            self._requests.clear()
        for request in left:
            request.sink(Failure(code, message))


# ---- the child -------------------------------------------------------------------------------------


class MetricsRelay:
    """The engine's metrics calls, queued to travel with its events to the edge's registry."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name not in ("queued", "admitted", "unet_step", "vae", "request_done"):
            raise AttributeError(name)
        return lambda *args: self._outbox.put(None, (name, args))


class _Outbox:
    """Events of the engine process waiting to be sent, as one message per flush."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._items: list[tuple[int | None, Any]] = []

    def put(self, rid: int | None, value: Any) -> None:
        with self._lock:
            self._items.append((rid, value))

    def flush(self) -> None:
        with self._lock:
            if not self._items:
                return
            items, self._items = self._items, []
            try:
                self._conn.send(items)
            except (OSError, ValueError, pickle.PicklingError):
                log.exception("could not send %d events to the edge", len(items))

    def send(self, message: Any) -> None:
        """A message of its own (not an event list), in order with the flushes."""
        with self._lock:
            self._conn.send(message)


def _child_main(conn: multiprocessing.connection.Connection, make_runtime: Callable[[], Runtime],
                config: EngineConfig, threads: int | None, log_level: int, do_warm_up: bool, capture_side: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the edge drains
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    outbox = _Outbox(conn)
    try:
        import time

        import torch

        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        runtime = make_runtime()
        split = cpu_split(config) if runtime.spec.device.type == "cpu" else None
        if split is not None:
            # This process gets all CPUs but the first, the edge process the first one. Left to the
            # scheduler, the edge or a load generator often ran on the engine's core: pinned, 64x64
            # at concurrency 16 went from 53-61 to 69-81 images/s on 2 cores (docs/benchmarks.md).
            # The encoders and the pipe thread stay here: a GIL handed over on one core is cheap, one
            # handed to a thread on another core waits for it to be scheduled (measured: no gain).
            pin_process(split[1])
        if not threads and runtime.spec.device.type == "cpu":
            # One thread per core of its own: an OpenMP team that shares its cores with another busy
            # thread stalls at every barrier (measured 100x slower steps on 2 cores).
            torch.set_num_threads(len(split[1]) if split else max(1, (os.cpu_count() or 2) - 1))
        engine = Engine(runtime, config, MetricsRelay(outbox))
        graphs = engine.capture_graphs(capture_side, capture_side)
        engine.start()
        if do_warm_up:
            warm_up(engine)
        info = {"graphs": graphs, "load_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
                "io_cpus": split[0] if split else (), "compute_cpus": split[1] if split else ()}
        outbox.send(("ready", RuntimeInfo(runtime.spec, runtime.tokenizer), info))
        engine.after_iteration = outbox.flush  # from now on the edge's reader takes event lists
        outbox.flush()  # the warm-up's metrics
    except BaseException as exc:  # noqa: BLE001 - everything goes to the edge, which raises it
        conn.send(("error", _picklable(exc)))
        return

    requests: dict[int, Request] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the edge is gone: stop, nobody is listening
            engine.stop(10)
            return
        kind = message[0]
        if kind == "submit":
            _, rid, params, deadline, arrival = message
            request = Request(params=params, sink=_Forward(outbox, rid, requests), deadline=deadline, arrival=arrival)
            requests[rid] = request
            try:
                engine.submit(request)
            except QueueFull as exc:
                request.sink(Failure("RESOURCE_EXHAUSTED", str(exc)))
                outbox.flush()
            except EngineStopped as exc:
                request.sink(Failure("UNAVAILABLE", str(exc)))
                outbox.flush()
        elif kind == "cancel":
            request = requests.pop(message[1], None)
            if request is not None:
                request.cancel()
        elif kind == "stop":
            engine.stop(10)
            outbox.flush()
            conn.close()
            return


def cpu_split(config: EngineConfig) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(edge cpus, engine cpus) out of the CPUs this process may use: the first one for the gRPC
    edge, the rest for the engine process; None when pinning is off or impossible."""
    if not config.pin_cpus or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return (cpus[0],), tuple(cpus[1:])


def pin_process(cpus: tuple[int, ...]) -> None:
    """Every thread of this process, and those it starts later, on `cpus` only (Linux)."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:  # a thread that just ended
            pass


def _picklable(exc: BaseException) -> BaseException:
    from .loader import LoadError

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ takes other arguments
        return LoadError(f"{type(exc).__name__}: {exc}")


def warm_up(engine: Engine) -> None:
    """One small generation through the whole path (allocator, kernels, CUDA graphs at batch 1)."""
    side = 512 if engine.device.type == "cuda" else 64
    ids, _, _ = tokenize(engine.runtime.tokenizer, "warm-up")
    params = GenerationParams(prompt_ids=ids, negative_ids=ids, num_steps=2, guidance_scale=1.0, seed=0, width=side,
                              height=side, num_images=1, output_format="jpeg", quality=90, preview_mode="approx",
                              include_latents=False)
    events: queue.Queue[object] = queue.Queue()
    engine.submit(Request(params=params, sink=events.put))
    while True:
        item = events.get(timeout=600)
        if isinstance(item, concurrent.futures.Future):
            item = item.result()
        if isinstance(item, Failure):
            raise RuntimeError(f"warm-up failed: {item.message}")
        if isinstance(item, SummaryOut):
            return


class _Forward:
    """The engine's sink of one request: its events go to the outbox in the order the engine made
    them; one behind a picture still being encoded waits for it, so that a summary leaves with the
    encoders' times in it."""

    def __init__(self, outbox: _Outbox, rid: int, requests: dict[int, Request]) -> None:
        self._outbox = outbox
        self._rid = rid
        self._requests = requests
        self._lock = threading.Lock()  # the engine thread and the encoders both call in
        self._queue: collections.deque[Any] = collections.deque()

    def __call__(self, item: Any) -> None:
        with self._lock:
            self._queue.append(item)
        if isinstance(item, concurrent.futures.Future):
            item.add_done_callback(self._encoded)  # (at once, here, if it is done already)
        else:
            self._send_ready()

    def _encoded(self, _: concurrent.futures.Future[Any]) -> None:
        self._send_ready()
        self._outbox.flush()  # a picture goes when it is ready, not at the end of an iteration

    def _send_ready(self) -> None:
        with self._lock:
            while self._queue and not (isinstance(self._queue[0], concurrent.futures.Future)
                                       and not self._queue[0].done()):
                item = self._queue.popleft()
                if isinstance(item, concurrent.futures.Future):
                    try:
                        item = item.result()
                    except Exception as exc:  # noqa: BLE001 - the request fails; the server goes on
                        log.exception("encoding failed")
                        item = Failure("INTERNAL", f"encoding the image failed: {exc}")
                if isinstance(item, _TERMINAL):
                    self._requests.pop(self._rid, None)
                self._outbox.put(self._rid, _portable(item))


def _portable(item: Any) -> Any:
    """Latents travel as numpy arrays (bytes in the pickle), not as handles to torch shared memory,
    which torch registers for tensors sent between processes."""
    latents = getattr(item, "latents", None)
    if latents is not None and not isinstance(latents, np.ndarray):
        return dataclasses.replace(item, latents=latents.float().contiguous().numpy())
    return item
