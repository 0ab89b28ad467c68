"""Prompt embeddings of newly admitted samples: one batched text-encoder call for the prompts not
seen lately, an LRU cache for the rest (the same prompt in a busy server is encoded once).

A request's adapters that adapt the text encoder change its embeddings: the cache key is the prompt's
ids and those adapters with their scales (each load of an adapter its own `uid`, so a name reloaded
with another file never hits an old entry); adapters of the UNet alone leave the key as it was. The
missing prompts of every adapter set are encoded in ONE call, each row with its own adapters."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import torch

from ..model.adapters import SlotWeight
from .adapter_rows import adapter_tensors
from .rows import to_device
from .work import Sample

# (ids, ((adapter uid, scale), ...)) of one embedding
Key = tuple[tuple[int, ...], tuple[tuple[int, float], ...]]


def text_adapters(adapters: tuple[SlotWeight, ...]) -> tuple[SlotWeight, ...]:
    return tuple(a for a in adapters if a.text_encoder)


class PromptEmbeddings:
    def __init__(self, encode_text: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor],
                 device: torch.device, dtype: torch.dtype, cache_size: int) -> None:
        self._encode_text = encode_text  # (N, 77) int64 ids, adapter extras -> (N, 77, D), model dtype
        self._device = device
        self._dtype = dtype
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[Key, torch.Tensor] = collections.OrderedDict()

    def embed(self, samples: list[Sample]) -> None:
        """Give each sample its prompt's embedding (`cond`) and, when guided, its negative prompt's
        (`uncond`), both with its request's text-encoder adapters; charge the encoder's time to their
        requests."""
        start = time.perf_counter()
        wanted: dict[Key, tuple[SlotWeight, ...]] = {}
        for s in samples:
            p = s.request.params
            adapters = text_adapters(s.request.adapters)
            for ids in (p.prompt_ids, p.negative_ids) if p.guided else (p.prompt_ids,):
                wanted[(ids, tuple((a.uid, a.scale) for a in adapters))] = adapters
        missing = [key for key in wanted if key not in self._cache]
        if missing:
            tokens = to_device(torch.tensor([key[0] for key in missing], dtype=torch.long), self._device)  # (N, 77)
            extras = adapter_tensors([wanted[key] for key in missing], self._device, self._dtype)
            embeddings = self._encode_text(tokens, extras)  # (N, 77, D)
            for key, emb in zip(missing, embeddings):
                self._cache[key] = emb
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        text_ms = (time.perf_counter() - start) * 1e3 if missing else 0.0
        for request in {s.request for s in samples}:
            request.timings.text_ms += text_ms
        for s in samples:
            p = s.request.params
            weights = tuple((a.uid, a.scale) for a in text_adapters(s.request.adapters))
            s.cond = self._cache[(p.prompt_ids, weights)]
            self._cache.move_to_end((p.prompt_ids, weights))
            if p.guided:
                s.uncond = self._cache[(p.negative_ids, weights)]
