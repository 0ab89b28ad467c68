"""Row positions as device index tensors, so that picking rows never makes the host wait.

Indexing a CUDA tensor with a Python list (`latents[[0, 2]]`) makes ATen copy the list to the device
with a blocking copy: the host then waits for everything queued before it (the UNet call), and the
next step's host work no longer overlaps this step's GPU work. Here a list of positions goes to the
device from pinned memory with a non-blocking copy instead, or becomes a slice when it can:

    to_device(host, device)    a host tensor -> device, pinned and non-blocking on CUDA
    index(rows, device)        Python ints -> one (N,) int64 index tensor on the device
    indices(device, *lists)    several lists -> one index tensor each, from ONE copy
    pick(tensor, rows)         tensor[rows] along dim 0: the tensor itself, a slice, or index_select

Off CUDA these are the plain operations (a CPU tensor is already where it is used).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor -> `device` without the host waiting: on CUDA through pinned memory with a
    non-blocking copy (a copy from pageable memory would be a blocking one). The caching host
    allocator keeps the pinned buffer until the copy has run."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row positions -> (N,) int64 on `device`, copied without waiting."""
    return to_device(torch.tensor(list(rows), dtype=torch.long), device)


def indices(device: torch.device, *lists: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Several lists of row positions -> one (N_i,) int64 device tensor each: views of one device
    buffer, filled by a single non-blocking copy (one per UNet call, not one per list)."""
    flat = [row for rows in lists for row in rows]
    buffer = index(flat, device)  # (sum N_i,)
    return tuple(torch.split(buffer, [len(rows) for rows in lists]))


def pick(tensor: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """tensor[rows] along dim 0 without a host wait: the tensor itself when `rows` is all of it in
    order, a slice (a view) when the rows are consecutive, else index_select with a device index."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return tensor if len(rows) == len(tensor) else tensor[rows[0]: rows[0] + len(rows)]
    return tensor.index_select(0, index(rows, tensor.device))
