"""One part of the model (text encoder, UNet, VAE decode, VAE encode, tiny decoder) behind one policy,
whatever the backend:

    a shape the backend's compiled part serves -> the compiled part, in chunks of its batch range
    any other shape                             -> the eager module, loaded the first time it is needed

A part without a compiled form (the eager backend; the compile backend's text encoder and VAE encoder;
an artifact from before a part was exported) is its eager module. A compiled part serves what its
export holds (aoti, onnx: the `Served` ranges of the manifest entry) or what the export warmed (compile:
its warm shapes; and a call that would still make dynamo recompile is declined, `NotServed`, so the
server never compiles in the middle of traffic). Each part logs once per unserved shape and counts the
calls it ran eagerly for want of a compiled graph (`fallbacks`, for /metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger("lcmserve.compiled")

PART_NAMES: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tiny_vae_decoder")

Fn = Callable[..., torch.Tensor]  # batch-first tensors, positionally -> a batch-first tensor


class NotServed(Exception):
    """Raised by a compiled callable that declines a call it would have to compile first (the compile
    backend under torch's "fail_on_recompile" stance): the part runs that shape eagerly."""


@dataclass(frozen=True)
class Compiled:
    """A backend's compiled form of a part, and what it serves."""

    fn: Fn
    # inputs -> None when the compiled form serves them, else why not ("latent size 9x9"), for the log
    serves: Callable[[Sequence[torch.Tensor]], str | None]
    max_rows: int | None  # rows per call of fn (the top of the exported or warmed batch range); None: any
    served: str  # what it serves, for people ("latent sides 4..128, multiples of 2; batch 1..63")


def chunked(fn: Fn, inputs: Sequence[torch.Tensor], max_rows: int | None) -> torch.Tensor:
    """fn over the batch in near-equal chunks of at most `max_rows` rows, concatenated: 64 rows with
    max_rows 63 run as 32 + 32, not 63 + 1."""
    n = inputs[0].shape[0]
    if max_rows is None or n <= max_rows:
        return fn(*inputs)
    chunks = -(-n // max_rows)
    size = -(-n // chunks)
    return torch.cat([fn(*(x[i:i + size] for x in inputs)) for i in range(0, n, size)])


class Part:
    """One model part: compiled where its backend serves the shape, else eager (see the module doc).

    `eager` builds the eager callable; it is called at most once, the first time a call runs eagerly.
    `note`, for a part without a compiled form on a compiled backend: why, logged at its first call.
    """

    def __init__(self, name: str, backend: str, eager: Callable[[], Fn], compiled: Compiled | None = None,
                 note: str | None = None) -> None:
        self.name = name
        self.backend = backend
        self.compiled = compiled
        self.fallbacks = 0  # calls run eagerly because the compiled form did not serve their shape
        self._build_eager = eager
        self._eager: Fn | None = None
        self._note = note
        self._logged: set[tuple[int, ...] | str] = set()

    @property
    def runs(self) -> str:
        """"compiled" (at the shapes it serves) or "eager"."""
        return "eager" if self.compiled is None else "compiled"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        compiled = self.compiled
        if compiled is None:
            if self._note is not None and "note" not in self._logged:
                self._logged.add("note")
                log.warning("%s artifact: %s; running it eagerly", self.backend, self._note)
            return self.eager(*inputs)
        why = compiled.serves(inputs)
        if why is None:
            try:
                return chunked(compiled.fn, inputs, compiled.max_rows)
            except NotServed as exc:  # (not remembered: what dynamo guards on is more than the shapes)
                why = f"{exc}"
        return self.run_eagerly(inputs, why)

    def run_eagerly(self, inputs: Sequence[torch.Tensor], why: str) -> torch.Tensor:
        """A call the compiled form does not serve (`why`: "latent size 9x9", "adapters"), run eagerly:
        counted as a fallback, logged once per shape."""
        self.fallbacks += 1
        key = tuple(inputs[0].shape[1:])
        if key not in self._logged:
            self._logged.add(key)
            served = self.compiled.served if self.compiled is not None else "nothing"
            log.warning("%s: %s is not served by the %s artifact (served: %s); running it eagerly", self.name,
                        why, self.backend, served)
        return self.eager(*inputs)

    def rebuild_eager(self) -> None:
        """Forget the eager callable built so far (the eager modules changed: adapter slots)."""
        self._eager = None

    @property
    def eager(self) -> Fn:
        """The eager callable (built on first use)."""
        if self._eager is None:
            self._eager = self._build_eager()
        return self._eager
