"""Best-of-N (issue 23): candidates scored by the CLIP scorer, the best returned.

One server for the module: the tiny model exported with the tiny scorer (`--scorer tiny`). The
reference is transformers itself: `CLIPModel.from_pretrained(DIR/scorer)` and `CLIPProcessor` on the
candidates' RAW images, each candidate generated alone (its seed, candidates 1). Engine behaviour
that needs no transport (sharing UNet calls, tie-breaking) is tested in process.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import ServerProcess
from engine_fixture import EngineHarness

from lcmserve import Client, GenerateResult, InvalidArgumentError

PROMPT = "a crack in a concrete wall"
SEED = 40
SHAPE = dict(width=64, height=64, num_inference_steps=2, output_format="raw")


@pytest.fixture(scope="module")
def scored_artifact(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """`lcmserve export --base tiny --scorer tiny`: float32 on the CPU, no LoRA."""
    import torch

    from lcmserve.export.fuse import export_model

    out = tmp_path_factory.mktemp("scored") / "tiny-scored"
    export_model("tiny", [], out, dtype=torch.float32, device="cpu", progress=False, scorer="tiny")
    return out


@pytest.fixture(scope="module")
def scored_server(scored_artifact: pathlib.Path) -> Iterator[str]:
    server = ServerProcess("--model", str(scored_artifact), "--metrics-port", "0")
    try:
        yield server.target
    finally:
        server.stop()


def _raw(result: GenerateResult) -> list[np.ndarray]:
    return [np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3) for i in result.images]


def _reference_scores(artifact: pathlib.Path, images: list[np.ndarray]) -> list[float]:
    """CLIPScore as torchmetrics defines it, with transformers' CLIPModel + CLIPProcessor."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(artifact / "scorer").eval()
    processor = CLIPProcessor.from_pretrained(artifact / "scorer")
    inputs = processor(text=[PROMPT], images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = (out.image_embeds @ out.text_embeds.T)[:, 0]
    return [float(s) for s in 100 * cosine.clamp(min=0)]


def test_the_best_candidates_are_returned_as_the_reference_ranks_them(scored_server: str,
                                                                       scored_artifact: pathlib.Path) -> None:
    with Client(scored_server) as client:
        info = client.model_info()
        best = client.generate(PROMPT, seed=SEED, num_images=2, candidates=3, **SHAPE)  # type: ignore[arg-type]
        every = client.generate(PROMPT, seed=SEED, num_images=6, **SHAPE)  # type: ignore[arg-type]  # seed + i alone
        alone = [client.generate(PROMPT, seed=image.seed, **SHAPE) for image in best.images]  # type: ignore[arg-type]
    assert info.scorer is not None and info.scorer.source == "tiny"  # as exported
    assert info.scorer.projection_dim == 32 and len(info.scorer.sha256) == 64 and info.limits.max_candidates == 8

    candidates = _raw(every)
    reference = _reference_scores(scored_artifact, candidates)
    assert max(reference) - min(reference) > 1.0, f"the tiny scorer must tell images apart: {reference}"
    ranked = sorted(range(6), key=lambda i: (-reference[i], i))  # ties: the smaller seed

    # Summary: every candidate in seed order, its score, whether it was returned.
    summary = best.summary.candidates
    assert [c.seed for c in summary] == [SEED + i for i in range(6)]
    for c, expected in zip(summary, reference):
        assert abs(c.score - expected) < 0.05, (c, expected)
    assert [c.returned for c in summary] == [i in ranked[:2] for i in range(6)]

    # The images: best first, index by rank, each its own seed and score, equal to its seed alone.
    assert [i.index for i in best.images] == [0, 1]
    assert [i.seed for i in best.images] == [SEED + i for i in ranked[:2]]
    for image, pixels, single in zip(best.images, _raw(best), alone):
        assert image.score is not None and abs(image.score - reference[image.seed - SEED]) < 0.05
        for same in (_raw(single)[0], candidates[image.seed - SEED]):  # its seed alone; in a batch of 6
            assert np.abs(pixels.astype(int) - same.astype(int)).max() <= 1

    # candidates 1 with a scorer: every image has its score; the summary lists no candidates.
    assert every.summary.candidates == ()
    for image, expected in zip(every.images, reference):
        assert image.score is not None and abs(image.score - expected) < 0.05

    # Step events: every candidate's, each saying which (image_index is the candidate too).
    assert {(s.candidate, s.step) for s in best.steps} == {(c, k) for c in range(6) for k in range(2)}
    assert all(s.candidate == s.image_index for s in best.steps)


@pytest.mark.parametrize("candidates", [0, 9])
def test_candidates_out_of_range_are_refused_naming_the_field(scored_server: str, candidates: int) -> None:
    with Client(scored_server) as client, pytest.raises(InvalidArgumentError) as info:
        client.generate(PROMPT, candidates=candidates, **SHAPE)  # type: ignore[arg-type]
    assert [v.field for v in info.value.field_violations] == ["candidates"]
    assert "1 to 8" in str(info.value)


def test_candidates_need_a_scorer(tiny_server: str) -> None:
    with Client(tiny_server) as client:
        assert client.model_info().scorer is None
        with pytest.raises(InvalidArgumentError) as info:
            client.generate(PROMPT, candidates=2, **SHAPE)  # type: ignore[arg-type]
        assert [v.field for v in info.value.field_violations] == ["candidates"]
        assert "no scorer" in str(info.value) and "--scorer" in str(info.value)
        assert client.generate(PROMPT, candidates=1, **SHAPE).images[0].score is None  # type: ignore[arg-type]


def test_a_scorer_that_is_not_clip_is_refused_at_export_and_at_serve(scored_artifact: pathlib.Path,
                                                                     tmp_path: pathlib.Path) -> None:
    from lcmserve.export.errors import ModelNotFoundError
    from lcmserve.export.fuse import export_model

    not_clip = scored_artifact / "model" / "unet"  # a diffusers UNet folder
    with pytest.raises(ModelNotFoundError, match="not a CLIP model"):
        export_model("tiny", [], tmp_path / "out", device="cpu", progress=False, scorer=str(not_clip))
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match="not a CLIP model"):
        ServerProcess("--model", "tiny", "--scorer", str(not_clip), "--metrics-port", "0")


