"""Issue 18 item 1, measured: how often does the engine loop wait for the GPU? (a part of gpu_probe.py)

Real engine iterations (server/engine/loop.py `Engine`, in this process: its constructor, `submit`,
`start`, `stop` and the `after_iteration` hook, nothing private) run a fixed workload twice: once
to warm up (allocator, cuDNN, the CUDA graphs of the buckets it uses), then under
`torch.cuda.set_sync_debug_mode("warn")`, which makes torch warn at every operation that makes the
host wait for the device. `SyncCounter` counts those warnings by thread and by source line, and
each iteration's share is read at the end of the iteration. Target: syncs only in the iterations
that decode (the copies of decoded pixels to the host).

The workload (every request submitted before the loop starts, so both runs batch alike):
6 plain text-to-image requests of 4 steps (JPEG, the server's default), 2 guided ones (guidance 2,
a negative prompt: two rows each), 2 of 2 steps as RAW (they decode half-way): 12 UNet rows.
"""

from __future__ import annotations

import collections
import pathlib
import threading
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"
PROMPT = "a single split crack on a concrete wall"
LOOP_THREAD = "lcmserve-engine"  # the name Engine.start gives its thread


class SyncCounter:
    """While active, counts torch's sync warnings (any thread) by thread name and by `file:line`;
    other warnings pass through as before. `cuda=False` leaves the debug mode alone (tests on a CPU
    count warnings they raise themselves)."""

    def __init__(self, cuda: bool = True) -> None:
        self.cuda = cuda
        self.by_thread: collections.Counter[str] = collections.Counter()
        self.by_line: collections.Counter[tuple[str, str]] = collections.Counter()  # (thread, file:line)
        self._lock = threading.Lock()
        self._saved = warnings.catch_warnings()
        self._show: Any = None

    def count(self, thread: str | None = None) -> int:
        with self._lock:
            return self.by_thread[thread] if thread else sum(self.by_thread.values())

    def where(self, thread: str, others: bool = False, top: int = 8) -> str:
        """"loop.py:412 x4, ..." for `thread`; with `others`, "name file:line xN" for the other threads."""
        with self._lock:
            lines = [((f"{name} " if others else "") + spot, n) for (name, spot), n in self.by_line.most_common()
                     if (name != thread) == others]
        return ", ".join(f"{line} x{n}" for line, n in lines[:top]) or "none"

    def _record(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                file: TextIO | None = None, line: str | None = None) -> None:
        if SYNC_WARNING not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        where = f"{pathlib.Path(filename).parent.name}/{pathlib.Path(filename).name}:{lineno}"
        thread = threading.current_thread().name
        with self._lock:
            self.by_thread[thread] += 1
            self.by_line[thread, where] += 1

    def __enter__(self) -> SyncCounter:
        self._saved.__enter__()  # the warnings filters and showwarning, restored on exit
        warnings.simplefilter("always")  # every occurrence, not once per line
        self._show = warnings.showwarning
        warnings.showwarning = self._record
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._saved.__exit__(kind, exc, tb)


def eager_runtime(pipe: Any, base: str) -> Any:
    """The server's eager runtime around an already loaded pipeline (no second copy of the model)."""
    from lcmserve.server.model.loader import runtime_from_pipeline

    return runtime_from_pipeline(pipe, base)


def workload(tokenizer: Any, side: int) -> list[Any]:
    """The GenerationParams of the fixed workload (module doc): 10 requests, 12 UNet rows."""
    from lcmserve.server.edge.validation import tokenize
    from lcmserve.server.protocol import GenerationParams

    ids, empty, blurry = (tokenize(tokenizer, text)[0] for text in (PROMPT, "", "blurry"))

    def make(negative: tuple[int, ...], steps: int, guidance: float, seed: int, output: str) -> Any:
        return GenerationParams(prompt_ids=ids, negative_ids=negative, num_steps=steps, guidance_scale=guidance,
                                seed=seed, width=side, height=side, num_images=1, output_format=output, quality=90,
                                preview_mode="none", include_latents=False)

    plain = [make(empty, 4, 1.0, 100 + i, "jpeg") for i in range(6)]
    guided = [make(blurry, 4, 2.0, 200 + i, "jpeg") for i in range(2)]  # two rows each
    short = [make(empty, 2, 1.0, 300 + i, "raw") for i in range(2)]  # decoded after iteration 2
    return plain + guided + short


