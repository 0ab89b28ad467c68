"""An in-process engine over the real tiny model, with a list sink: engine behaviour without a server.

`EngineHarness` builds an `Engine` in the test's process. A test either drives it one iteration at a
time (`iterate()`, on the test's thread: admission and batch contents are then deterministic) or
starts its loop thread (`engine.start()`) as the engine process does. Every event lands in
`events` (rid, event) in the order the engine hands them on; metric updates in `metrics`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lcmserve.server.config import EngineConfig
from lcmserve.server.edge.validation import tokenize
from lcmserve.server.engine.loop import Engine
from lcmserve.server.engine.work import OrderedEvents, Request
from lcmserve.server.model.runtime import Runtime
from lcmserve.server.protocol import TERMINAL, Event, Failure, GenerationParams, ImageEvent, MetricUpdate, StepEvent


class EngineHarness:
    def __init__(self, runtime: Runtime, engine: Callable[..., Engine] = Engine, **config: Any) -> None:
        self.runtime = runtime
        self.events: list[tuple[int, Event]] = []
        self.metrics: list[MetricUpdate] = []
        self._cond = threading.Condition()  # the loop and encoder threads hand events on
        self._rids = itertools.count()
        self.engine = engine(runtime, EngineConfig(**{"encode_threads": 1, **config}), self._sink, self.metrics.append)

    def _sink(self, rid: int, event: Event) -> None:
        with self._cond:
            self.events.append((rid, event))
            self._cond.notify_all()

    def params(self, prompt: str = "a crack in a wall", **fields: Any) -> GenerationParams:
        """GenerationParams as validation makes them: 64x64, 2 steps, RAW, unguided unless asked."""
        ids, tokens, truncated = tokenize(self.runtime.tokenizer, prompt)
        negative, _, _ = tokenize(self.runtime.tokenizer, "")
        values: dict[str, Any] = dict(prompt_ids=ids, negative_ids=negative, num_steps=2, guidance_scale=1.0, seed=0,
                                      width=64, height=64, num_images=1, output_format="raw", quality=90,
                                      preview_mode="none", include_latents=False, prompt_tokens=tokens,
                                      prompt_truncated=truncated)
        values.update(fields)
        return GenerationParams(**values)

    def request(self, prompt: str = "a crack in a wall", deadline: float | None = None, **fields: Any) -> Request:
        rid = next(self._rids)
        return Request(rid=rid, params=self.params(prompt, **fields), events=OrderedEvents(rid, self._sink, None),
                       deadline=deadline, arrival=time.perf_counter())

    def submit(self, prompt: str = "a crack in a wall", **fields: Any) -> Request:
        request = self.request(prompt, **fields)
        self.engine.submit(request)
        return request

    def iterate(self, times: int = 1) -> None:
        """Run loop iterations on this thread (as the loop thread runs them)."""
        with torch.inference_mode():
            for _ in range(times):
                self.engine.iteration()

    def of(self, request: Request) -> list[Event]:
        with self._cond:
            return [event for rid, event in self.events if rid == request.rid]

    def wait(self, request: Request, timeout: float = 120) -> list[Event]:
        """Its events once the terminal one was handed on (encoded pictures arrive from the pool)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(isinstance(e, TERMINAL) for rid, e in self.events if rid == request.rid):
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"request {request.rid}: no terminal event in {timeout} s: {self.of(request)}")
        return self.of(request)

    def run(self, *requests: Request, timeout: float = 120) -> list[list[Event]]:
        """Iterate until every one of `requests` has its terminal event; their events."""
        deadline = time.monotonic() + timeout
        while not all(r.failed or r.unfinished == 0 for r in requests):
            assert time.monotonic() < deadline, "the engine did not finish the requests"
            self.iterate()
        return [self.wait(r, max(1.0, deadline - time.monotonic())) for r in requests]

    def close(self) -> None:
        self.engine.stop(10)


def steps_of(events: list[Event]) -> list[StepEvent]:
    return [e for e in events if isinstance(e, StepEvent)]


def failure_of(events: list[Event]) -> Failure | None:
    return next((e for e in events if isinstance(e, Failure)), None)


def pixels(events: list[Event]) -> list[np.ndarray]:
    """Each ImageEvent's RAW picture as (H, W, 3) int."""
    out = []
    for e in events:
        if isinstance(e, ImageEvent):
            p = e.picture
            out.append(np.frombuffer(p.data, dtype=np.uint8).reshape(p.height, p.width, 3).astype(int))
    return out