# ---- in process: the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_engine(scored_artifact: pathlib.Path) -> Iterator[EngineHarness]:
    from lcmserve.server.model.loader import load_runtime

    harness = EngineHarness(load_runtime(str(scored_artifact), device="cpu"))
    try:
        yield harness
    finally:
        harness.close()


def test_candidates_of_concurrent_requests_share_unet_calls(scored_engine: EngineHarness) -> None:
    from lcmserve.server.protocol import UNetTiming

    first = scored_engine.submit(PROMPT, seed=1, num_images=1, candidates=3)
    second = scored_engine.submit("a dog", seed=7, num_images=2, candidates=2)
    del scored_engine.metrics[:]
    scored_engine.run(first, second)
    rows = [m.rows for m in scored_engine.metrics if isinstance(m, UNetTiming)]
    assert rows == [3 + 4, 3 + 4], rows  # both steps: every candidate of both requests in one call


def test_ties_go_to_the_smaller_seed(scored_engine: EngineHarness) -> None:
    from lcmserve.server.engine.candidates import Held, release
    from lcmserve.server.protocol import ImageEvent, Picture

    request = scored_engine.request(PROMPT, seed=10, num_images=2, candidates=2)
    picture = Picture(b"\0" * 3, "raw", 1, 1)
    for seed, score in ((10, 20.0), (11, 30.0), (12, 30.0), (13, 25.0)):
        request.held.append(Held(seed, picture, None, score))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ranked = release(request, pool)  # (the pool's encodes are done when it closes)
    assert [(c.seed, c.returned) for c in ranked] == [(10, False), (11, True), (12, True), (13, False)]
    images = [e for e in scored_engine.of(request) if isinstance(e, ImageEvent)]
    assert [(e.index, e.seed, e.score) for e in images] == [(0, 11, 30.0), (1, 12, 30.0)]