class EngineDriver:
    """One in-process Engine, started once, for several runs of a workload (the second run replays
    the CUDA graphs the first captured). `batch_wait_ms` lets every request of a run arrive before
    the idle loop starts its batch, so that runs batch alike."""

    def __init__(self, runtime: Any) -> None:
        from lcmserve.server.config import EngineConfig
        from lcmserve.server.engine.loop import Engine

        self._lock = threading.Lock()
        self._ended: set[int] = set()
        self._expected = 0
        self._all_ended = threading.Event()
        self._images = 0
        self._failures: list[str] = []
        self._counter: Callable[[], int] = lambda: 0
        self._readings: list[int] = []
        self._next_rid = 0
        self.engine = Engine(runtime, EngineConfig(batch_wait_ms=100), self._sink)
        self.engine.after_iteration = self._after_iteration
        self.engine.start()

    def _sink(self, rid: int, event: Any) -> None:
        from lcmserve.server.protocol import Failure, ImageEvent, Summary

        with self._lock:
            if isinstance(event, ImageEvent):
                self._images += 1
            elif isinstance(event, (Summary, Failure)):
                if isinstance(event, Failure):
                    self._failures.append(f"request {rid}: {event.message}"[:300])
                self._ended.add(rid)
                if len(self._ended) == self._expected:
                    self._all_ended.set()

    def _after_iteration(self) -> None:  # in the loop thread, at the end of every iteration
        with self._lock:
            self._readings.append(self._counter())

    def run(self, params: list[Any], timeout_s: float, counter: Callable[[], int] = lambda: 0) -> dict[str, Any]:
        """Submit every request, wait for every request's end and for the loop's last iteration.
        Returns iterations, `per_iteration` (how much `counter()` grew in each iteration, read at its
        end in the loop thread), images, failures, seconds; TimeoutError after `timeout_s`."""
        from lcmserve.server.engine.work import OrderedEvents, Request

        with self._lock:
            self._ended, self._expected, self._images, self._failures = set(), len(params), 0, []
            self._all_ended.clear()
            self._counter = counter
            self._readings = [counter()]
        start = time.monotonic()
        for p in params:
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            self.engine.submit(Request(rid=rid, params=p, events=OrderedEvents(rid, self._sink, None),
                                       arrival=time.perf_counter()))
        while not self._all_ended.wait(0.05):  # short waits: the part's SIGALRM deadline lands in between
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{len(params) - len(self._ended)} of {len(params)} requests unfinished "
                                   f"after {timeout_s:.0f} s")
            if self.engine.dead is not None:
                raise RuntimeError(f"the engine loop died: {self.engine.dead!r}")
        seconds = time.monotonic() - start
        # A request's last event can leave from an encoder thread before the loop ends that iteration:
        # wait until no iteration ended for 0.3 s (the loop idles once nothing waits or runs).
        seen = -1
        while seen != len(self._readings):
            seen = len(self._readings)
            time.sleep(0.3)
        with self._lock:
            readings, self._counter = list(self._readings), (lambda: 0)
            return {"iterations": len(readings) - 1, "per_iteration": [b - a for a, b in zip(readings, readings[1:])],
                    "images": self._images, "failures": list(self._failures), "seconds": round(seconds, 2)}

    def close(self) -> None:
        self.engine.stop(5)


def sync_count(probe: Any) -> dict[str, Any]:
    """The gpu_probe part: the workload once to warm up, once counted."""
    runtime = eager_runtime(probe.pipe, probe.preset)
    params = workload(runtime.tokenizer, probe.side)
    driver = EngineDriver(runtime)
    try:
        warm = driver.run(params, timeout_s=60)
        if warm["failures"]:
            raise RuntimeError(f"warm-up: {warm['failures'][0]}")
        with SyncCounter(cuda=probe.cuda) as counter:
            counted = driver.run(params, timeout_s=60, counter=lambda: counter.count(LOOP_THREAD))
    finally:
        driver.close()
    loop = counter.count(LOOP_THREAD)
    fields = {"variant": f"engine, {len(params)} requests (12 rows), {probe.side}px, graphs "
                         f"{'on' if probe.cuda else 'off'}",
              "iterations": counted["iterations"], "loop_syncs": loop,
              "loop_syncs_per_iteration": counted["per_iteration"], "where": counter.where(LOOP_THREAD),
              "other_threads": counter.where(LOOP_THREAD, others=True), "images": counted["images"], "failures": counted["failures"][:2],
              "warm_up_s": warm["seconds"], "counted_s": counted["seconds"]}
    probe.row("sync_count", **fields)
    return {"syncs_per_iteration": round(loop / max(counted["iterations"], 1), 2),
            "target": "only the iterations that decode (pixel copies to the host)"}
