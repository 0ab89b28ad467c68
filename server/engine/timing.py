"""Timing model calls without making the host wait for the device.

On CUDA a `torch.cuda.synchronize()` after each UNet call would serialize the host's work for the
next call with the GPU's work on this one. Instead each call is bracketed by two CUDA events and
read back once the GPU has passed the second one (polled each iteration, or waited for before a
request's summary, when the decode has synchronized anyway). Off CUDA calls are synchronous:
wall time is the time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, cast

import torch

Finished = tuple[float, int, set[Any]]  # (seconds, rows, what to charge the time to)


class DeviceTimer:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._pending: list[tuple[Any, Any, int, set[Any]]] = []  # (start event | t0, end event | t1, ...)

    @contextlib.contextmanager
    def measure(self, rows: int, owners: set[Any]) -> Iterator[None]:
        """Time the enclosed device work (`rows` of a batch, charged to `owners`)."""
        if self._cuda:
            event = cast(Any, torch.cuda.Event)  # untyped constructor in torch's stubs
            start, end = event(enable_timing=True), event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end, rows, owners))
        else:
            t0 = time.perf_counter()
            yield
            self._pending.append((t0, time.perf_counter(), rows, owners))

    def finished(self, wait: bool = False) -> list[Finished]:
        """The calls the device has completed, oldest first (all of them when `wait`), and forget them."""
        done: list[Finished] = []
        while self._pending:
            start, end, rows, owners = self._pending[0]
            if self._cuda:
                if not wait and not end.query():
                    break
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3  # elapsed_time is in ms
            else:
                seconds = end - start
            self._pending.pop(0)
            done.append((seconds, rows, owners))
        return done
