"""Prompt embeddings of newly admitted samples: one batched text-encoder call for the prompts not
seen lately, an LRU cache for the rest (the same prompt in a busy server is encoded once)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import torch

from .rows import to_device
from .work import Sample


class PromptEmbeddings:
    def __init__(self, encode_text: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 cache_size: int) -> None:
        self._encode_text = encode_text  # (N, 77) int64 ids -> (N, 77, D), model dtype
        self._device = device
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()

    def embed(self, samples: list[Sample]) -> None:
        """Give each sample its prompt's embedding (`cond`) and, when guided, its negative prompt's
        (`uncond`); charge the encoder's time to their requests."""
        start = time.perf_counter()
        wanted: list[tuple[int, ...]] = []
        for s in samples:
            wanted.append(s.request.params.prompt_ids)
            if s.request.params.guided:
                wanted.append(s.request.params.negative_ids)
        missing = list(dict.fromkeys(ids for ids in wanted if ids not in self._cache))
        if missing:
            ids = to_device(torch.tensor(missing, dtype=torch.long), self._device)  # (N, 77)
            embeddings = self._encode_text(ids)  # (N, 77, D)
            for key, emb in zip(missing, embeddings):
                self._cache[key] = emb
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        text_ms = (time.perf_counter() - start) * 1e3 if missing else 0.0
        for request in {s.request for s in samples}:
            request.timings.text_ms += text_ms
        for s in samples:
            p = s.request.params
            s.cond = self._cache[p.prompt_ids]
            self._cache.move_to_end(p.prompt_ids)
            if p.guided:
                s.uncond = self._cache[p.negative_ids]
