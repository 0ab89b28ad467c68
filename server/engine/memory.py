"""GPU memory of a CUDA engine for /metrics: allocated, reserved (the caching allocator's) and peak
allocated bytes of its device, sent as a DeviceMemory update at most once a second, after an
iteration (reading the allocator's counters does not wait for the GPU). Nothing off CUDA."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..protocol import DeviceMemory, MetricUpdate

INTERVAL_S = 1.0


def memory_reporter(device: torch.device, record: Callable[[MetricUpdate], None]) -> Callable[[], None] | None:
    """A function to call after each iteration that records the device's memory now and then; None off CUDA."""
    if device.type != "cuda":
        return None
    last = 0.0

    def report() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < INTERVAL_S:
            return
        last = now
        record(DeviceMemory(str(device), torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device),
                            torch.cuda.max_memory_allocated(device)))

    return report
