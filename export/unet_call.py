"""One UNet call, typed: the one definition of what the UNet takes, for every backend and the engine.

    UNetCall(latents, timesteps, text, extras=())
      latents    (B, C, h, w)  the model's dtype: x_t of every row (C = 4 for SD)
      timesteps  (B,) int64    each row's own timestep
      text       (B, 77, D)    the model's dtype: each row's text embeddings
      extras     ((name, (B, ...)), ...) per-row extras a UNet may read besides (room for per-request
                 adapters: slot indices, scales); none today: a runtime refuses extras it does not read
    -> predicted noise (B, C, h, w)

Traced and compiled graphs take the call positionally, in `positional()` order (the fields above, then
the extras in their order); `INPUT_NAMES` (the exported graphs' input names: ONNX, AOTInductor) is
derived from the fields, so this class is the only place the signature is written.

No torch import at module level: the artifact contract (artifact.py, read where torch may be absent)
takes its input names from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class UNetCall:
    """The UNet's inputs for one call, every tensor batch first (B rows); see the module doc."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    extras: tuple[tuple[str, torch.Tensor], ...] = ()

    def __post_init__(self) -> None:
        rows = self.latents.shape[0]
        for name, x in self.named():
            if x.dim() == 0 or x.shape[0] != rows:
                raise ValueError(f"UNetCall.{name} has shape {tuple(x.shape)}: every input is batch first, "
                                 f"with the {rows} rows of latents")
        if self.timesteps.dim() != 1:
            raise ValueError(f"UNetCall.timesteps has shape {tuple(self.timesteps.shape)}: one timestep per row (B,)")
        names = [name for name, _ in self.extras]
        if len(set(names)) != len(names) or set(names) & set(INPUT_NAMES):
            raise ValueError(f"UNetCall.extras names {names}: each once, none of {', '.join(INPUT_NAMES)}")

    @property
    def rows(self) -> int:
        """B: the batch size of this call."""
        return int(self.latents.shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        """Input names in positional order: INPUT_NAMES, then the extras'."""
        return INPUT_NAMES + tuple(name for name, _ in self.extras)

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.extras)

    def positional(self) -> tuple[torch.Tensor, ...]:
        """The tensors in the order traced and compiled graphs take them."""
        return (self.latents, self.timesteps, self.text, *(x for _, x in self.extras))

    def named(self) -> tuple[tuple[str, torch.Tensor], ...]:
        return tuple(zip(self.names, self.positional()))

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> UNetCall:
        """A call of the same inputs (extras by the same names) holding `tensors` (positional order)."""
        return UNetCall.from_positional(tensors, self.extra_names)

    def rows_slice(self, start: int, stop: int) -> UNetCall:
        """Rows start..stop of every input."""
        return self.with_tensors([x[start:stop] for x in self.positional()])

    @classmethod
    def from_positional(cls, tensors: Sequence[torch.Tensor], extra_names: Sequence[str] = ()) -> UNetCall:
        """The call whose positional() is `tensors`: the inputs of INPUT_NAMES, then `extra_names`."""
        n = len(INPUT_NAMES)
        if len(tensors) != n + len(extra_names):
            raise ValueError(f"a UNet call takes {n + len(extra_names)} tensors "
                             f"({', '.join(INPUT_NAMES + tuple(extra_names))}), got {len(tensors)}")
        latents, timesteps, text = tensors[:n]
        return cls(latents, timesteps, text, tuple(zip(extra_names, tensors[n:])))


# The exported graphs' input names, in positional order (extras come after these).
INPUT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(UNetCall) if f.name != "extras")
OUTPUT_NAME = "noise"  # the exported graphs' output: predicted noise (B, C, h, w)
