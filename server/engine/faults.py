"""Seed-keyed faults for the tests that need a whole server process to fail, off by default.

The product loop (loop.py) has no test hooks. A test that can run the engine in-process injects a
fault where it would happen, e.g. by wrapping `Engine.unet` (tests/engine_fixture.py). A test that
needs a real server to fail (a dying engine process, health turning NOT_SERVING, exit code 3) sets
the documented switch LCMSERVE_FAULT_INJECTION (server/config.py: FaultInjection), and the engine
process then runs `FaultInjectingEngine` instead of `Engine` (`make_engine`, called by main.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..config import EngineConfig, FaultInjection
from ..model.runtime import Runtime
from ..protocol import Event, MetricUpdate
from .loop import Engine


class InjectedLoopDeath(BaseException):
    """Raised by FaultInjection.loop_death_seed; a BaseException so that no handler in the loop keeps it."""


class FaultInjectingEngine(Engine):
    """An Engine that raises the configured faults at admission: `loop_death_seed` when a request of
    that seed waits (the loop dies), the others once a request of that seed is in the batch (inside
    the iteration, as the failure they stand for would be)."""

    def _admit(self, now: float) -> None:
        faults = self.config.faults
        with self._cond:
            waiting = {r.params.seed for r in self._waiting}
        if faults.loop_death_seed is not None and faults.loop_death_seed in waiting:
            raise InjectedLoopDeath(f"injected loop death (seed {faults.loop_death_seed})")
        super()._admit(now)
        seeds = {s.request.params.seed for s in self._active}
        if faults.iteration_fault_seed in seeds:
            raise RuntimeError(f"injected iteration fault (seed {faults.iteration_fault_seed})")
        if faults.iteration_oom_seed in seeds:
            raise torch.OutOfMemoryError(f"injected CUDA out of memory (seed {faults.iteration_oom_seed})")
        if faults.cuda_error_seed in seeds:
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered "
                               f"(injected, seed {faults.cuda_error_seed})")
        if faults.slow_iteration_seed in seeds:
            time.sleep(0.5)


def make_engine(runtime: Runtime, config: EngineConfig, sink: Callable[[int, Event], None],
                record: Callable[[MetricUpdate], None]) -> Engine:
    """The engine process's engine: a FaultInjectingEngine when a fault is configured, else Engine."""
    kind = Engine if config.faults == FaultInjection() else FaultInjectingEngine
    return kind(runtime, config, sink, record)
