"""Per-request LoRA adapters in the engine (issue 21), in-process (tests/engine_fixture.py), against diffusers.

The reference is diffusers itself on the exported tiny folder: `load_lora_weights(file, adapter_name=...)` for
each LoRA, `set_adapters(names, weights)` unfused (`disable_lora()` for none), LCMScheduler, the same CPU
generator; img2img and inpainting through diffusers' own pipelines. The LoRAs: a kohya_ss one with
text-encoder keys and conv layers (LoCon) at alpha = rank / 2, and a diffusers/PEFT one with text-encoder
keys. One engine holds both; the requests of a mixed batch share UNet calls and each equals diffusers' image
and its own run alone. Then loading and unloading between iterations, and every refusal.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from engine_fixture import EngineHarness, failure_of, pixels
from PIL import Image
from synthetic import LCM_LORA_TARGETS, make_lora

from lcmserve.server.config import AdapterConfig
from lcmserve.server.model.adapters import AdapterError
from lcmserve.server.protocol import UNetTiming

STEPS = 2
RANK_LIMIT = 8


@pytest.fixture(scope="module")
def lora_files(tiny_artifact: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    from lcmserve.export.loading import load_pipeline

    root = tmp_path_factory.mktemp("adapters")
    pipe = load_pipeline(str(tiny_artifact / "model"), dtype=torch.float32, device="cpu")
    return {
        "kohya": make_lora(pipe, root / "cracks_kohya.safetensors", fmt="kohya", rank=4, seed=5,
                           targets=LCM_LORA_TARGETS, include_text_encoder=True),
        "peft": make_lora(pipe, root / "spalling_peft.safetensors", fmt="diffusers", rank=3, seed=6,
                          include_text_encoder=True),
        "big": make_lora(pipe, root / "rank16.safetensors", fmt="kohya", rank=16, seed=7),
    }


@pytest.fixture(scope="module")
def reference(tiny_artifact: pathlib.Path, lora_files: dict[str, pathlib.Path]) -> Any:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_artifact / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name in ("kohya", "peft"):
        pipe.load_lora_weights(str(lora_files[name]), adapter_name=name)
    return pipe


@pytest.fixture(scope="module")
def harness(tiny_artifact: pathlib.Path, lora_files: dict[str, pathlib.Path]) -> Iterator[EngineHarness]:
    from lcmserve.server.model.loader import load_runtime

    runtime = load_runtime(str(tiny_artifact), backend="eager", device="cpu")
    config = AdapterConfig(initial=(("kohya", str(lora_files["kohya"]), 1.0), ("peft", str(lora_files["peft"]), 1.0)),
                           max_adapters=4, max_adapter_rank=RANK_LIMIT, allow_loading=True)
    h = EngineHarness(runtime, adapters=config)
    yield h
    h.close()


def _init_and_mask() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    init = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    return init, mask


def _reference_image(pipe: Any, fields: dict[str, Any]) -> np.ndarray:
    """diffusers' image for one request's fields (the engine's GenerationParams names)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    adapters = fields.get("adapters", ())
    if adapters:
        pipe.set_adapters([n for n, _ in adapters], adapter_weights=[s for _, s in adapters])
    else:
        pipe.disable_lora()
    kwargs: dict[str, Any] = dict(num_inference_steps=STEPS, guidance_scale=fields.get("guidance_scale", 1.0),
                                  negative_prompt=fields.get("negative"),
                                  generator=torch.Generator("cpu").manual_seed(fields["seed"]), output_type="np")
    init, mask = _init_and_mask()
    if "mask_image" in fields:
        runner = StableDiffusionInpaintPipeline.from_pipe(pipe)
        kwargs.update(image=Image.fromarray(init), mask_image=Image.fromarray(mask), strength=fields["strength"],
                      width=64, height=64)
    elif "init_image" in fields:
        runner = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        kwargs.update(image=Image.fromarray(init), strength=fields["strength"])
    else:
        runner = pipe
        kwargs.update(width=64, height=64)
    runner.set_progress_bar_config(disable=True)
    out = runner(fields["prompt"], **kwargs).images[0]
    pipe.enable_lora()
    return (out * 255).round().astype(np.uint8).astype(int)


def _submit(h: EngineHarness, fields: dict[str, Any]) -> Any:
    from lcmserve.server.edge.validation import tokenize

    fields = dict(fields)
    negative = fields.pop("negative", None)
    if negative is not None:
        fields["negative_ids"] = tokenize(h.runtime.tokenizer, negative)[0]
    request = h.request(num_steps=STEPS, **fields)
    h.engine.submit(request)
    return request


def _mix() -> list[dict[str, Any]]:
    """The issue's mixed batch: none; A 1.0; A 0.5; B 0.8; A 0.6 + B 0.4; A guided with a negative prompt;
    img2img with A; inpainting with B."""
    init, mask = _init_and_mask()
    return [
        dict(prompt="a concrete wall", seed=21),
        dict(prompt="a concrete wall", seed=21, adapters=(("kohya", 1.0),)),
        dict(prompt="a concrete wall", seed=21, adapters=(("kohya", 0.5),)),
        dict(prompt="a brick wall", seed=22, adapters=(("peft", 0.8),)),
        dict(prompt="a brick wall", seed=23, adapters=(("kohya", 0.6), ("peft", 0.4))),
        dict(prompt="a cracked wall", seed=24, adapters=(("kohya", 1.0),), guidance_scale=4.0, negative="blurry"),
        dict(prompt="a wall photo", seed=25, adapters=(("kohya", 0.8),), init_image=init.tobytes(), strength=0.75),
        dict(prompt="a wall photo", seed=26, adapters=(("peft", 1.0),), init_image=init.tobytes(),
             mask_image=mask.tobytes(), strength=1.0),
    ]


def test_mixed_batch_matches_diffusers_and_each_solo_run(harness: EngineHarness, reference: Any) -> None:
    """8 requests with 6 different adapter sets share UNet calls (the first call has every row), and each
    image equals diffusers' (within 1/255) and its own request run alone."""
    mix = _mix()
    before = len(harness.metrics)
    together = harness.run(*[_submit(harness, fields) for fields in mix])
    rows = [m.rows for m in harness.metrics[before:] if isinstance(m, UNetTiming)]
    assert rows and max(rows) == 9, f"UNet calls of the mixed batch: rows {rows}"  # 8 images, 1 guided
    for fields, events in zip(mix, together):
        assert failure_of(events) is None, failure_of(events)
        want = _reference_image(reference, fields)
        got = pixels(events)[0]
        assert np.abs(got - want).max() <= 1, f"{fields}: {np.abs(got - want).max()} from diffusers"
    for fields, events in zip(mix, together):
        alone = pixels(harness.run(_submit(harness, fields))[0])[0]
        assert np.abs(alone - pixels(events)[0]).max() <= 1, f"{fields}: changed by its batch"
    base, kohya, half = (pixels(e)[0] for e in together[:3])
    assert np.abs(base - kohya).max() > 20 and np.abs(kohya - half).max() > 5, "the adapters change the image"


def test_load_between_iterations_and_unload_after_the_last_request(harness: EngineHarness,
                                                                    lora_files: dict[str, pathlib.Path]) -> None:
    """A load while a request is in flight leaves it as it was; the new adapter serves at once; unloading
    it while a request uses it lets that request finish, refuses the next, frees the slot afterwards."""
    engine = harness.engine
    alone = pixels(harness.run(_submit(harness, dict(prompt="a wall", seed=31, adapters=(("kohya", 0.7),))))[0])[0]
    running = _submit(harness, dict(prompt="a wall", seed=31, adapters=(("kohya", 0.7),)))
    harness.iterate()
    record = engine.load_adapter("cracks_v2", str(lora_files["kohya"]), 0.7)
    assert (record.rank, record.format, set(record.targets)) == (4, "kohya", {"unet", "text_encoder"})
    using = _submit(harness, dict(prompt="a wall", seed=31, adapters=(("cracks_v2", 0.7),)))
    harness.iterate()
    engine.unload_adapter("cracks_v2")
    with pytest.raises(AdapterError, match=r"adapters\[0\]\.name.*cracks_v2.*loaded: kohya, peft"):
        _submit(harness, dict(prompt="a wall", seed=31, adapters=(("cracks_v2", 0.7),)))
    assert "cracks_v2" not in [r.name for r in engine.adapters.records()] and engine.adapters.unloading()
    first, second = harness.run(running, using)
    assert np.abs(pixels(first)[0] - alone).max() <= 1, "a load in between changed a request in flight"
    assert np.abs(pixels(second)[0] - alone).max() <= 1, "the same file under another name, another image"
    harness.iterate()  # the loop frees the slot once no request holds it
    assert not engine.adapters.unloading()
    again = engine.load_adapter("cracks_v2", str(lora_files["kohya"]), 0.7)
    assert again.slot == record.slot
    engine.unload_adapter("cracks_v2")
    harness.iterate()


def test_every_refusal_names_its_reason(harness: EngineHarness, lora_files: dict[str, pathlib.Path],
                                        tmp_path: pathlib.Path) -> None:
    engine = harness.engine
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    save_file({"lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    cases = [
        ("a", str(tmp_path / "missing.safetensors"), "INVALID_ARGUMENT", "does not exist"),
        ("a", str(tmp_path / "broken.safetensors"), "INVALID_ARGUMENT", "could not be read"),
        ("a", str(tmp_path / "plain.safetensors"), "INVALID_ARGUMENT", "no LoRA weights"),
        ("a", str(tmp_path / "other.safetensors"), "INVALID_ARGUMENT", "another base model"),
        ("a", str(lora_files["big"]), "INVALID_ARGUMENT", f"rank 16 .*limit of {RANK_LIMIT} .*--max-adapter-rank"),
        ("kohya", str(lora_files["peft"]), "ALREADY_EXISTS", "already loaded"),
    ]
    for name, source, code, message in cases:
        with pytest.raises(AdapterError, match=message) as caught:
            engine.load_adapter(name, source, 1.0)
        assert caught.value.code == code, (source, caught.value)
    engine.load_adapter("third", str(lora_files["peft"]), 1.0)
    engine.load_adapter("fourth", str(lora_files["peft"]), 1.0)
    with pytest.raises(AdapterError, match=r"all 4 adapter slots .*--max-adapters") as full:
        engine.load_adapter("fifth", str(lora_files["peft"]), 1.0)
    assert full.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(AdapterError, match="no adapter named 'nope'") as unknown:
        engine.unload_adapter("nope")
    assert unknown.value.code == "NOT_FOUND"
    for name in ("third", "fourth"):
        engine.unload_adapter(name)
    harness.iterate()
    assert [r.name for r in engine.adapters.records()] == ["kohya", "peft"]
    # and the engine still serves
    events = harness.run(_submit(harness, dict(prompt="a wall", seed=41, adapters=(("peft", 1.0),))))[0]
    assert failure_of(events) is None


def test_graphs_hold_the_adapter_extras_and_a_load_needs_no_capture(harness: EngineHarness,
                                                                    lora_files: dict[str, pathlib.Path]) -> None:
    """The engine's bucketed graphs (CPU stand-ins that rerun the call on their static buffers) take the
    adapter extras as static inputs: a mixed batch replays and equals the eager one (with every slot layer
    live, as under real graphs, and with layers no adapter adapts skipped, before); a later load writes slot
    buffers only (no new capture) and serves at once."""
    from graph_fakes import RerunGraph

    from lcmserve.server.engine.cuda_graphs import BucketedGraphs

    def capture(fn: Any, static: list[torch.Tensor]) -> tuple[RerunGraph, torch.Tensor]:
        output = fn(*static)
        return RerunGraph(fn, static, output), output

    engine = harness.engine
    eager_unet = engine.unet
    mix = _mix()[:6]
    eager = [pixels(events)[0] for events in harness.run(*[_submit(harness, fields) for fields in mix])]
    graphs = BucketedGraphs(harness.runtime.unet, (4, 8, 16), name="unet", capture=capture)
    engine.unet = graphs
    engine.adapters.keep_all_live()  # as the engine does when it captures graphs
    try:
        replayed = [pixels(events)[0] for events in harness.run(*[_submit(harness, fields) for fields in mix])]
        for fields, a, b in zip(mix, eager, replayed):
            assert np.abs(a - b).max() <= 1, f"{fields}: graph replay differs"
        shapes = {tuple(name for _, _, name in resolution) for resolution in graphs.graphs}
        assert ("latents", "timesteps", "text", "adapter_slots", "adapter_scales") in shapes
        alone = harness.run(_submit(harness, dict(prompt="a brick wall", seed=22, adapters=(("peft", 0.8),))))[0]
        captures = graphs.captures
        engine.load_adapter("late", str(lora_files["peft"]), 1.0)
        late = harness.run(_submit(harness, dict(prompt="a brick wall", seed=22, adapters=(("late", 0.8),))))[0]
        assert graphs.captures == captures, "a load made a new capture"
        assert np.abs(pixels(late)[0] - pixels(alone)[0]).max() <= 1, "the late adapter is not the same file's"
        engine.unload_adapter("late")
        harness.iterate()
    finally:
        engine.unet = eager_unet


@pytest.mark.parametrize("backend", ["aoti", "onnx", "compile"])
def test_compiled_backends_serve_adapters_or_refuse_them(backend: str, lora_files: dict[str, pathlib.Path]) -> None:
    """aoti and onnx (exported graphs without slots) refuse a request with adapters, naming `adapters` and the
    backend, and say so in ModelFacts; compile serves them: a call with adapters runs on its eager modules
    (which hold the slots; counted as an eager fallback), one without on the compiled graph (a mixed batch is
    one call: with adapters). The compiled
    parts here are stand-ins (the eager step modules): what is tested is the runtime's routing."""
    import dataclasses

    from lcmserve.server.model.loader import load_runtime
    from lcmserve.server.model.parts import Compiled, Part
    from lcmserve.server.model.runtime import Runtime
    from lcmserve.server.protocol import ModelFacts

    eager = load_runtime("tiny", device="cpu")
    calls: list[int] = []

    def compiled_unet(*inputs: torch.Tensor) -> torch.Tensor:
        calls.append(len(inputs))
        return eager.parts["unet"].eager(*inputs)

    unet = Part("unet", backend, eager.parts["unet"]._build_eager,  # noqa: SLF001 - the same eager modules
                Compiled(compiled_unet, lambda inputs: None, None, "every shape"))
    parts = {**eager.parts, "unet": unet}
    runtime = Runtime(dataclasses.replace(eager.spec, backend=backend), eager.tokenizer, eager.scheduler, parts,
                      eager=eager._eager)  # noqa: SLF001
    config = AdapterConfig(max_adapters=2, max_adapter_rank=RANK_LIMIT, allow_loading=True)
    h = EngineHarness(runtime, adapters=config)
    try:
        assert ModelFacts.of(runtime.spec).adapters_supported == (backend == "compile")
        if backend != "compile":
            with pytest.raises(AdapterError, match=f"adapters: .*the {backend} backend") as refused:
                h.submit(seed=1, adapters=(("any", 1.0),))
            assert refused.value.code == "INVALID_ARGUMENT"
            with pytest.raises(AdapterError, match=f"the {backend} backend"):
                h.engine.load_adapter("kohya", str(lora_files["kohya"]), 1.0)
            return
        h.engine.load_adapter("kohya", str(lora_files["kohya"]), 1.0)
        (plain,) = h.run(h.submit(seed=1))
        assert calls == [3, 3] and unet.fallbacks == 0, "calls without adapters run compiled (2 steps)"
        (adapted,) = h.run(h.submit(seed=1, adapters=(("kohya", 1.0),)))
        assert calls == [3, 3] and unet.fallbacks == 2, "calls with adapters run eagerly"
        assert failure_of(adapted) is None
        assert np.abs(pixels(plain)[0] - pixels(adapted)[0]).max() > 20
    finally:
        h.close()


def test_the_cost_script_runs_its_three_cases(tmp_path: pathlib.Path) -> None:
    """scripts/adapter_cost.py (its numbers are in docs/adapters.md) on tiny: the three cases' rows share
    each UNet call and come back as rows of its table."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("adapter_cost", pathlib.Path(__file__).parent.parent / "scripts" /
                                                  "adapter_cost.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cost.jsonl"
    assert script.main(["--base", "tiny", "--side", "64", "--rows", "4", "--rank", "4", "--adapters", "2",
                        "--steps", "1", "--rounds", "1", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in rows] == ["none", "single", "mixed"] and all(r["calls"] == 1 for r in rows)
    assert "mixed_vs_single" in rows[2]
