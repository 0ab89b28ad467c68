"""The server's images are diffusers' images: same weights, same seed, same pixels (within 1/255)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import reference_image

from lcmserve import Client, Image, StepEvent, Summary


def raw_pixels(image: Image) -> np.ndarray:
    assert image.format == "raw"
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 3)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_raw_image_matches_diffusers(tiny_server: str, reference_pipe, steps: int) -> None:
    prompt, seed = "a single split crack on a concrete wall", 1234 + steps
    with Client(tiny_server) as client:
        events = list(client.stream(prompt, num_inference_steps=steps, seed=seed, width=64, height=64,
                                    output_format="raw", preview_mode="approx"))
    step_events = [e for e in events if isinstance(e, StepEvent)]
    images = [e for e in events if isinstance(e, Image)]
    assert [e.step for e in step_events] == list(range(steps)), "one step event per LCM step, in order"
    assert all(e.num_steps == steps and e.preview is not None for e in step_events)
    timesteps = [e.timestep for e in step_events]
    assert timesteps == sorted(timesteps, reverse=True) and all(0 <= t < 1000 for t in timesteps)
    assert isinstance(events[-1], Summary) and len(images) == 1 and images[0].seed == seed

    got = raw_pixels(images[0]).astype(int)
    want = reference_image(reference_pipe, prompt, steps=steps, seed=seed).astype(int)
    assert np.abs(got - want).max() <= 1, f"max pixel difference {np.abs(got - want).max()} > 1/255"
    assert got.std() > 5, "a constant image would make this comparison meaningless"


def test_guided_image_with_negative_prompt_matches_diffusers(tiny_server: str, reference_pipe) -> None:
    kwargs = dict(num_inference_steps=4, seed=99, width=72, height=64, guidance_scale=2.5)
    with Client(tiny_server) as client:
        result = client.generate("hairline crack", negative_prompt="blurry", output_format="raw", **kwargs)
    got = raw_pixels(result.images[0]).astype(int)
    want = reference_image(reference_pipe, "hairline crack", steps=4, seed=99, width=72, height=64,
                           guidance=2.5, negative_prompt="blurry").astype(int)
    assert got.shape == (64, 72, 3)
    assert np.abs(got - want).max() <= 1


def test_each_image_of_a_request_is_reproducible_by_its_own_seed(tiny_server: str) -> None:
    with Client(tiny_server) as client:
        batch = client.generate("cracked wall", num_inference_steps=2, seed=500, num_images=3,
                                width=64, height=64, output_format="raw")
        alone = client.generate("cracked wall", num_inference_steps=2, seed=502, width=64, height=64,
                                output_format="raw")
    by_index = {im.index: im for im in batch.images}
    assert sorted(by_index) == [0, 1, 2] and [by_index[i].seed for i in range(3)] == [500, 501, 502]
    assert np.abs(raw_pixels(by_index[2]).astype(int) - raw_pixels(alone.images[0]).astype(int)).max() <= 1
    assert not np.array_equal(raw_pixels(by_index[0]), raw_pixels(by_index[1]))


def test_encoded_formats_and_latents(tiny_server: str) -> None:
    from PIL import Image as PILImage
    import io

    with Client(tiny_server) as client:
        for fmt, magic in (("jpeg", b"\xff\xd8"), ("png", b"\x89PNG"), ("webp", b"RIFF")):
            result = client.generate("wall", num_inference_steps=1, seed=1, width=64, height=80,
                                     output_format=fmt, include_latents=True)
            image = result.images[0]
            assert image.data.startswith(magic) and image.format == fmt
            assert PILImage.open(io.BytesIO(image.data)).size == (64, 80)
            assert image.latents is not None and image.latents.shape == (4, 10, 8)
        full = list(client.stream("wall", num_inference_steps=2, seed=3, width=64, height=64,
                                  output_format="png", preview_mode="full"))
    previews = [e.preview for e in full if isinstance(e, StepEvent)]
    assert all(p is not None and (p.width, p.height) == (64, 64) for p in previews)


def test_seed_is_chosen_and_returned_when_absent(tiny_server: str) -> None:
    with Client(tiny_server) as client:
        first = client.generate("wall", num_inference_steps=1, width=64, height=64, output_format="raw")
        again = client.generate("wall", num_inference_steps=1, width=64, height=64, output_format="raw",
                                seed=first.summary.seed)
    assert first.images[0].seed == first.summary.seed
    assert first.images[0].data == again.images[0].data
