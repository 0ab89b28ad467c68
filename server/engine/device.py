"""The engine's device, as the process and its loop treat it: bound before anything runs on it,
a fixed number of CPU threads beside a GPU, and errors after which it cannot be used any more."""

from __future__ import annotations

import torch

CUDA_TORCH_THREADS = 4  # torch's CPU threads in a CUDA engine process: the host work is small, cores are shared


def bind_device(device: torch.device) -> bool:
    """Make `device` the current CUDA device of the calling thread (graph pools, side streams and
    captures land on the current device, whatever device the tensors are on: without this a model on
    cuda:1 captures empty graphs on cuda:0). Returns whether a device was set (False off CUDA, and
    for "cuda" without an index: the current device is already the one it means)."""
    if device.type != "cuda" or device.index is None:
        return False
    torch.cuda.set_device(device)
    return True


def is_sticky_device_error(exc: BaseException) -> bool:
    """An error after which the device context is unusable (an illegal address, a launch failure:
    every later call fails too): torch.AcceleratorError where this torch has it, or a RuntimeError
    whose message starts with "CUDA error". Out of memory is not one (the next batch may fit)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if isinstance(accelerator_error, type) and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")
