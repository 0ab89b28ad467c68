"""Best-of-N in the engine: scoring decoded images on the device, holding a request's candidates until
the last is decoded, and returning the best.

A request with `candidates` K is num_images * K samples (seeds seed .. seed + num_images * K - 1),
admitted and denoised like any others: its candidates share the UNet calls of everything in the batch.
When the engine has a scorer (server/model/scorer.py), every finished sample is scored where it is
decoded, on the device, per decode chunk (`ScoreBatch.collect` is handed the chunk's uint8 pixels
before they leave the device), with one copy of the scores to the host per finish (`values`).

    candidates 1   each image is encoded and sent as it finishes, with its score (when there is a scorer)
    candidates K   decoded candidates are held (`hold`); when the last one is decoded, `release`
                   ranks them by score, best first, ties to the smaller seed, encodes the best
                   num_images as images 0, 1, ... (each with its own seed and score: it is reproduced
                   alone with candidates 1) and returns every candidate's (seed, score, returned) for the
                   Summary. Dropped candidates are never encoded.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..protocol import CandidateScore, HostTensor, Picture
from .encode import encode_image_event
from .work import Held

if TYPE_CHECKING:
    from ..model.scorer import ClipScorer
    from .work import Request, Sample


class ScoreBatch:
    """The scores of one finish's samples, collected chunk by chunk while they are decoded."""

    def __init__(self, scorer: ClipScorer, samples: list[Sample]) -> None:
        self._scorer = scorer
        self._samples = samples
        self._parts: list[tuple[list[int], torch.Tensor]] = []  # (sample positions, (b,) scores on the device)

    def collect(self, rows: list[int]) -> Callable[[int, torch.Tensor], None]:
        """The decoder's per-chunk hook for the samples at positions `rows` (one decoder group): it is
        called with (first row of the chunk, (b, 3, H, W) uint8 pixels on the device)."""

        def on_pixels(start: int, pixels: torch.Tensor) -> None:
            chunk = rows[start: start + len(pixels)]
            texts = torch.stack([self._scorer.text_embedding(self._samples[j].request.score_ids) for j in chunk])
            self._parts.append((chunk, self._scorer.scores(pixels, texts)))

        return on_pixels

    def values(self) -> list[float | None]:
        """Each sample's score, by position (one copy to the host; the decode has waited already)."""
        out: list[float | None] = [None] * len(self._samples)
        if self._parts:
            flat = torch.cat([scores for _, scores in self._parts]).tolist()
            for j, value in zip([j for chunk, _ in self._parts for j in chunk], flat):
                out[j] = float(value)
        return out


def prepare(scorer: ClipScorer | None, request: Request) -> None:
    """At submit, off the loop thread: the prompt as the scorer's tokenizer reads it."""
    if scorer is not None:
        request.score_ids = scorer.tokenize(request.params.prompt)


def hold(request: Request, sample: Sample, pixels: torch.Tensor | Picture, latents: HostTensor | None,
         score: float | None) -> None:
    """Keep a decoded candidate until the last of its request is decoded."""
    assert score is not None, "candidates > 1 without a scorer (validation refuses it)"
    request.held.append(Held(sample.seed, pixels, latents, score))


def release(request: Request, pool: concurrent.futures.Executor) -> tuple[CandidateScore, ...]:
    """Rank the held candidates (score descending, ties to the smaller seed), encode the best num_images
    as images 0, 1, ... in that order, and return every candidate in seed order for the Summary."""
    ranked = sorted(request.held, key=lambda h: (-h.score, h.seed))
    best = ranked[: request.params.num_images]
    for rank, h in enumerate(best):
        request.events.put(pool.submit(encode_image_event, request, h.pixels, rank, h.seed, h.latents, h.score))
    returned = {h.seed for h in best}
    request.held = []
    return tuple(CandidateScore(h.seed, h.score, h.seed in returned) for h in sorted(ranked, key=lambda h: h.seed))
