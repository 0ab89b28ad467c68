"""Where the two processes run on a CPU-only machine (Linux CPU affinity).

The engine process gets all CPUs but the first, the gRPC edge the first one. Left to the scheduler,
the edge or a load generator often ran on the engine's core: pinned, 64x64 at concurrency 16 went
from 53-61 to 69-81 images/s on 2 cores (docs/benchmarks.md). The encoders and the pipe thread stay
with the engine: a GIL handed over on one core is cheap, one handed to a thread on another core
waits for it to be scheduled (measured: no gain).

Several CPU engines (`--devices cpu,cpu`): each gets a run of CPUs of its own (engine_splits), and
the edge keeps the first CPU only when there are more CPUs than engines.
"""

from __future__ import annotations

import os

CpuSplit = tuple[tuple[int, ...], tuple[int, ...]]  # (edge cpus, engine cpus); () for the edge: anywhere


def cpu_split(enabled: bool) -> CpuSplit | None:
    """(edge cpus, engine cpus) out of the CPUs this process may use; None when pinning is off or
    impossible (fewer than 2 CPUs, or no sched_getaffinity)."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return (cpus[0],), tuple(cpus[1:])


def engine_splits(enabled: bool, engines: int) -> list[CpuSplit] | None:
    """(edge cpus, engine cpus) for each of `engines` CPU engine processes (`--devices cpu,cpu`):
    the edge keeps the first CPU only when every engine still gets one of its own; the others are
    dealt out in contiguous runs (CPU i to engine i * engines // n, so runs differ by at most one).

    With 2 CPUs and 2 engines: each engine one CPU, the edge unpinned (it shares them). None when
    pinning is off or impossible: fewer CPUs than engines (the OS places them) or no sched_getaffinity.
    One engine: the same as cpu_split.
    """
    if engines == 1:
        split = cpu_split(enabled)
        return [split] if split is not None else None
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < engines:
        return None
    edge: tuple[int, ...] = (cpus[0],) if len(cpus) > engines else ()
    rest = cpus[len(edge):]
    runs = [tuple(cpu for i, cpu in enumerate(rest) if i * engines // len(rest) == e) for e in range(engines)]
    return [(edge, run) for run in runs]


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
