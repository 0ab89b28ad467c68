"""The tiny autoencoder (TAESD): exported with the artifact, served as a decoder and as previews.

Reference: diffusers' StableDiffusionPipeline from DIR/model with vae=AutoencoderTiny.from_pretrained
(DIR/tiny_vae) and the LCMScheduler gives, seed for seed, the server's DECODER_TINY_VAE image within
1/255, alone and batched with DECODER_VAE requests.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import ServerProcess, reference_image

from lcmserve import AsyncClient, Client, Image, InvalidArgumentError, StepEvent

PROMPT = "a crack in a concrete wall"


def _pixels(image: Image) -> np.ndarray:
    assert image.format == "raw"
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 3).astype(int)


@pytest.fixture(scope="module")
def tiny_vae_source() -> pathlib.Path:
    """The tiny preset's AutoencoderTiny as a plain folder (what `--tiny-vae FOLDER` reads)."""
    from lcmserve.export.tiny_vae import preset_tiny_vae_dir

    return preset_tiny_vae_dir("tiny")


@pytest.fixture(scope="module")
def tiny_vae_artifact(tiny_artifact: pathlib.Path, tiny_vae_source: pathlib.Path,
                      tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """`lcmserve export --base <tiny artifact> --tiny-vae FOLDER`: the fused model plus tiny_vae/."""
    import torch

    from lcmserve.export.fuse import export_model

    out = tmp_path_factory.mktemp("tiny-vae") / "artifact"
    export_model(str(tiny_artifact), [], out, dtype=torch.float32, device="cpu", progress=False,
                 tiny_vae=str(tiny_vae_source))
    return out


@pytest.fixture(scope="module")
def tiny_vae_server(tiny_vae_artifact: pathlib.Path) -> Iterator[str]:
    server = ServerProcess("--model", str(tiny_vae_artifact), "--metrics-port", "-1")
    try:
        yield server.target
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_reference(tiny_vae_artifact: pathlib.Path):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_vae_artifact / "model", vae=AutoencoderTiny.from_pretrained(tiny_vae_artifact / "tiny_vae"),
        safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_export_records_the_tiny_vae_and_its_sha256(tiny_vae_artifact: pathlib.Path,
                                                     tiny_vae_source: pathlib.Path) -> None:
    from lcmserve.export.tiny_vae import WEIGHTS_NAME, file_sha256

    record = json.loads((tiny_vae_artifact / "manifest.json").read_text())["tiny_vae"]
    assert record["kind"] == "folder" and record["source"] == str(tiny_vae_source)
    assert record["sha256"] == file_sha256(tiny_vae_artifact / "tiny_vae" / WEIGHTS_NAME)
    assert record["source_sha256"] == file_sha256(tiny_vae_source / WEIGHTS_NAME)
    assert json.loads((tiny_vae_artifact / "tiny_vae" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"


def test_model_info_lists_the_decoders(tiny_vae_server: str, tiny_server: str) -> None:
    with Client(tiny_vae_server) as client:
        info = client.model_info()
    assert info.decoders == ["vae", "tiny_vae"] and info.default_decoder == "vae"
    assert info.jpeg_encoder in ("host", "gpu") and (info.device != "cpu" or info.jpeg_encoder == "host")
    with Client(tiny_server) as client:
        plain = client.model_info()
    assert plain.decoders == ["vae"] and plain.default_decoder == "vae"


@pytest.mark.parametrize(("steps", "seed", "width", "height"), [(4, 7, 64, 64), (2, 8, 72, 64), (4, 9, 64, 128)])
def test_tiny_vae_image_matches_diffusers(tiny_vae_server: str, tiny_reference, steps: int, seed: int,  # type: ignore[no-untyped-def]
                                          width: int, height: int) -> None:
    with Client(tiny_vae_server) as client:
        result = client.generate(PROMPT, num_inference_steps=steps, seed=seed, width=width, height=height,
                                 output_format="raw", decoder="tiny_vae")
    got = _pixels(result.images[0])
    want = reference_image(tiny_reference, PROMPT, steps=steps, seed=seed, width=width, height=height).astype(int)
    assert got.shape == (height, width, 3)
    assert np.abs(got - want).max() <= 1, f"max pixel difference {np.abs(got - want).max()} > 1/255"
    assert got.std() > 5, "a constant image would make this comparison meaningless"


def test_tiny_and_vae_requests_batched_together_match_their_references(  # type: ignore[no-untyped-def]
        tiny_vae_server: str, tiny_reference, reference_pipe) -> None:
    cases = [(seed, decoder, width) for seed, (decoder, width) in
             enumerate([("tiny_vae", 64), ("vae", 64), ("tiny_vae", 64), ("vae", 72), ("tiny_vae", 72),
                         ("unspecified", 64)], start=40)]

    async def run(seed: int, decoder: str, width: int) -> np.ndarray:
        async with AsyncClient(tiny_vae_server) as client:
            result = await client.generate(PROMPT, num_inference_steps=3, seed=seed, width=width, height=64,
                                           output_format="raw", decoder=decoder)  # type: ignore[arg-type]
        return _pixels(result.images[0])

    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(run(*case) for case in cases))

    for (seed, decoder, width), got in zip(cases, asyncio.run(together())):
        pipe = tiny_reference if decoder == "tiny_vae" else reference_pipe  # unspecified: the default, vae
        want = reference_image(pipe, PROMPT, steps=3, seed=seed, width=width, height=64).astype(int)
        assert np.abs(got - want).max() <= 1, f"seed {seed} {decoder}: differs from diffusers"


def test_tiny_vae_previews_are_full_size_one_per_step(tiny_vae_server: str) -> None:
    with Client(tiny_vae_server) as client:
        events = list(client.stream(PROMPT, num_inference_steps=3, seed=5, width=64, height=80, output_format="raw",
                                    preview_mode="tiny_vae", decoder="tiny_vae"))
    steps = [e for e in events if isinstance(e, StepEvent)]
    image = next(e for e in events if isinstance(e, Image))
    assert [e.step for e in steps] == [0, 1, 2]
    assert all(e.preview is not None and (e.preview.width, e.preview.height) == (64, 80) for e in steps)
    last = steps[-1].preview
    assert last is not None and last.data == image.data, "the last step's preview is the final denoised decode"
    assert steps[0].preview is not None and steps[0].preview.data != last.data


@pytest.mark.parametrize("field", ["decoder", "preview_mode"])
def test_a_model_without_a_tiny_vae_refuses_it(tiny_server: str, field: str) -> None:
    with Client(tiny_server) as client, pytest.raises(InvalidArgumentError) as info:
        client.generate(PROMPT, num_inference_steps=1, seed=1, width=64, height=64, **{field: "tiny_vae"})  # type: ignore[arg-type]
    assert field in str(info.value) and "tiny autoencoder" in str(info.value)


def test_serve_loads_a_tiny_vae_for_a_plain_model_and_its_default(tiny_artifact: pathlib.Path,
                                                                   tiny_vae_source: pathlib.Path) -> None:
    """`serve --model DIR/model --tiny-vae FOLDER --default-decoder tiny-vae`, at the loader."""
    from lcmserve.server.model.loader import LoadError, load_runtime

    runtime = load_runtime(str(tiny_artifact / "model"), device="cpu", tiny_vae=str(tiny_vae_source),
                           default_decoder="tiny-vae")
    assert runtime.spec.decoders == ("vae", "tiny_vae") and runtime.spec.default_decoder == "tiny_vae"
    assert runtime.tiny_vae_decode is not None and runtime.spec.tiny_vae is not None
    with pytest.raises(LoadError, match="--default-decoder tiny-vae needs a tiny autoencoder"):
        load_runtime(str(tiny_artifact / "model"), device="cpu", default_decoder="tiny-vae")


# ---- JPEG on the GPU: the selection and routing logic, on the CPU ------------------------------------


def _pil_encode_jpeg(images: list, quality: int) -> list:  # type: ignore[type-arg]
    """A stand-in for torchvision.io.encode_jpeg's list form (the CPU has no nvjpeg): PIL's JPEG."""
    import io

    import torch
    from PIL import Image as PILImage

    out = []
    for chw in images:
        buf = io.BytesIO()
        PILImage.fromarray(chw.permute(1, 2, 0).contiguous().numpy()).save(buf, format="JPEG", quality=quality)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def test_jpeg_encoder_selection() -> None:
    import torch

    from lcmserve.server.engine.encode import GpuJpeg, select_jpeg_encoder

    def missing(device: torch.device):  # type: ignore[no-untyped-def]
        raise ImportError("No module named 'torchvision'")

    def broken(device: torch.device):  # type: ignore[no-untyped-def]
        raise RuntimeError("nvjpeg unavailable")

    calls: list[torch.device] = []

    def works(device: torch.device):  # type: ignore[no-untyped-def]
        calls.append(device)
        return _pil_encode_jpeg

    assert select_jpeg_encoder(torch.device("cpu"), works) is None and not calls, "never on a CPU device"
    assert select_jpeg_encoder(torch.device("cuda", 0), missing) is None
    assert select_jpeg_encoder(torch.device("cuda", 0), broken) is None
    assert isinstance(select_jpeg_encoder(torch.device("cuda", 1), works), GpuJpeg)
    assert calls == [torch.device("cuda", 1)]
    assert select_jpeg_encoder(torch.device("cpu")) is None  # the real loader, on this machine


def test_gpu_jpeg_rows_come_back_encoded_and_the_others_as_pixels(tiny_vae_source: pathlib.Path) -> None:
    """Decoders with a GPU JPEG encoder: rows with a JPEG quality come back as JPEG Pictures of the
    same pixels, the others as host pixels, in row order."""
    import torch

    from lcmserve.server.config import EngineConfig
    from lcmserve.server.engine.decoders import Decoders
    from lcmserve.server.engine.encode import GpuJpeg, encode
    from lcmserve.server.model.loader import load_runtime
    from lcmserve.server.protocol import Picture

    runtime = load_runtime("tiny", device="cpu", tiny_vae=str(tiny_vae_source))
    plain = Decoders(runtime, EngineConfig(vae_batch_size=2), graphs=False)
    gpu = Decoders(runtime, EngineConfig(vae_batch_size=2), graphs=False, gpu_jpeg=GpuJpeg(_pil_encode_jpeg))
    assert (plain.jpeg_encoder, gpu.jpeg_encoder) == ("host", "gpu") and gpu.names == ("vae", "tiny_vae")
    latents = torch.randn(3, 4, 8, 10, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = plain("tiny_vae", latents, torch.float32)
        got = gpu("tiny_vae", latents, torch.float32, [95, None, 90])
    assert all(isinstance(w, torch.Tensor) and w.shape == (64, 80, 3) for w in want)
    assert isinstance(got[1], torch.Tensor) and torch.equal(got[1], want[1])  # type: ignore[arg-type]
    for i, quality in ((0, 95), (2, 90)):
        picture = got[i]
        assert isinstance(picture, Picture) and picture.format == "jpeg" and (picture.width, picture.height) == (80, 64)
        host, _ = encode(want[i].numpy(), "jpeg", quality)  # type: ignore[union-attr]  # the same pixels, on the host
        assert picture.data == host.data, f"row {i}: not the JPEG of its own pixels at quality {quality}"


def test_sdk_and_cli_names_of_the_decoders() -> None:
    import typing

    from lcmserve import names
    from lcmserve._convert import build_generate_request
    from lcmserve.options import GenerateOptions
    from lcmserve.types import Decoder
    from lcmserve.v1 import generation_pb2 as pb

    assert typing.get_args(Decoder) == (names.DEFAULT_DECODER, *names.DECODER_VALUES)
    assert names.PREVIEW_MODE_VALUES["tiny_vae"] == pb.PREVIEW_MODE_TINY_VAE
    assert build_generate_request("x").decoder == pb.DECODER_UNSPECIFIED
    request = build_generate_request("x", GenerateOptions(decoder="tiny_vae"), preview_mode="tiny-vae")  # type: ignore[arg-type]
    assert request.decoder == pb.DECODER_TINY_VAE and request.preview_mode == pb.PREVIEW_MODE_TINY_VAE
    assert build_generate_request("x", decoder="VAE").decoder == pb.DECODER_VAE  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decoder='taesd' is not one of"):
        build_generate_request("x", decoder="taesd")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "aoti", "compile"])
def test_compiled_backends_serve_the_tiny_decoder_as_eager(backend: str, tmp_path: pathlib.Path) -> None:
    """A compiled artifact exported with --tiny-vae has the tiny decoder as a compiled part and serves
    it (docs/backends.md), its pixels within 2/255 of the eager runtime's; another tiny autoencoder
    given at serve time runs eagerly. compile: its cache holds the tiny decoder, warmed at the VAE
    decoder's warm shapes (no file of its own)."""
    import torch

    from lcmserve.export.fuse import export_model
    from lcmserve.server.model.loader import load_runtime

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / backend
    export_model("tiny", [], out, dtype="float32", device="cpu", backend=backend, progress=False, tiny_vae="tiny")
    compiled = load_runtime(str(out), backend=backend, device="cpu")
    eager = load_runtime(str(out), backend="eager", device="cpu")
    assert compiled.spec.backend == backend and compiled.spec.decoders == ("vae", "tiny_vae")
    assert compiled.tiny_vae_decode is not None and eager.tiny_vae_decode is not None
    entry = json.loads((out / "manifest.json").read_text())["compiled"][backend]
    if backend == "compile":
        assert entry["warm_shapes"]["tiny_vae_decoder"] == entry["warm_shapes"]["vae_decoder"]
    else:
        assert (out / entry["files"]["tiny_vae_decoder"]).is_file()
    assert "tiny_vae_decoder" in entry["parity_max_abs_diff"]
    assert compiled.spec.details.part("tiny_vae_decoder") == "compiled", "the compiled tiny decoder is not the one served"
    latents = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got, want = compiled.tiny_vae_decode(latents), eager.tiny_vae_decode(latents)
    assert got.shape == (3, 3, 64, 96)
    assert float(((got - want).abs() / 2).max()) <= 2 / 255
    other = load_runtime(str(out), backend=backend, device="cpu", tiny_vae="tiny")  # not the exported one
    assert other.spec.details.part("tiny_vae_decoder") == "eager" and other.tiny_vae_decode is not None


def test_the_edge_refuses_a_decoder_the_model_lacks_naming_the_field(tmp_path: pathlib.Path) -> None:
    """validate() with the model's decoders (service.py passes ModelSpec.decoders): every such field named."""
    from lcmserve.export.presets import write_tokenizer
    from lcmserve.server.edge.validation import InvalidRequest, validate
    from lcmserve.v1 import generation_pb2 as pb

    tokenizer = write_tokenizer(tmp_path)
    request = pb.GenerateRequest(prompt="a wall", decoder=pb.DECODER_TINY_VAE, preview_mode=pb.PREVIEW_MODE_TINY_VAE)
    with pytest.raises(InvalidRequest) as info:
        validate(request, tokenizer, decoders=("vae",))
    assert [field for field, _ in info.value.violations] == ["decoder", "preview_mode"]
    assert validate(request, tokenizer, decoders=("vae", "tiny_vae")).decoder == "tiny_vae"
    unset = pb.GenerateRequest(prompt="a wall")
    assert validate(unset, tokenizer, decoders=("vae", "tiny_vae"), default_decoder="tiny_vae").decoder == "tiny_vae"
    assert validate(unset, tokenizer).decoder == "unspecified"  # the engine resolves it
    with pytest.raises(InvalidRequest, match="not a known Decoder value"):
        validate(pb.GenerateRequest(prompt="a wall", decoder=7), tokenizer)  # type: ignore[arg-type]
