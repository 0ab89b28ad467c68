"""The HTTP front door's OpenAI Images API, called with the official `openai` package (issue 22).

One server for the module (tiny artifact, --http-port 0, a bearer token): its images equal the gRPC
RAW images of the same seed, streaming sends partial images then completed, edits equal gRPC
inpainting, and refusals reach the SDK as its exceptions with the right status.
"""

from __future__ import annotations

import base64
import io
import pathlib
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from conftest import ServerProcess
from PIL import Image

from lcmserve import Client

TOKEN = "http-test-token"
SIDE = 64
STEPS = 4


@pytest.fixture(scope="module")
def server(tiny_artifact: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    process = ServerProcess("--model", str(tiny_artifact), "--http-port", "0", "--metrics-port", "-1",
                            "--auth-token-file", str(tokens))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{server.http_target}/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, token=TOKEN) as client:
        yield client


def _pixels(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _raw(client: Client, prompt: str, seed: int, **fields: object) -> np.ndarray:
    result = client.generate(prompt, seed=seed, width=SIDE, height=SIDE, num_inference_steps=STEPS,
                             output_format="raw", **fields)  # type: ignore[arg-type]
    return result.images[0].to_numpy().astype(np.int16)


def test_generate_equals_grpc_raw_of_the_same_seed(sdk: openai.OpenAI, grpc_client: Client) -> None:
    result = sdk.images.generate(prompt="a crack in a wall", size=f"{SIDE}x{SIDE}",  # type: ignore[arg-type]
                                 extra_body={"seed": 7, "num_inference_steps": STEPS})
    assert result.data is not None and len(result.data) == 1
    pixels = _pixels(result.data[0].b64_json)
    assert pixels.shape == (SIDE, SIDE, 3)
    assert (result.data[0].model_extra or {}).get("seed") == 7  # each image's seed, an extension field
    assert np.abs(pixels - _raw(grpc_client, "a crack in a wall", 7)).max() <= 1


def test_stream_sends_three_partials_then_completed(sdk: openai.OpenAI) -> None:
    stream = sdk.images.generate(prompt="a crack", size=f"{SIDE}x{SIDE}", stream=True,  # type: ignore[arg-type]
                                 partial_images=3, extra_body={"seed": 11, "num_inference_steps": STEPS})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [getattr(e, "partial_image_index", None) for e in events[:3]] == [0, 1, 2]
    for event in events:
        assert _pixels(event.b64_json).shape == (SIDE, SIDE, 3)
    assert (events[-1].model_extra or {}).get("seed") == 11


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_edit_with_an_alpha_mask_equals_grpc_inpainting(sdk: openai.OpenAI, grpc_client: Client) -> None:
    rng = np.random.default_rng(3)
    init = _png(Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)))
    repaint = np.zeros((SIDE, SIDE), dtype=bool)
    repaint[16:48, 8:40] = True
    white_mask = _png(Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8)))  # diffusers: white = repaint
    rgba = np.full((SIDE, SIDE, 4), 200, dtype=np.uint8)
    rgba[..., 3] = np.where(repaint, 0, 255)  # OpenAI: fully transparent = repaint
    alpha_mask = _png(Image.fromarray(rgba, "RGBA"))
    result = sdk.images.edit(image=("init.png", init, "image/png"), mask=("mask.png", alpha_mask, "image/png"),
                             prompt="a patched wall",
                             extra_body={"seed": 5, "num_inference_steps": STEPS, "strength": 0.75})
    assert result.data is not None
    expected = _raw(grpc_client, "a patched wall", 5, init_image=init, mask_image=white_mask, strength=0.75)
    assert np.abs(_pixels(result.data[0].b64_json) - expected).max() <= 1
    plain = sdk.images.edit(image=("init.png", init, "image/png"), mask=("mask.png", white_mask, "image/png"),
                            prompt="a patched wall",
                            extra_body={"seed": 5, "num_inference_steps": STEPS, "strength": 0.75})
    assert plain.data is not None and np.abs(_pixels(plain.data[0].b64_json) - expected).max() <= 1


def test_refusals_are_sdk_exceptions_with_the_right_status(server: ServerProcess, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk.images.generate(prompt="x", size="65x64")  # type: ignore[arg-type]
    assert bad_size.value.status_code == 400
    error = bad_size.value.body
    assert isinstance(error, dict) and error["param"] == "size" and "width: is 65" in error["message"]

    with pytest.raises(openai.BadRequestError) as bad_value:
        sdk.images.generate(prompt="x", size="64x64", output_format="gif")  # type: ignore[arg-type]
    assert isinstance(bad_value.value.body, dict) and bad_value.value.body["param"] == "output_format"

    with pytest.raises(openai.BadRequestError) as url:
        sdk.images.generate(prompt="x", size="64x64", response_format="url")
    assert isinstance(url.value.body, dict) and "b64_json" in url.value.body["message"]

    stranger = openai.OpenAI(base_url=f"http://{server.http_target}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        stranger.images.generate(prompt="x", size="64x64")  # type: ignore[arg-type]
    assert unauthenticated.value.status_code == 401

    with pytest.raises(openai.APIStatusError) as too_large:
        sdk.images.generate(prompt="x" * (2 * 1024 * 1024), size="64x64")  # type: ignore[arg-type]
    assert too_large.value.status_code == 413
    assert isinstance(too_large.value.body, dict) and "1048576 bytes" in too_large.value.body["message"]
