"""Per-request LoRA adapters at the edge (issue 21): which adapters requests may name.

    AdapterRegistry   the adapters loaded now (name -> AdapterRecord), as every engine holds them: filled
                      from the engines' Ready (serve --adapter), changed by load and unload. Generate's
                      validation (validation.py) checks GenerateRequest.adapters against `scales()`.
        load          the edge's checks (name, source, scale, a name taken or being loaded, no slot left),
                      then every engine loads it, all or none (pool.py); the name becomes usable only
                      once all have: a Submit naming it always follows the LoadAdapter on each pipe.
        unload        the name leaves the registry at once, before UnloadAdapter is sent: a request
                      validated before it was submitted before it (so it finishes with the adapter), and
                      one validated after is refused here (INVALID_ARGUMENT listing the loaded names).
                      The engines free the slot once no admitted request uses it.
    AdapterService    the gRPC servicer over it: adapter_service.py.

A load or unload the client stops waiting for (its deadline, a cancel) still finishes, so that the
edge never disagrees with the engines about what they hold. Each ends counted once in /metrics
(`lcmserve_adapter_loads` / `lcmserve_adapter_unloads` by status).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import ADAPTER_NAME, MAX_ADAPTER_SCALE, AdapterConfig
from ..protocol import AdapterRecord, AdapterReply
from .metrics import Metrics
from .pool import EnginePool
from .status import Refusal, Refused, Status

log = logging.getLogger("lcmserve.adapters")

MAX_SOURCE_CHARS = 4096  # a path or hub id


def _invalid(field_name: str, description: str) -> Refused:
    return Refused(Refusal(Status.INVALID_ARGUMENT, f"invalid request: {field_name}: {description}",
                           violations=((field_name, description),)))


@dataclass
class AdapterRegistry:
    """The adapters requests may name now; see the module doc. Used from the event loop only."""

    config: AdapterConfig = field(default_factory=AdapterConfig)
    metrics: Metrics | None = None
    _records: dict[str, AdapterRecord] = field(default_factory=dict)
    _loading: set[str] = field(default_factory=set)  # names being loaded: taken, not yet usable
    _unloading: set[str] = field(default_factory=set)  # names being unloaded: not usable, not yet free

    def started(self, records: Sequence[AdapterRecord]) -> None:
        """The adapters the engines loaded at start (serve --adapter; the first engine's Ready)."""
        self._records = {record.name: record for record in records}
        if self.metrics is not None:
            self.metrics.adapter_loads.labels(status=Status.OK.name).inc(len(records))
            self.metrics.adapters_loaded.set(len(self._records))

    def records(self) -> tuple[AdapterRecord, ...]:
        """The loaded adapters, by name."""
        return tuple(self._records[name] for name in sorted(self._records))

    def scales(self) -> dict[str, float]:
        """Default scale by name of every adapter a request may name now."""
        return {name: record.default_scale for name, record in self._records.items()}

    @property
    def free_slots(self) -> int:
        """Slots neither loaded nor being loaded or unloaded (as far as the edge knows)."""
        used = len(self._records) + len(self._loading) + len(self._unloading)
        return max(self.config.max_adapters - used, 0)

    # ---- load and unload (every engine of the pool) ------------------------------------------------

    async def load(self, pool: EnginePool, name: str, source: str, scale: float | None) -> AdapterRecord:
        """Load `source` as adapter `name` on every engine; Refused with the status and reason otherwise."""
        status = Status.UNKNOWN
        try:
            record = await self._load(pool, name, source, scale)
            status = Status.OK
            return record
        except Refused as exc:
            status = exc.refusal.status
            raise
        finally:
            if self.metrics is not None:
                self.metrics.adapter_loads.labels(status=status.name).inc()

    async def _load(self, pool: EnginePool, name: str, source: str, scale: float | None) -> AdapterRecord:
        if not ADAPTER_NAME.fullmatch(name):
            raise _invalid("name", f"is {name!r}; a name is 1 to 64 of A-Z a-z 0-9 . _ -")
        if not source.strip() or len(source) > MAX_SOURCE_CHARS:
            raise _invalid("source", f"is {'empty' if not source.strip() else f'{len(source)} characters'}; give a "
                                     f".safetensors file, a folder holding one, or a hub id (at most "
                                     f"{MAX_SOURCE_CHARS} characters)")
        scale = 1.0 if scale is None else scale
        if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
            raise _invalid("scale", f"is {scale:g}; the range is -{MAX_ADAPTER_SCALE:g} to {MAX_ADAPTER_SCALE:g}")
        if name in self._records or name in self._loading:
            raise Refused(Refusal(Status.ALREADY_EXISTS, f"an adapter named {name!r} is "
                                  f"{'loaded' if name in self._records else 'being loaded'}; unload it first or "
                                  "choose another name"))
        if name in self._unloading:
            raise Refused(Refusal(Status.ALREADY_EXISTS, f"the adapter {name!r} is being unloaded; load it again "
                                  "once that is done (ListAdapters no longer lists it)"))
        if self.free_slots == 0:
            raise Refused(Refusal(Status.RESOURCE_EXHAUSTED, f"no free adapter slot: all {self.config.max_adapters} "
                                  f"are in use (loaded: {', '.join(sorted(self._records)) or 'none'}); unload one, "
                                  "or restart the server with a larger --max-adapters"))
        self._loading.add(name)
        try:
            reply = await pool.load_adapter(name, source.strip(), scale)
        finally:
            self._loading.discard(name)
        record = _answer(reply)
        if record is None:
            raise Refused(Refusal(Status.INTERNAL, f"the engine loaded {name!r} but sent back no record"))
        self._records[name] = record
        if self.metrics is not None:
            self.metrics.adapters_loaded.set(len(self._records))
        log.info("adapter %r loaded from %s (rank %d, %s, default scale %g)", name, record.source, record.rank,
                 "+".join(record.targets), record.default_scale)
        return record

    async def unload(self, pool: EnginePool, name: str) -> None:
        """Unload adapter `name` from every engine; Refused NOT_FOUND when no adapter has that name."""
        status = Status.UNKNOWN
        try:
            await self._unload(pool, name)
            status = Status.OK
        except Refused as exc:
            status = exc.refusal.status
            raise
        finally:
            if self.metrics is not None:
                self.metrics.adapter_unloads.labels(status=status.name).inc()

    async def _unload(self, pool: EnginePool, name: str) -> None:
        if name not in self._records:
            doing = (" (it is being loaded)" if name in self._loading else
                     " (it is being unloaded)" if name in self._unloading else "")
            raise Refused(Refusal(Status.NOT_FOUND, f"no adapter named {name!r} is loaded{doing}; loaded: "
                                  f"{', '.join(sorted(self._records)) or 'none'}"))
        # Gone for new requests now, before any engine hears of it (see the module doc).
        del self._records[name]
        self._unloading.add(name)
        if self.metrics is not None:
            self.metrics.adapters_loaded.set(len(self._records))
            self.metrics.adapter_unloaded(name)
        try:
            _answer(await pool.unload_adapter(name))
        finally:
            self._unloading.discard(name)
        log.info("adapter %r unloaded", name)


def _answer(reply: AdapterReply) -> AdapterRecord | None:
    """The engines' reply: the record, or Refused with the status the engine chose and its reason."""
    if reply.failure is not None:
        status = Status.named(reply.failure.code.name)
        violations: tuple[tuple[str, str], ...] = ()
        if status is Status.INVALID_ARGUMENT:
            violations = (("source", reply.failure.message),)
        raise Refused(Refusal(status, reply.failure.message, violations=violations))
    return reply.adapter
