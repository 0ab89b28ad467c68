"""Iteration-level batching: requests join and leave one running batch, and nobody notices."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from conftest import reference_image

from lcmserve import AsyncClient, Client, DeadlineExceededError, Image, StepEvent

# 12 requests with mixed seeds, steps, sizes and guidance, run together.
CASES = [
    # prompt, steps, seed, width, height, guidance
    ("a crack in a concrete wall", 1, 11, 64, 64, 1.0),
    ("a crack in a concrete wall", 2, 12, 64, 64, 1.0),
    ("spalling concrete", 4, 13, 64, 64, 1.0),
    ("spalling concrete", 8, 14, 64, 64, 1.0),
    ("hairline crack", 4, 15, 64, 96, 1.0),
    ("hairline crack", 2, 16, 96, 64, 2.0),
    ("wet wall with a crack", 8, 17, 64, 64, 3.0),
    ("wet wall with a crack", 1, 18, 64, 64, 1.5),
    ("a wall", 4, 19, 128, 64, 1.0),
    ("a wall", 8, 20, 64, 64, 1.0),
    ("diagonal crack", 2, 21, 64, 64, 4.0),
    ("diagonal crack", 4, 22, 64, 128, 1.0),
    ("crack", 4, 23, 64, 64, 1.0),
]


def _pixels(image: Image) -> np.ndarray:
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 3).astype(int)


async def _run(target: str, case: tuple, timeout: float | None = None) -> np.ndarray:
    prompt, steps, seed, width, height, guidance = case
    async with AsyncClient(target) as client:
        result = await client.generate(prompt, num_inference_steps=steps, seed=seed, width=width, height=height,
                                       guidance_scale=guidance, output_format="raw", timeout=timeout)
    return _pixels(result.images[0])


def test_concurrent_mixed_requests_match_alone_and_diffusers(tiny_server: str, reference_pipe) -> None:
    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(_run(tiny_server, case) for case in CASES))

    batched = asyncio.run(together())
    for case, got in zip(CASES, batched):
        prompt, steps, seed, width, height, guidance = case
        alone = asyncio.run(_run(tiny_server, case))
        want = reference_image(reference_pipe, prompt, steps=steps, seed=seed, width=width, height=height,
                               guidance=guidance).astype(int)
        assert np.abs(got - alone).max() <= 1, f"{case}: batched differs from alone"
        assert np.abs(got - want).max() <= 1, f"{case}: differs from diffusers"


def test_cancelled_and_expired_requests_do_not_change_the_others(tiny_server: str) -> None:
    """Fill a batch; cancel some mid-way, let others time out; the rest get their own images."""
    keep = [("kept crack", 8, 100 + i, 128, 128, 1.0 + (i % 2)) for i in range(4)]

    async def cancel_after_first_step(seed: int) -> int:
        async with AsyncClient(tiny_server) as client:
            seen = 0
            stream = client.stream("cancelled", num_inference_steps=8, seed=seed, width=128, height=128)
            async with contextlib.aclosing(stream):  # leaving the stream cancels the call
                async for event in stream:
                    if isinstance(event, StepEvent):
                        seen += 1
                        break
            return seen

    async def expire(seed: int) -> str:
        try:
            await _run(tiny_server, ("expired", 8, seed, 256, 256, 2.0), timeout=0.3)
        except DeadlineExceededError as exc:
            return exc.code or "DEADLINE_EXCEEDED"
        return "finished"

    async def together() -> tuple:
        return await asyncio.gather(*(_run(tiny_server, c) for c in keep),
                                    *(cancel_after_first_step(s) for s in (1, 2, 3)),
                                    *(expire(s) for s in (4, 5)))

    results = asyncio.run(together())
    kept, cancelled, expired = results[:4], results[4:7], results[7:]
    assert all(n == 1 for n in cancelled)
    assert all(code == "DEADLINE_EXCEEDED" for code in expired), expired
    for case, got in zip(keep, kept):
        alone = asyncio.run(_run(tiny_server, case))
        assert np.abs(got - alone).max() <= 1, f"{case} changed by its neighbours"
    with Client(tiny_server) as client:  # and the server goes on serving
        assert len(client.generate("after", num_inference_steps=1, width=64, height=64).images) == 1
