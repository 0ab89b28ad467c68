"""EnginePool: one engine process per device behind the one gRPC edge (`serve --devices ...`).

    edge (service.py) --submit--> EnginePool --> the engine with the fewest outstanding rows
                                      |-- EngineProcess (cuda:0)   each its own process, model copy,
                                      |-- EngineProcess (cuda:1)   CUDA graphs and engine loop
                                      '-- ...

The pool has the surface the edge uses of one EngineProcess (start, stop, submit -> Ticket, busy,
outstanding, dead, info, on_death, config), so ServingState holds a pool of one for `--device`.
Rules:
- submit picks the engine with the fewest outstanding UNet rows (samples x rows_per_image of its
  unfinished tickets: a guided image weighs two); ties go round the engines in turn, so a lone
  client at concurrency 1 still uses them all.
- start() returns once every engine is ready (health turns SERVING only then); if one fails to
  load, the others are stopped and its error is raised.
- adapters (LoadAdapter/UnloadAdapter) go to every engine, all or none: an adapter one engine
  refuses is unloaded from those that loaded it, so any engine serves any request.
- one engine dying makes the pool dead: `on_death` is called once, the server turns NOT_SERVING and
  exits (app.py). No half-dead server: its clients retry elsewhere and get the same images.
Every engine serves the same model, and a sample's output does not depend on its batch, so the
engine a request lands on does not change its images (on identical devices).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..config import EngineConfig
from ..placement import engine_splits
from ..protocol import AdapterReply, EngineInfo, EngineStopped, GenerationParams
from .engine_process import EngineEntry, EngineProcess, Ticket
from .metrics import Metrics

log = logging.getLogger("lcmserve.pool")


@dataclass(frozen=True)
class EngineSlot:
    """One engine to start: its device as the user named it ("cuda:1", "cpu"; None: the loader's
    default) and what its process runs, the model to load there bound in (server/launch.py)."""

    device: str | None
    entry: EngineEntry


class EnginePool:
    """The engine processes of one server; see the module docstring."""

    def __init__(self, slots: Sequence[EngineSlot], config: EngineConfig, metrics: Metrics | None = None, *,
                 threads: int | None = None) -> None:
        if not slots:
            raise ValueError("an EnginePool needs at least one engine")
        self.config = config
        self.info: EngineInfo | None = None  # the first engine's, once every engine is ready
        self.infos: list[EngineInfo] = []
        self.on_death: Callable[[BaseException], None] | None = None
        self.dead: BaseException | None = None
        self._lock = threading.Lock()  # guards dead and the choice of an engine
        self._turn = 0  # where the next tie-break starts
        n = len(slots)
        # CPU engines each on their own cores; a CUDA engine ignores its split (engine_main).
        splits = engine_splits(config.pin_cpus, n)
        if splits is None and n > 1 and threads is None:
            threads = max(1, (os.cpu_count() or 2) // n)  # unpinned: share the cores, not oversubscribe
        self.engines = [
            EngineProcess(slot.entry, config, metrics, threads=threads,
                          split=splits[i] if splits is not None else None,
                          name="lcmserve-engine" if n == 1 else f"lcmserve-engine-{i}")
            for i, slot in enumerate(slots)]
        self._slots = tuple(slots)
        for index, engine in enumerate(self.engines):
            engine.on_death = self._died_callback(index)

    # ---- start and stop ------------------------------------------------------------------------

    def start(self) -> EngineInfo:
        """Start every engine process at once and block until all are ready (they load in parallel).
        Raises the first failure, after stopping the engines that did start. The processes are
        spawned one after the other, in --devices order (so their process ids are in that order)."""
        if len(self.engines) == 1:
            self.infos = [self.engines[0].start()]
        else:
            try:
                for engine in self.engines:
                    engine.spawn()
            except BaseException:
                self.stop(10.0)
                raise
            with ThreadPoolExecutor(len(self.engines), thread_name_prefix="lcmserve-engine-start") as starter:
                futures = [starter.submit(engine.wait_ready) for engine in self.engines]
                errors = [f.exception() for f in futures]
            failed = next((e for e in errors if e is not None), None)
            if failed is not None:
                self.stop(10.0)
                raise failed
            self.infos = [f.result() for f in futures]
        self.info = self.infos[0]
        for index, info in enumerate(self.infos):
            log.info("engine %d ready on %s in %.1f s (%d torch threads%s)", index, info.model.device, info.load_s,
                     info.threads, f", CPUs {','.join(map(str, info.compute_cpus))}" if info.compute_cpus else "")
        return self.info

    def stop(self, timeout: float | None = None) -> None:
        """Stop every engine (each in its own thread: the timeouts overlap)."""
        if len(self.engines) == 1:
            self.engines[0].stop(timeout)
            return
        threads = [threading.Thread(target=engine.stop, args=(timeout,), name=f"lcmserve-engine-stop-{i}")
                   for i, engine in enumerate(self.engines)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    @property
    def devices(self) -> list[str]:
        """The device of each engine, in --devices order (as its runtime reports it once ready)."""
        if self.infos:
            return [info.model.device for info in self.infos]
        return [slot.device or "default" for slot in self._slots]

    @property
    def busy(self) -> bool:
        return any(engine.busy for engine in self.engines)

    @property
    def outstanding(self) -> int:
        """Requests submitted to any engine whose terminal event has not come back."""
        return sum(engine.outstanding for engine in self.engines)

    @property
    def processes(self) -> list[tuple[str, int | None]]:
        """(device, process id) of each engine, in --devices order (for their process metrics)."""
        return list(zip(self.devices, (engine.pid for engine in self.engines)))

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, params: GenerationParams, deadline: float | None, trace: bool = False) -> Ticket:
        """Hand a request to the engine with the fewest outstanding rows (call from the event loop)."""
        with self._lock:
            if self.dead is not None:
                raise EngineStopped(f"the engine pool is not running: {self.dead}")
            n = len(self.engines)
            start, self._turn = self._turn, (self._turn + 1) % n
            loads = [(self.engines[i].outstanding_rows, (i - start) % n, i) for i in range(n)]
        rows, _, index = min(loads)
        ticket = self.engines[index].submit(params, deadline, trace)
        if n > 1 and log.isEnabledFor(logging.DEBUG):
            log.debug("request %d (%d rows) -> engine %d (%s), which had %d rows outstanding", ticket.rid,
                      params.samples * params.rows_per_image, index, self.devices[index], rows)
        return ticket

    # ---- adapters (every engine holds the same ones) ---------------------------------------------

    async def load_adapter(self, name: str, source: str, scale: float) -> AdapterReply:
        """Load a LoRA on every engine at once and wait for all. All or none: when one engine refuses
        (or is gone), the adapter is unloaded again from those that loaded it, and the first refusal
        is the answer; otherwise the first engine's record."""
        replies = await asyncio.gather(*(engine.load_adapter(name, source, scale) for engine in self.engines))
        failed = next((reply for reply in replies if reply.failure is not None), None)
        if failed is None:
            return replies[0]
        loaded = [engine for engine, reply in zip(self.engines, replies) if reply.failure is None]
        if loaded:
            log.warning("adapter %r: engine(s) %s loaded it but another refused (%s); unloading it there", name,
                        ", ".join(str(self.engines.index(e)) for e in loaded), failed.failure)
            await asyncio.gather(*(engine.unload_adapter(name) for engine in loaded))
        return failed

    async def unload_adapter(self, name: str) -> AdapterReply:
        """Unload an adapter from every engine; the first refusal, if any, is the answer."""
        replies = await asyncio.gather(*(engine.unload_adapter(name) for engine in self.engines))
        return next((reply for reply in replies if reply.failure is not None), replies[0])

    # ---- death ---------------------------------------------------------------------------------

    def _died_callback(self, index: int) -> Callable[[BaseException], None]:
        def died(exc: BaseException) -> None:  # (that engine's reader thread)
            with self._lock:
                if self.dead is not None:  # another engine died first: said already
                    return
                dead = exc if len(self.engines) == 1 else RuntimeError(
                    f"engine {index} ({self.devices[index]}) died: {exc}")
                self.dead = dead
            if self.on_death is not None:
                self.on_death(dead)
        return died
