"""img2img and inpainting: the server's images are diffusers' own img2img and inpaint pipelines'
images (same weights, seed, strength: within 1/255), batched with anything else at every step."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest

from lcmserve import AsyncClient, Client, Image, InvalidArgumentError, StepEvent, Summary

PROMPT = "a long crack across a concrete wall"


def wall_photo(width: int = 70, height: int = 67, seed: int = 0) -> bytes:
    """A synthetic 'wall photo' PNG: a grey gradient with speckle and a dark diagonal line. The odd
    size checks the floor to a multiple of 8 (and the Lanczos resize) against diffusers'."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    grey = 90 + 80 * x / width + 40 * y / height + rng.normal(0, 12, (height, width))
    grey[np.abs(y - x * height / width) < 2] -= 70
    rgb = np.stack([grey, grey * 0.95, grey * 0.9], axis=-1).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def stroke_mask(width: int, height: int, kind: str) -> bytes:
    """A mask PNG, white = repaint: a thick white stroke (a crack to paint), or a white box."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    mask = PILImage.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "stroke":
        draw.line([(4, height - 6), (width - 8, 5)], fill=255, width=12)
    else:
        draw.rectangle([width // 4, height // 3, width - 10, height - 12], fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def pil(data: bytes):  # type: ignore[no-untyped-def]
    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(data))


def pixels(image: Image) -> np.ndarray:
    assert image.format == "raw"
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 3).astype(int)


@pytest.fixture(scope="module")
def img2img_pipe(reference_pipe):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pipe(reference_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint_pipe(reference_pipe):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pipe(reference_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, *, image: bytes, mask: bytes | None = None, prompt: str = PROMPT, steps: int, strength: float,  # type: ignore[no-untyped-def]
              seed: int, guidance: float = 1.0, negative_prompt: str | None = None,
              width: int | None = None, height: int | None = None) -> np.ndarray:
    """diffusers' image for one seed as int (H, W, 3), rounded as its PIL output is."""
    import torch

    kwargs = dict(image=pil(image), num_inference_steps=steps, strength=strength, guidance_scale=guidance,
                  negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="np")
    if mask is not None:  # the inpaint pipeline defaults its size to the UNet's, not the image's
        kwargs.update(mask_image=pil(mask), width=width, height=height)
    elif width is not None:  # the img2img pipeline takes no size: VaeImageProcessor resizes as the server does
        kwargs.update(image=pipe.image_processor.resize(pil(image), height, width))
    out = pipe(prompt, **kwargs).images[0]
    return (out * 255).round().astype(np.uint8).astype(int)


@pytest.mark.parametrize(("strength", "steps"), [(0.3, 4), (0.6, 4), (1.0, 4), (0.6, 2), (0.6, 8)])
def test_img2img_matches_diffusers(tiny_server: str, img2img_pipe, strength: float, steps: int) -> None:
    photo, seed = wall_photo(), 700 + steps + int(strength * 10)
    with Client(tiny_server) as client:
        events = list(client.stream(PROMPT, init_image=photo, strength=strength, num_inference_steps=steps,
                                    seed=seed, output_format="raw", preview_mode="approx"))
    run = min(int(steps * strength), steps)
    step_events = [e for e in events if isinstance(e, StepEvent)]
    images = [e for e in events if isinstance(e, Image)]
    summary = events[-1]
    assert isinstance(summary, Summary) and summary.num_steps == run
    assert [e.step for e in step_events] == list(range(run)) and all(e.num_steps == run for e in step_events)
    assert all(e.preview is not None for e in step_events)
    assert (images[0].width, images[0].height) == (64, 64), "70x67 floors to 64x64, as diffusers does"

    got = pixels(images[0])
    want = reference(img2img_pipe, image=photo, steps=steps, strength=strength, seed=seed)
    assert np.abs(got - want).max() <= 1, f"max pixel difference {np.abs(got - want).max()} > 1/255"
    assert got.std() > 5


@pytest.mark.parametrize(("kind", "strength", "steps"), [("stroke", 1.0, 4), ("box", 0.6, 4)])
def test_inpainting_matches_diffusers(tiny_server: str, inpaint_pipe, kind: str, strength: float,
                                      steps: int) -> None:
    photo, mask = wall_photo(80, 72, seed=1), stroke_mask(80, 72, kind)
    seed = 900 + len(kind)
    with Client(tiny_server) as client:
        events = list(client.stream(PROMPT, init_image=photo, mask_image=mask, strength=strength,
                                    num_inference_steps=steps, seed=seed, width=80, height=72,
                                    output_format="raw", preview_mode="full"))
    step_events = [e for e in events if isinstance(e, StepEvent)]
    assert all(e.preview is not None and (e.preview.width, e.preview.height) == (80, 72) for e in step_events)
    got = pixels(next(e for e in events if isinstance(e, Image)))
    want = reference(inpaint_pipe, image=photo, mask=mask, steps=steps, strength=strength, seed=seed,
                     width=80, height=72)
    assert got.shape == (72, 80, 3)
    assert np.abs(got - want).max() <= 1, f"max pixel difference {np.abs(got - want).max()} > 1/255"


