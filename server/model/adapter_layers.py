"""Slot layers: a Linear or Conv2d that adds, per row of its batch, the low-rank deltas of that row's own
LoRA adapters, from factors held in fixed buffers (one slot per loaded adapter).

    SlotLinear / SlotConv2d(base, rows, slots=S, rank=R)
      down  (S, R, in[, kh, kw])  each slot's A, rank padded to R with zero rows (a free slot is all zero)
      up    (S, R, out)           each slot's B transposed, times its alpha / rank (diffusers' scaling)
      rows  AdapterRows: the call's per-row slot indices (B, K) int64 and scales (B, K), or None for a
            call without adapters (then the layer is its base module and nothing else)

    y[b] = base(x)[b] + sum_k scales[b, k] * B[slots[b, k]] A[slots[b, k]] x[b]

computed for all rows at once: the rows' factors are gathered from the buffers ((B, K * R, in) and
(B, K * R, out)) and applied with two batched matmuls (a Linear) or a grouped convolution and a batched
matmul (a Conv2d: A is a conv with the base's kernel, stride and padding, B a 1x1 conv, as kohya's LoCon
and PEFT's conv LoRA). Unused entries of a row (fewer than K adapters) name any slot with scale 0. Every
shape is fixed by (B, K, S, R) and nothing waits for the host, so a call is capturable in a CUDA graph and
traceable by torch.compile; loading an adapter only writes buffer values (no new shapes, no recompile).

The rows come from one `AdapterRows` object per model (UNet, text encoder) that the model's step module
fills for the length of one call (adapters.py: `WithAdapterRows`). `live` (a Python flag) lets a layer that
no loaded adapter adapts skip its (zero) delta: only where nothing is captured or traced (eager without CUDA
graphs), since a graph would keep the flag it was recorded with (AdapterSlots.keep_all_live).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AdapterRows:
    """The adapters of each row of the call in progress (set by WithAdapterRows, read by slot layers)."""

    slots: torch.Tensor | None = None  # (B, K) int64: slot of each row's k-th adapter
    scales: torch.Tensor | None = None  # (B, K) the model's dtype: its scale, 0 for an unused entry


class _SlotModule(torch.nn.Module):
    """What both slot layers share: the base module, the rows, the rank, the `down`/`up` buffers, the
    base's weight and bias for code that reads them, and the per-row slots and scales of the call."""

    base: torch.nn.Linear | torch.nn.Conv2d  # set by the subclass, after this __init__
    down: torch.Tensor  # (S, R, in[, kh, kw]) buffer
    up: torch.Tensor  # (S, R, out) buffer

    def __init__(self, base: torch.nn.Linear | torch.nn.Conv2d, rows: AdapterRows, slots: int, rank: int,
                 down_shape: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        self.rows = rows
        self.rank = rank
        self.live = True  # False: no loaded adapter adapts this layer, its delta is 0 (AdapterSlots.set_live)
        w = base.weight
        self.register_buffer("down", torch.zeros(slots, rank, *down_shape, dtype=w.dtype, device=w.device))
        self.register_buffer("up", torch.zeros(slots, rank, out_features, dtype=w.dtype, device=w.device))

    @property
    def weight(self) -> torch.Tensor:  # code that reads the base layer's weight (dtype, device) still can
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The call's (slots, scales), or None when this call adds no delta here."""
        slots, scales = self.rows.slots, self.rows.scales
        if slots is None or scales is None or not self.live:
            return None
        return slots, scales


class SlotLinear(_SlotModule):
    """A Linear plus the per-row low-rank deltas of its slots (module doc)."""

    def __init__(self, base: torch.nn.Linear, rows: AdapterRows, slots: int, rank: int) -> None:
        super().__init__(base, rows, slots, rank, (base.in_features,), base.out_features)
        self.base: torch.nn.Linear = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        rows = self._rows()
        if rows is None:
            return y
        slots, scales = rows
        batch, k = slots.shape
        down = self.down[slots].reshape(batch, k * self.rank, -1)  # (B, KR, in)
        up = self.up[slots].reshape(batch, k * self.rank, -1)  # (B, KR, out)
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]), down.transpose(1, 2))  # (B, N, KR)
        h = h * scales.repeat_interleave(self.rank, dim=1).unsqueeze(1)  # (B, N, KR)
        return y + torch.bmm(h, up).reshape(y.shape)  # (B, ..., out)


class SlotConv2d(_SlotModule):
    """A Conv2d plus the per-row low-rank deltas of its slots (module doc): A a conv with the base's
    kernel, stride, padding and dilation; B a 1x1 conv."""

    def __init__(self, base: torch.nn.Conv2d, rows: AdapterRows, slots: int, rank: int) -> None:
        if base.groups != 1:
            raise ValueError(f"a grouped convolution (groups={base.groups}) cannot hold adapter slots")
        w = base.weight  # (out, in, kh, kw)
        super().__init__(base, rows, slots, rank, tuple(w.shape[1:]), w.shape[0])
        self.base: torch.nn.Conv2d = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        rows = self._rows()
        if rows is None:
            return y
        slots, scales = rows
        batch, k = slots.shape
        base = self.base
        down = self.down[slots].reshape(batch * k * self.rank, *self.down.shape[2:])  # (B*KR, in, kh, kw)
        # One grouped conv for all rows: row b's channels meet only row b's gathered kernels.
        h = F.conv2d(x.reshape(1, -1, *x.shape[2:]), down, None, base.stride, base.padding,
                     base.dilation, groups=batch)  # (1, B*KR, h', w')
        h = h.reshape(batch, k * self.rank, -1)  # (B, KR, h'w')
        h = h * scales.repeat_interleave(self.rank, dim=1).unsqueeze(2)
        up = self.up[slots].reshape(batch, k * self.rank, -1)  # (B, KR, out)
        return y + torch.bmm(up.transpose(1, 2), h).reshape(y.shape)  # (B, out, h', w')


SlotLayer = SlotLinear | SlotConv2d
