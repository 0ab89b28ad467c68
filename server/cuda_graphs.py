"""CUDA graphs for the model callables, one per (padded batch size, input shapes).

At batch 1 a UNet step is launch-bound: 25.3 ms eager against 7.8 ms replayed from a CUDA graph on
an H100 (DESIGN.md). A graph has fixed shapes, so batches are padded up to a few bucket sizes; the
padded rows hold earlier valid inputs and their outputs are dropped. Graphs are captured lazily, the
first time a (bucket, shape) is met (warm-up meets the common ones), and share one memory pool:
they never run at the same time, and each output is copied out before the next replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("lcmserve.cuda_graphs")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static input buffers, (bucket, ...)
    output: torch.Tensor  # static output buffer, (bucket, ...)


class BucketedGraphs:
    """Wraps `fn(*tensors) -> tensor` (batch first); replays a captured graph per bucket and shape."""

    def __init__(self, fn: Callable[..., torch.Tensor], buckets: tuple[int, ...], name: str) -> None:
        self.fn = fn
        self.buckets = sorted(buckets)
        self.name = name
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[object, ...], _Captured | None] = {}  # None: capture failed, run eagerly

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = inputs[0].shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None:
            return self.fn(*inputs)  # larger than every bucket
        key = (bucket, *((tuple(x.shape[1:]), x.dtype) for x in inputs))
        if key not in self.graphs:
            self.graphs[key] = self._capture(bucket, inputs)
        captured = self.graphs[key]
        if captured is None:
            return self.fn(*inputs)
        for static, x in zip(captured.inputs, inputs):
            static[:n].copy_(x)
        captured.graph.replay()
        return captured.output[:n].clone()

    def _capture(self, bucket: int, inputs: tuple[torch.Tensor, ...]) -> _Captured | None:
        # Static buffers filled with copies of the first row: padding rows must hold valid values.
        static = [x[:1].expand(bucket, *x.shape[1:]).clone() for x in inputs]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up runs (allocator, cuDNN/cuBLAS heuristics) off the graph
                for _ in range(2):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.fn(*static)
            log.info("captured %s CUDA graph for batch %d, shapes %s", self.name, bucket,
                     [tuple(x.shape) for x in static])
            return _Captured(graph, static, output)
        except Exception as exc:  # a backend that cannot be captured still serves, eagerly
            log.warning("CUDA graph capture of %s (batch %d) failed, running eagerly: %s", self.name, bucket, exc)
            torch.cuda.synchronize()
            return None