def test_resize_guidance_and_sdk_image_inputs(tiny_server: str, img2img_pipe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Given sides resize the image as VaeImageProcessor does; guidance works; a path and a PIL image
    send the same picture as its bytes."""
    photo = wall_photo(100, 90, seed=2)
    path = tmp_path / "wall.png"
    path.write_bytes(photo)
    kwargs = dict(strength=0.75, num_inference_steps=4, seed=31, width=64, height=72, guidance_scale=2.0,
                  negative_prompt="blurry", output_format="raw")
    with Client(tiny_server) as client:
        by_bytes = client.generate(PROMPT, init_image=photo, **kwargs)
        by_path = client.generate(PROMPT, init_image=str(path), **kwargs)
        by_pil = client.generate(PROMPT, init_image=pil(photo), **kwargs)
    got = pixels(by_bytes.images[0])
    assert got.shape == (72, 64, 3) and by_bytes.summary.num_steps == 3
    assert by_path.images[0].data == by_bytes.images[0].data == by_pil.images[0].data
    want = reference(img2img_pipe, image=photo, steps=4, strength=0.75, seed=31, guidance=2.0,
                     negative_prompt="blurry", width=64, height=72)
    assert np.abs(got - want).max() <= 1


# 12 requests together: text-to-image, img2img and inpainting, mixed steps, sizes and guidance.
MIXED = [
    # (steps, seed, width, height, guidance, strength or None, mask kind or None)
    (4, 41, 64, 64, 1.0, None, None),
    (2, 42, 64, 64, 2.0, None, None),
    (8, 43, 64, 80, 1.0, None, None),
    (4, 44, 64, 64, 1.0, 0.5, None),
    (8, 45, 64, 64, 1.0, 0.3, None),
    (4, 46, 64, 80, 3.0, 1.0, None),
    (2, 47, 80, 64, 1.0, 0.6, None),
    (4, 48, 64, 64, 1.0, 1.0, "stroke"),
    (4, 49, 64, 64, 2.0, 0.6, "box"),
    (8, 50, 64, 80, 1.0, 0.8, "stroke"),
    (1, 51, 64, 64, 1.0, 1.0, "box"),
    (4, 52, 80, 64, 1.0, None, None),
]


async def _mixed(target: str, case: tuple) -> np.ndarray:
    steps, seed, width, height, guidance, strength, mask = case
    image_fields: dict = {}
    if strength is not None:
        image_fields = dict(init_image=wall_photo(width + 3, height + 5, seed=seed), strength=strength)
        if mask is not None:
            image_fields["mask_image"] = stroke_mask(width, height, mask)
    async with AsyncClient(target) as client:
        result = await client.generate(PROMPT, num_inference_steps=steps, seed=seed, width=width, height=height,
                                       guidance_scale=guidance, output_format="raw", **image_fields)
    return pixels(result.images[0])


def test_mixed_batch_of_text_img2img_and_inpainting_requests(tiny_server: str, inpaint_pipe) -> None:
    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(_mixed(tiny_server, case) for case in MIXED))

    batched = asyncio.run(together())
    for case, got in zip(MIXED, batched):
        alone = asyncio.run(_mixed(tiny_server, case))
        assert np.abs(got - alone).max() <= 1, f"{case}: batched differs from alone"
    # and one inpainting case of the batch against diffusers itself
    steps, seed, width, height, guidance, strength, mask = MIXED[8]
    want = reference(inpaint_pipe, image=wall_photo(width + 3, height + 5, seed=seed),
                     mask=stroke_mask(width, height, mask), steps=steps, strength=strength, seed=seed,
                     guidance=guidance, width=width, height=height)
    assert np.abs(batched[8] - want).max() <= 1


def _big_png(side: int) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("L", (side, side), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="GIF")
    return buffer.getvalue()


BAD_IMAGES = [
    # (field, words in its description, request fields)
    ("init_image", "not a PNG, JPEG or WEBP", dict(init_image=b"not an image at all")),
    ("init_image", "GIF", dict(init_image=_gif())),
    ("init_image", "does not decode", dict(init_image=wall_photo()[:200])),
    ("init_image", "bytes; the limit", dict(init_image=b"\x89PNG" + bytes(3_300_000))),
    ("init_image", "pixels; the limit", dict(init_image=_big_png(4200))),
    ("mask_image", "without init_image", dict(mask_image=stroke_mask(64, 64, "box"))),
    ("mask_image", "not a PNG, JPEG or WEBP", dict(init_image=wall_photo(), mask_image=b"garbage")),
    ("strength", "without init_image", dict(strength=0.5)),
    ("strength", "the range", dict(init_image=wall_photo(), strength=0.0)),
    ("strength", "the range", dict(init_image=wall_photo(), strength=1.5)),
    ("strength", "0 of the 4 steps", dict(init_image=wall_photo(), strength=0.2, num_inference_steps=4)),
    ("width", "multiple of 8", dict(init_image=wall_photo(), width=70)),
]


def test_each_bad_image_field_is_invalid_argument_and_the_server_goes_on(tiny_server: str) -> None:
    with Client(tiny_server) as client:
        info = client.model_info()
        assert info.limits.max_image_bytes >= 1024 * 1024 * 3 and info.limits.max_image_pixels >= 1024 * 1024
        for field, words, fields in BAD_IMAGES:
            with pytest.raises(InvalidArgumentError) as caught:
                client.generate(PROMPT, num_inference_steps=fields.pop("num_inference_steps", 2), **fields)
            violations = {v.field: v.description for v in caught.value.field_violations}
            assert field in violations, (field, words, violations)
            assert words in violations[field], (field, words, violations)
        result = client.generate(PROMPT, init_image=wall_photo(), num_inference_steps=2, output_format="raw")
        assert len(result.images) == 1 and result.summary.num_steps == 1


def _lcmserve(*args: str):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lcmserve.cli", *args], capture_output=True, text=True, timeout=180)


def test_cli_generate_and_bench_take_an_init_image_and_a_mask(tiny_server: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wall, mask, out = tmp_path / "wall.png", tmp_path / "mask.png", tmp_path / "painted.png"
    wall.write_bytes(wall_photo(72, 64))
    mask.write_bytes(stroke_mask(72, 64, "stroke"))
    done = _lcmserve("generate", PROMPT, "--target", tiny_server, "--init-image", str(wall), "--mask", str(mask),
                     "--strength", "0.75", "--seed", "5", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert pil(out.read_bytes()).size == (72, 64), "the init image's size, as diffusers defaults it"
    missing = _lcmserve("generate", PROMPT, "--target", tiny_server, "--init-image", str(tmp_path / "no.png"))
    assert missing.returncode == 2 and "no.png" in missing.stderr and "Traceback" not in missing.stderr
    report = tmp_path / "bench.json"
    bench = _lcmserve("bench", "--target", tiny_server, "--concurrency", "2", "--requests", "4", "--warmup", "1",
                      "--width", "64", "--height", "64", "--init-image", str(wall), "--mask", str(mask),
                      "--strength", "0.5", "--no-progress", "--json", str(report))
    assert bench.returncode == 0, bench.stderr
    import json

    data = json.loads(report.read_text())
    assert data["config"]["shape"]["init_image"].endswith("bytes"), data["config"]["shape"]


def test_each_image_of_an_img2img_request_is_reproducible_by_its_own_seed(tiny_server: str) -> None:
    photo, mask = wall_photo(64, 64, seed=4), stroke_mask(64, 64, "box")
    kwargs = dict(init_image=photo, mask_image=mask, strength=0.8, num_inference_steps=4, output_format="raw")
    with Client(tiny_server) as client:
        batch = client.generate(PROMPT, seed=60, num_images=3, **kwargs)
        alone = client.generate(PROMPT, seed=62, **kwargs)
    by_index = {im.index: im for im in batch.images}
    assert [by_index[i].seed for i in range(3)] == [60, 61, 62] and batch.summary.num_steps == 3
    assert np.abs(pixels(by_index[2]) - pixels(alone.images[0])).max() <= 1
    assert not np.array_equal(pixels(by_index[0]), pixels(by_index[1]))


@pytest.mark.slow
def test_onnx_artifact_serves_img2img_with_its_compiled_encoder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The VAE encoder is exported with the other parts (aoti and onnx); onnx is the quick one to
    export here. Its img2img and inpainting images are diffusers' images from the artifact's model/."""
    import torch
    from conftest import ServerProcess
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from lcmserve.export.fuse import export_model

    out = tmp_path / "tiny-onnx"
    export_model("tiny", [], out, dtype=torch.float32, device="cpu", backend="onnx", progress=False)
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(out / "model", safety_checker=None,
                                                             requires_safety_checker=False)
    img2img.scheduler = LCMScheduler.from_config(img2img.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    inpaint = StableDiffusionInpaintPipeline.from_pipe(img2img)
    server = ServerProcess("--model", str(out), "--backend", "onnx", "--metrics-port", "0")
    try:
        photo, mask = wall_photo(72, 64, seed=9), stroke_mask(72, 64, "stroke")
        with Client(server.target) as client:
            assert client.model_info().backend == "onnx"
            plain = client.generate(PROMPT, init_image=photo, strength=0.6, num_inference_steps=4, seed=3,
                                    output_format="raw")
            masked = client.generate(PROMPT, init_image=photo, mask_image=mask, strength=1.0, num_inference_steps=2,
                                     seed=4, output_format="raw")
        want = reference(img2img, image=photo, steps=4, strength=0.6, seed=3)
        assert np.abs(pixels(plain.images[0]) - want).max() <= 1
        want = reference(inpaint, image=photo, mask=mask, steps=2, strength=1.0, seed=4, width=72, height=64)
        assert np.abs(pixels(masked.images[0]) - want).max() <= 1
        assert "no compiled VAE encoder" not in server.log()
    finally:
        server.stop()
