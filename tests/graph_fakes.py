"""CPU stand-ins for CUDA graphs, shared by the tests of BucketedGraphs (test_gpu_tools, test_model)."""

from __future__ import annotations

import torch


class RerunGraph:
    """A CPU stand-in for a CUDA graph: replay() recomputes fn on the static inputs into the static output."""

    def __init__(self, fn, static: list[torch.Tensor], output: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
        self.fn, self.static, self.output = fn, static, output
        self.released = False

    def replay(self) -> None:
        assert not self.released, "replay of a freed graph"
        self.output.copy_(self.fn(*self.static))

    def release(self) -> None:
        self.released = True
