"""CUDA graphs for the model callables, one per (padded batch size, resolution), bounded.

A callable takes batch-first tensors, or one UNetCall (export/unet_call.py: every tensor of it, the
per-row extras included, gets a static buffer of its own and is padded the same way).

At batch 1 a UNet step is launch-bound: 25.3 ms eager against 7.8 ms replayed from a CUDA graph on
an H100 (the project's design notes). A graph has fixed shapes, so batches are padded up to a few bucket sizes; the
padded rows hold earlier valid inputs and their outputs are dropped.

When graphs are captured: every bucket of 512x512 before the server turns SERVING
(`Engine.capture_graphs`); any other resolution on first use, inline (about a second per bucket, the
batch waits). A "resolution" is the names, shapes and dtypes of the inputs past the batch dimension.

Bounds (issue #15, item 6): at most `max_resolutions` resolutions hold graphs, kept as an LRU. While
there is room, a new resolution gets graphs on first use. Once full, a new resolution runs eagerly
until it has been met `admit_after` times; then it takes the place of the least recently used one,
whose graphs are freed. So once full, a one-off size costs no capture, and sizes that keep coming
do get graphs, at most one round of captures per `admit_after` calls each. Counters (`captures`, `evictions`,
`eager_calls`, `replays`, `capture_ooms`) are plain attributes for the engine to export as metrics.

A failed capture leaves the device usable: the thread's current stream is restored
(`torch.cuda.graph` leaves the capture stream current when `capture_end` raises), the allocator's
routing to the graph pool is ended, the device is synchronized. Then (issue 18, item 3):
  - out of memory: that call runs eagerly, the least recently used other resolution's graphs are
    freed, and that (resolution, bucket) is tried again after `admit_after` more calls of it (counted:
    `capture_ooms`); graphs stay on;
  - any other error turns graphs off for this callable: every graph of it is freed, it is logged once,
    and every later call runs eagerly (`state()` says why, for GetModelInfo and /metrics).

All graphs of one `BucketedGraphs` share one memory pool: they never run at the same time, and each
output is copied out before the next replay. Not thread-safe: the engine's loop thread calls it.
How a graph is captured is a parameter (`capture`), so the bookkeeping runs and is tested on a CPU.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lcmserve.export.unet_call import UNetCall

log = logging.getLogger("lcmserve.cuda_graphs")

Resolution = tuple[tuple[tuple[int, ...], torch.dtype, str], ...]  # per input: (shape past batch, dtype, name)
Inputs = tuple[torch.Tensor, ...] | tuple[UNetCall]  # what a wrapped callable takes


@dataclass(frozen=True)
class GraphState:
    """Whether a callable runs from CUDA graphs: "enabled", or "disabled: <why>"."""

    name: str  # the callable: "unet", "vae", "tiny_vae"
    enabled: bool
    reason: str = ""  # why not, when disabled

    def __str__(self) -> str:
        return "enabled" if self.enabled else f"disabled: {self.reason}"


def graphs_off(device: torch.device, cuda_graphs: bool, capturable: bool) -> str | None:
    """Why an engine on `device` runs its callables without CUDA graphs (None: it uses them): the
    reason GraphState gives for callables that never got a BucketedGraphs."""
    if device.type != "cuda":
        return f"no CUDA device ({device})"
    if not cuda_graphs:
        return "turned off (--no-cuda-graphs)"
    if not capturable:
        return "the backend cannot be captured (its calls wait for the device)"
    return None


def graph_states(callables: Mapping[str, object], off: str | None) -> tuple[GraphState, ...]:
    """The graph state of each named callable of an engine: a BucketedGraphs says its own; any other
    runs without graphs, for the reason `off` (graphs_off)."""
    return tuple(fn.state() if isinstance(fn, BucketedGraphs) else GraphState(name, False, off or "not captured")
                 for name, fn in callables.items())


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Replayable(Protocol):
    """A captured piece of work: `replay()` reruns it on its static buffers; `release()` frees it."""

    def replay(self) -> None: ...

    def release(self) -> None: ...


# capture(fn, static_inputs) -> (graph, static_output): records fn on the static buffers (tensors,
# positionally), whose rows are all valid inputs. Raises on failure (BucketedGraphs then runs the call
# eagerly: see the module doc for out of memory and every other error).
Capture = Callable[[Callable[..., torch.Tensor], list[torch.Tensor]], tuple[Replayable, torch.Tensor]]


class _CudaGraph:
    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        self.graph.reset()  # its memory goes back to the shared pool for later captures


class CudaGraphCapture:
    """The real `Capture`: warm-up on a side stream, then `torch.cuda.graph` into one shared pool."""

    def __init__(self, warmup_runs: int = 2) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        # One capture stream for every capture into this pool: the allocator reuses a freed block
        # only on the stream it was freed on, so graphs captured on one stream share the most memory.
        self.stream = _new_stream()
        self.warmup_runs = warmup_runs  # allocator, cuDNN/cuBLAS heuristics, lazy init: off the graph

    def __call__(self, fn: Callable[..., torch.Tensor], static: list[torch.Tensor]) -> tuple[_CudaGraph, torch.Tensor]:
        caller = torch.cuda.current_stream()
        side = _new_stream()
        graph = torch.cuda.CUDAGraph()
        try:
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(self.warmup_runs):
                    fn(*static)
            caller.wait_stream(side)
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                output = fn(*static)
        except BaseException:
            self._recover(caller)
            raise
        return _CudaGraph(graph), output

    def _recover(self, caller: torch.cuda.Stream) -> None:
        """After a failed capture: the caller's stream current again, no allocation routed to the
        pool, nothing in flight. Each step is tried even if an earlier one fails."""
        torch.cuda.set_stream(caller)  # capture_end raised before torch.cuda.graph restored it
        try:  # capture_end may raise before it ends the pool's allocation routing; ending it twice raises
            torch._C._cuda_endAllocateToPool(caller.device_index, self.pool)
            log.info("ended the allocator's routing to the graph pool left by the failed capture")
        except RuntimeError:
            pass
        if torch.cuda.is_current_stream_capturing():  # cannot happen once the stream is restored
            log.error("still capturing on stream %s after a failed capture", caller)
        try:
            torch.cuda.synchronize()
        except RuntimeError as exc:  # a sticky CUDA error: eager calls will raise it too, and say so
            log.error("synchronize after a failed capture raised: %s", exc)


def _new_stream() -> torch.cuda.Stream:
    return torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch.cuda.Stream.__new__ is unannotated


@dataclass
class _Graph:
    graph: Replayable
    inputs: list[torch.Tensor]  # static input buffers, (bucket, ...)
    output: torch.Tensor  # static output buffer, (bucket, ...)


class BucketedGraphs:
    """Wraps `fn(*tensors) -> tensor` or `fn(call: UNetCall) -> tensor` (batch first); replays a captured
    graph per bucket and resolution.

    `buckets`: padded batch sizes (a batch larger than all runs eagerly). `max_resolutions`: how
    many resolutions hold graphs at once. `admit_after`: calls of a new resolution, once full,
    before it evicts the least recently used one. `capture`: how to record a graph (CUDA by default).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], buckets: tuple[int, ...], name: str, *,
                 max_resolutions: int = 4, admit_after: int = 16, capture: Capture | None = None) -> None:
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {buckets!r}")
        if max_resolutions < 1:
            raise ValueError(f"max_resolutions must be >= 1, got {max_resolutions}")
        if admit_after < 1:
            raise ValueError(f"admit_after must be >= 1, got {admit_after}")
        self.fn = fn
        self.buckets: tuple[int, ...] = tuple(sorted(set(buckets)))
        self.name = name
        self.max_resolutions = max_resolutions
        self.admit_after = admit_after
        self.capture: Capture = capture if capture is not None else CudaGraphCapture()
        # resolution -> bucket -> graph; least recently used first
        self.graphs: collections.OrderedDict[Resolution, dict[int, _Graph]] = collections.OrderedDict()
        self._waiting: collections.OrderedDict[Resolution, int] = collections.OrderedDict()  # eager calls
        self.disabled: str | None = None  # why graphs are off for good (the first failed capture)
        self._retry_in: dict[tuple[Resolution, int], int] = {}  # calls left before a capture that ran out of memory
        self.capture_ooms = 0  # captures that ran out of memory (that call ran eagerly; tried again later)
        self.captures = 0  # graphs captured
        self.evictions = 0  # resolutions whose graphs were freed for another
        self.eager_calls = 0  # calls run eagerly: too large, resolution without graphs, or disabled
        self.replays = 0

    def stats(self) -> dict[str, int]:
        """The counters, for metrics and logs."""
        return {"captures": self.captures, "evictions": self.evictions, "eager_calls": self.eager_calls,
                "replays": self.replays, "resolutions": len(self.graphs), "disabled": int(self.disabled is not None)}

    def state(self) -> GraphState:
        """Graphs on, or off and why (GetModelInfo's backend details, /metrics)."""
        if self.disabled is not None:
            return GraphState(self.name, False, self.disabled)
        return GraphState(self.name, True)

    def __call__(self, *inputs: torch.Tensor | UNetCall) -> torch.Tensor:
        tensors, names, rebuild = _flatten(inputs)
        n = tensors[0].shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)
        if self.disabled is not None or bucket is None:
            return self._eager(inputs)
        resolution: Resolution = tuple((tuple(x.shape[1:]), x.dtype, name) for x, name in zip(tensors, names))
        graphs = self.graphs.get(resolution)
        if graphs is None:
            graphs = self._admit(resolution)
            if graphs is None:
                return self._eager(inputs)
        else:
            self.graphs.move_to_end(resolution)
        captured = graphs.get(bucket)
        if captured is None:
            if self._retry_in.get((resolution, bucket), 0) > 0:  # its capture ran out of memory: not yet
                self._retry_in[(resolution, bucket)] -= 1
                return self._eager(inputs)
            captured = self._capture(bucket, resolution, tensors, rebuild)
            if captured is None:
                return self._eager(inputs)
            graphs[bucket] = captured
        for static, x in zip(captured.inputs, tensors):
            static[:n].copy_(x)
        captured.graph.replay()
        self.replays += 1
        return captured.output[:n].clone()  # the static output is overwritten by the next replay

    def _eager(self, inputs: tuple[torch.Tensor | UNetCall, ...]) -> torch.Tensor:
        self.eager_calls += 1
        return self.fn(*inputs)

    def _admit(self, resolution: Resolution) -> dict[int, _Graph] | None:
        """A resolution without graphs: room for it, or its turn after `admit_after` eager calls."""
        if len(self.graphs) >= self.max_resolutions:
            seen = self._waiting.pop(resolution, 0) + 1
            if seen < self.admit_after:
                self._waiting[resolution] = seen
                while len(self._waiting) > 8 * self.max_resolutions:  # remember a bounded few
                    self._waiting.popitem(last=False)
                return None
            old, old_graphs = self.graphs.popitem(last=False)
            self._free(old_graphs)
            self.evictions += 1
            log.info("%s CUDA graphs: evicted resolution %s (%d graphs) for %s", self.name, _shapes(old),
                     len(old_graphs), _shapes(resolution))
        graphs: dict[int, _Graph] = {}
        self.graphs[resolution] = graphs
        return graphs

    def _capture(self, bucket: int, resolution: Resolution, inputs: Sequence[torch.Tensor],
                 rebuild: Callable[[Sequence[torch.Tensor]], Inputs]) -> _Graph | None:
        # Static buffers filled with copies of the first row: padding rows must hold valid values.
        static = [x[:1].expand(bucket, *x.shape[1:]).clone() for x in inputs]
        fn = self.fn

        def on_static(*tensors: torch.Tensor) -> torch.Tensor:
            return fn(*rebuild(tensors))

        try:
            graph, output = self.capture(on_static, static)
        except Exception as exc:  # a backend that cannot be captured still serves, eagerly
            if _is_out_of_memory(exc):
                self._out_of_memory(bucket, resolution, exc)
                return None
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture of %s (batch %d, %s) failed; graphs are off for %s from now on: %s",
                        self.name, bucket, _shapes(resolution), self.name, self.disabled)
            for graphs in self.graphs.values():
                self._free(graphs)
            self.graphs.clear()
            self._waiting.clear()
            return None
        self.captures += 1
        log.info("%s CUDA graph captured: batch %d, %s (%d resolutions hold graphs)", self.name, bucket,
                 _shapes(resolution), len(self.graphs))
        return _Graph(graph, static, output)

    def _out_of_memory(self, bucket: int, resolution: Resolution, exc: BaseException) -> None:
        """A capture that ran out of memory: free the least recently used other resolution's graphs, and
        try this (resolution, bucket) again after `admit_after` calls of it (this call runs eagerly)."""
        self.capture_ooms += 1
        self._retry_in[(resolution, bucket)] = self.admit_after
        victim = next((r for r in self.graphs if r != resolution), None)
        if victim is not None:
            self._free(self.graphs.pop(victim))
            self.evictions += 1
        log.warning("CUDA graph capture of %s (batch %d, %s) ran out of memory; running it eagerly, %s, trying "
                    "again after %d calls: %s", self.name, bucket, _shapes(resolution),
                    f"freed the graphs of {_shapes(victim)}" if victim is not None else "no other size to free",
                    self.admit_after, exc)

    @staticmethod
    def _free(graphs: dict[int, _Graph]) -> None:
        for captured in graphs.values():
            captured.graph.release()
        graphs.clear()


def _flatten(inputs: tuple[torch.Tensor | UNetCall, ...]
             ) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...], Callable[[Sequence[torch.Tensor]], Inputs]]:
    """(the tensors, their names, tensors -> the callable's arguments again): a UNetCall is its
    positional tensors (the extras included); plain tensors are themselves, unnamed."""
    if len(inputs) == 1 and isinstance(inputs[0], UNetCall):
        call = inputs[0]

        def as_call(tensors: Sequence[torch.Tensor]) -> Inputs:
            return (call.with_tensors(tensors),)

        return call.positional(), call.names, as_call
    tensors = tuple(x for x in inputs if isinstance(x, torch.Tensor))
    if len(tensors) != len(inputs):
        raise TypeError("BucketedGraphs takes batch-first tensors, or one UNetCall")

    def as_tensors(tensors: Sequence[torch.Tensor]) -> Inputs:
        return tuple(tensors)

    return tensors, ("",) * len(tensors), as_tensors


def _shapes(resolution: Resolution) -> str:
    return ", ".join(f"{name + ' ' if name else ''}{list(shape)} {str(dtype).removeprefix('torch.')}"
                     for shape, dtype, name in resolution)
