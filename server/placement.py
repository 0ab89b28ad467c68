"""Where the two processes run on a CPU-only machine (Linux CPU affinity).

The engine process gets all CPUs but the first, the gRPC edge the first one. Left to the scheduler,
the edge or a load generator often ran on the engine's core: pinned, 64x64 at concurrency 16 went
from 53-61 to 69-81 images/s on 2 cores (docs/benchmarks.md). The encoders and the pipe thread stay
with the engine: a GIL handed over on one core is cheap, one handed to a thread on another core
waits for it to be scheduled (measured: no gain).
"""

from __future__ import annotations

import os


def cpu_split(enabled: bool) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(edge cpus, engine cpus) out of the CPUs this process may use; None when pinning is off or
    impossible (fewer than 2 CPUs, or no sched_getaffinity)."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
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


def describe(cpus: tuple[int, ...]) -> str:
    """"0" or "1,2,3" or "1-15 (15)" for logs."""
    return ",".join(map(str, cpus)) if len(cpus) < 4 else f"{cpus[0]}-{cpus[-1]} ({len(cpus)})"
