"""lcmserve.export on the real `tiny` preset: presets, tokenizer, LoRA loading, fusing, the CLI.

No mocks, no network: the preset is built into a temp cache, LoRAs are written by `make_lora`,
and hub look-ups run with the Hugging Face hub in offline mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lcmserve.export import cli
from lcmserve.export.adapters import compile_settings
from lcmserve.export.artifact import (
    FORMAT_VERSION,
    AotiEntry,
    CompileEntry,
    Manifest,
    OnnxEntry,
    Served,
    device_arch,
    read_manifest,
)
from lcmserve.export.errors import LoraError, ModelNotFoundError, UserInputError
from lcmserve.export.fuse import PARITY_TOLERANCE, ParityCheck, export_model, fuse_in_memory
from lcmserve.export.loading import load_pipeline, parse_dtype
from lcmserve.export.lora import LoraSpec, apply_loras, parse_lora_arg
from lcmserve.export.presets import PRESETS, build_preset, preset_dir, preset_spec, weights_sha256
from synthetic import make_lora

# weights_sha256 of the tiny preset: the same on every machine, with any library version.
# If this changes, the preset changed: bump PRESET_VERSION in export/presets.py and update it here.
TINY_WEIGHTS_SHA256 = "acb5c2f3fc8dd0ee68e887ab3ebdfc9a23995dce90383313aae288bdbe7ef8af"
TOL = PARITY_TOLERANCE[torch.float32]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory):
    """Presets are built into a cache of this test module's own, not the user's."""
    root = tmp_path_factory.mktemp("lcmserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCMSERVE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        # kohya_ss keys, UNet + text encoder, alpha = rank / 2
        "kohya": make_lora(tiny, folder / "crack_kohya.safetensors", fmt="kohya", rank=4, seed=1,
                           include_text_encoder=True),
        # diffusers / PEFT keys, UNet only
        "diffusers": make_lora(tiny, folder / "style_peft.safetensors", fmt="diffusers", rank=8, seed=2),
    }  # fmt: skip


def render(pipe, seed: int, prompt: str = "a photo of a crack in a concrete wall") -> np.ndarray:
    check = ParityCheck(prompt=prompt, seed=seed)
    return check.render(pipe)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([*argv, "--no-progress"]))


def leftovers(out: Path) -> list[str]:
    """Anything an export left beside `out` (temp folders are `.<name>.tmp-*`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --- presets and tokenizer -------------------------------------------------------------------------


def test_presets_are_deterministic(tmp_path, monkeypatch):
    first = weights_sha256(build_preset("tiny"))
    assert weights_sha256(build_preset("tiny")) == first
    assert first == TINY_WEIGHTS_SHA256
    # Saved and loaded back from a second cache: the same weights.
    monkeypatch.setenv("LCMSERVE_CACHE", str(tmp_path))
    folder = preset_dir("tiny")
    assert folder == tmp_path / "presets" / "tiny-v1"
    assert json.loads((folder / "lcmserve_preset.json").read_text())["weights_sha256"] == first
    assert weights_sha256(load_pipeline("tiny")) == first
    assert preset_dir("tiny") == folder  # reused, not rebuilt
    assert PRESETS == ("tiny", "sd15-random")


def test_sd15_random_has_sd15_shapes():
    """Built on the meta device: shapes and parameter counts without the minutes a real build takes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = preset_spec("sd15-random")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # SD v1.5's own counts.
    assert (count(unet), count(vae), count(text_encoder)) == (859_520_964, 83_653_863, 123_060_480)


def test_preset_dir_two_builders_at_once(tmp_path, monkeypatch):
    """Two builders racing into an empty cache (threads here; processes race on the same rename):
    both get the one complete folder, and no temp folder is left."""
    monkeypatch.setenv("LCMSERVE_CACHE", str(tmp_path))
    barrier = threading.Barrier(2)
    results: list[Path | BaseException] = []

    def build() -> None:
        barrier.wait()
        try:
            results.append(preset_dir("tiny"))
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            results.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == [tmp_path / "presets" / "tiny-v1"] * 2
    assert sorted(p.name for p in (tmp_path / "presets").iterdir()) == ["tiny-v1"]
    assert (tmp_path / "presets" / "tiny-v1" / "model_index.json").is_file()


def test_tokenizer_any_prompt_and_truncation(tiny):
    tok = tiny.tokenizer
    short = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert len(short.input_ids) == 77 and tok.model_max_length == 77
    assert short.input_ids[0] == tok.bos_token_id and short.input_ids[-1] == tok.pad_token_id

    odd = 'Größe 東京 🙂 naïve café, 100% "quoted" tabs\tand\nnewlines'
    ids = tok(odd).input_ids
    inner = ids[1:-1]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in inner and tok.unk_token_id not in inner  # every byte has a token

    long = " ".join(["a photo of a crack in a concrete wall, high quality, detailed"] * 12)
    untruncated = tok(long).input_ids
    truncated = tok(long, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(untruncated) > 77  # what the pipeline compares to warn about truncation
    assert len(truncated) == 77 and truncated[-1] == tok.eos_token_id
    assert truncated[:76] == untruncated[:76]


def test_tiny_renders_a_real_image(tiny):
    image = render(tiny, seed=0)
    assert image.shape == (64, 64, 3)
    assert image.std() > 0.05, "near-constant image"
    assert ((image < 0.01) | (image > 0.99)).mean() < 0.2, "mostly saturated image"
    other = render(tiny, seed=1, prompt="a dog at night")
    assert np.abs(other - image).mean() > 0.02
    # The prompt alone matters too (the cross-attention gain of the preset): same seed, other prompt.
    assert np.abs(render(tiny, seed=0, prompt="a dog at night") - image).mean() > 0.005
    assert type(tiny.scheduler).__name__ == "LCMScheduler"
    assert tiny.scheduler.config.steps_offset == 1 and tiny.scheduler.config.beta_schedule == "scaled_linear"


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, source, scale",
    [
        ("foo.safetensors", "foo.safetensors", 1.0),
        ("foo.safetensors:0.8", "foo.safetensors", 0.8),
        ("dir/foo.safetensors:-1e-1", "dir/foo.safetensors", -0.1),
        ("latent-consistency/lcm-lora-sdv1-5:1", "latent-consistency/lcm-lora-sdv1-5", 1.0),
        ("C:\\loras\\x.safetensors", "C:\\loras\\x.safetensors", 1.0),
        ("C:\\loras\\x.safetensors:0.5", "C:\\loras\\x.safetensors", 0.5),
    ],
)
def test_parse_lora_arg(arg, source, scale):
    assert parse_lora_arg(arg) == LoraSpec(source, scale)


def test_parse_lora_arg_rejects_bad_scale():
    with pytest.raises(LoraError, match=r"^scale 'abc' of --lora foo.safetensors:abc is not a number$"):
        parse_lora_arg("foo.safetensors:abc")


def test_parse_dtype():
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="float64"):
        parse_dtype("float64")


def test_load_pipeline_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="not a preset \\(tiny, sd15-random\\)"):
        load_pipeline("tiyn")
    with pytest.raises(ModelNotFoundError, match="neither a diffusers model"):
        load_pipeline(str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as err:
        load_pipeline("no-such-org/no-such-model")
    assert "local diffusers folder" in str(err.value) and "preset" in str(err.value)


# --- LoRAs and export ------------------------------------------------------------------------------


def test_export_fuses_kohya_and_diffusers_loras(tiny, loras, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "artifact"
    kohya, peft = loras["kohya"], loras["diffusers"]
    assert run_cli("--base", "tiny", "--lora", f"{kohya}:1.0", "--lora", f"{peft}:0.8", "--out", str(out),
                   "--device", "cpu", "--dtype", "float32") == 0  # fmt: skip
    assert "exported tiny + 2 LoRA(s)" in capsys.readouterr().out

    # The manifest records both LoRAs with the hash of their file and their scale.
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(lo["source"], lo["scale"], lo["format"]) for lo in manifest["loras"]] == [
        (f"{kohya}", 1.0, "kohya"),
        (f"{peft}", 0.8, "diffusers"),
    ]
    for lora, path in zip(manifest["loras"], (kohya, peft)):
        assert lora["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["loras"][0]["targets"] == ["unet", "text_encoder"]
    assert manifest["loras"][1]["targets"] == ["unet"] and manifest["loras"][1]["rank"] == 8
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= TOL
    assert manifest["parity"]["tolerance"] == TOL
    assert (manifest["dtype"], manifest["device"], manifest["backend"]) == ("float32", "cpu", "eager")
    assert set(manifest["versions"]) >= {"lcmserve", "torch", "diffusers", "transformers", "peft"}
    assert manifest["format_version"] == 1 and manifest["created"].endswith("+00:00")
    assert leftovers(out) == []

    # model/ is a plain diffusers folder with the LCM scheduler, the LoRAs inside its weights.
    fused = StableDiffusionPipeline.from_pretrained(out / "model")
    fused.set_progress_bar_config(disable=True)
    assert type(fused.scheduler).__name__ == "LCMScheduler"
    assert not any("lora" in k for k in fused.unet.state_dict())
    assert not any("lora" in k for k in fused.text_encoder.state_dict())

    unfused = load_pipeline("tiny")
    apply_loras(unfused, [LoraSpec(str(kohya), 1.0), LoraSpec(str(peft), 0.8)])
    seed = 7  # not the export's own parity seed
    fused_image, unfused_image, base_image = render(fused, seed), render(unfused, seed), render(tiny, seed)
    assert np.abs(fused_image - unfused_image).max() <= TOL
    assert np.abs(fused_image - base_image).max() > 0.1  # the LoRAs really were fused
    assert np.abs(fused_image - base_image).mean() > 0.01

    # A second export into the same folder is refused without --force, replaces it with --force.
    assert run_cli("--base", "tiny", "--out", str(out)) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert run_cli("--base", "tiny", "--out", str(out), "--force") == 0
    assert json.loads((out / "manifest.json").read_text())["loras"] == []
    assert leftovers(out) == []


def test_scales_reach_unet_and_text_encoder(tiny, loras):
    """A kohya LoRA at scale 0 leaves both components as they were; at 1 it changes both."""
    ids = tiny.tokenizer("a photo", padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def outputs(pipe):
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
            noise = pipe.unet(latents, 500, encoder_hidden_states=text).sample
        return text, noise

    base_text, base_noise = outputs(tiny)
    for scale, same in ((0.0, True), (1.0, False)):
        pipe = load_pipeline("tiny")
        records = apply_loras(pipe, [LoraSpec(str(loras["kohya"]), scale)])
        assert records[0].targets == ("unet", "text_encoder") and records[0].rank == 4
        text, noise = outputs(pipe)
        assert torch.allclose(text, base_text, atol=1e-6) is same
        assert torch.allclose(noise, base_noise, atol=1e-6) is same


def test_fuse_in_memory(loras):
    """What a server started from a model id + --lora gets: fused weights, no adapters, a manifest."""
    pipe, manifest = fuse_in_memory(
        "tiny", [LoraSpec(str(loras["diffusers"]), 0.8)], dtype="float32", device="cpu"
    )
    assert manifest.parity is not None and manifest.parity.max_abs_diff <= TOL
    assert (
        manifest.loras[0].scale == 0.8 and manifest.backend == "eager" and manifest.base_kind == "preset"
    )
    assert not any("lora" in k for k in pipe.unet.state_dict())


def unrelated_lora(folder: Path) -> Path:
    """A LoRA for some other model: LoRA-shaped keys that name no module here."""
    from safetensors.torch import save_file

    path = folder / "other_model.safetensors"
    save_file(
        {
            "lora_unet_single_transformer_blocks_0_attn_to_q.lora_down.weight": torch.ones(4, 64),
            "lora_unet_single_transformer_blocks_0_attn_to_q.lora_up.weight": torch.ones(64, 4),
            "lora_unet_single_transformer_blocks_0_attn_to_q.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize(
    "make_arg, message",
    [
        (lambda d: str(d / "missing.safetensors"), "LoRA file {d}/missing.safetensors does not exist"),
        (lambda d: f"{d}/x.safetensors:abc", "scale 'abc' of --lora {d}/x.safetensors:abc is not a number"),
        (unrelated_lora, "matches nothing in the model"),
    ],
    ids=["missing-file", "bad-scale", "unrelated-keys"],
)
def test_bad_lora_fails_cleanly(tmp_path, capsys, make_arg, message):
    arg = make_arg(tmp_path)
    out = tmp_path / "artifact"
    assert run_cli("--base", "tiny", "--lora", str(arg), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lcmserve export: error: ")
    assert message.format(d=tmp_path) in err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(out) == []


def test_partly_matching_lora_is_refused(tiny, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(loras["kohya"]))
    tensors["lora_unet_down_blocks_0_no_such_module.lora_down.weight"] = torch.ones(4, 32)
    tensors["lora_unet_down_blocks_0_no_such_module.lora_up.weight"] = torch.ones(32, 4)
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(LoraError, match="1 of its .* modules match nothing.*no_such_module.*--allow-partial-lora"):
        apply_loras(load_pipeline("tiny"), [LoraSpec(str(tmp_path / "partial.safetensors"), 1.0)])


def test_partly_matching_lora_applies_what_matches_when_allowed(tiny, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(loras["kohya"]))
    tensors["lora_unet_down_blocks_0_no_such_module.lora_down.weight"] = torch.ones(4, 32)
    tensors["lora_unet_down_blocks_0_no_such_module.lora_up.weight"] = torch.ones(32, 4)
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    spec = parse_lora_arg(f"{tmp_path / 'partial.safetensors'}:0.8", allow_partial=True)
    [partial] = apply_loras(load_pipeline("tiny"), [spec])
    [whole] = apply_loras(load_pipeline("tiny"), [LoraSpec(str(loras["kohya"]), 0.8)])
    assert partial.unmatched == ("lora_unet_down_blocks_0_no_such_module",)
    assert partial.modules == whole.modules and partial.targets == whole.targets
    assert partial.to_json()["unmatched"] == ["lora_unet_down_blocks_0_no_such_module"]


def test_lora_from_folder_and_hub_offline(tiny, loras, tmp_path, monkeypatch):
    folder = tmp_path / "lora_folder"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(loras["diffusers"].read_bytes())
    records = apply_loras(load_pipeline("tiny"), [LoraSpec(str(folder), 0.5)])
    assert records[0].sha256 == hashlib.sha256(loras["diffusers"].read_bytes()).hexdigest()

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoraError, match="local .safetensors file or folder.*HF_HUB_OFFLINE"):
        apply_loras(load_pipeline("tiny"), [LoraSpec("no-such-org/no-such-lora", 1.0)])


def test_unknown_backend_is_refused_before_loading(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(UserInputError, match="backend 'tensorrt' is not one of eager, compile, aoti, onnx"):
        export_model("tiny", [], out, backend="tensorrt", progress=False)
    assert not out.exists()


# --- the artifact contract -------------------------------------------------------------------------


def test_exported_artifact_is_readable_by_other_users(tmp_path):
    """Folders 0755 and files 0644 under umask 022, the root included (mkdtemp makes it 0700)."""
    out = tmp_path / "artifact"
    previous = os.umask(0o022)
    try:
        assert run_cli("--base", "tiny", "--out", str(out)) == 0
    finally:
        os.umask(previous)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes[out] == 0o755
    assert {oct(m) for p, m in modes.items() if p.is_dir()} == {"0o755"}
    assert {oct(m) for p, m in modes.items() if p.is_file()} == {"0o644"}
    assert (out / "manifest.json") in modes and (out / "model" / "model_index.json") in modes
    # One machine identity: the manifest's is the one compiled entries are checked against.
    assert read_manifest(out).device_arch == device_arch("cpu")


def _entries() -> dict[str, AotiEntry | CompileEntry | OnnxEntry]:
    common = dict(device="cpu", device_arch="cpu-x86_64-avx2", device_name="a CPU", torch="2.13.0+cpu",
                  python="3.11.9", dtype="float32", optimizations=("fused_qkv",),
                  parity_max_abs_diff={"unet": 1e-6}, export_seconds={"total": 1.0})
    served = Served(batch_range=(1, 63), unet_latent_multiple=2, unet_latent_range=(4, 128),
                    vae_latent_range=(8, 128))
    return {
        "aoti": AotiEntry(**common, files={"unet": "compiled/aoti/unet.pt2"}, served=served,
                          shapes={"dims": {"batch": [1, 63]}}),
        "onnx": OnnxEntry(**common, files={"unet": "compiled/onnx/unet.onnx"}, served=served,
                          onnxruntime="1.30.0"),
        "compile": CompileEntry(**common, files={"cache": "compiled/compile/inductor_cache.bin"},
                                served=Served(batch_range=(1, None), any_shape=True),
                                torch_compile={"options": {"cpp_wrapper": True}},
                                warm_shapes={"unet": ((1, 8, 8), (2, 8, 8))}, cache_bytes=10),
    }  # fmt: skip


def test_manifest_round_trip_and_json_layout(tmp_path):
    """The one writer and the one reader agree; the JSON keeps the layout earlier exports wrote."""
    manifest = Manifest(base="tiny", base_kind="preset", loras=(), dtype="float32", device="cpu",
                        device_arch="cpu-x86_64-avx2", device_name="a CPU", backend="aoti", compiled=_entries())
    manifest.write(tmp_path)
    assert read_manifest(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION == 1
    assert data["compiled"]["aoti"]["backend"] == "aoti"
    assert data["compiled"]["aoti"]["served"] == {"batch_range": [1, 63], "unet_latent_multiple": 2,
                                                  "unet_latent_range": [4, 128], "vae_latent_range": [8, 128]}
    assert data["compiled"]["compile"]["served"] == {"batch_range": [1, None], "any_shape": True}
    assert data["compiled"]["compile"]["warm_shapes"] == {"unet": [[1, 8, 8], [2, 8, 8]]}
    # Keys a newer lcmserve may add, and backends it may know, are ignored by this reader.
    data["compiled"]["aoti"]["new_key"] = 1
    data["compiled"]["tensorrt"] = {"files": {}}
    data["new_top_level_key"] = {}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(tmp_path) == manifest


@pytest.mark.parametrize("change, message", [
    ({"format_version": FORMAT_VERSION + 1}, "has format_version 2; this lcmserve reads up to 1"),
    ({"format_version": None}, "has format_version None"),
    ({"base": None, "dtype": None}, "lacks base, dtype"),
], ids=["newer", "missing-version", "missing-keys"])  # fmt: skip
def test_manifest_reader_refuses_what_it_cannot_read(tmp_path, change, message):
    Manifest(base="tiny", base_kind="preset", loras=(), dtype="float32", device="cpu",
             device_arch="cpu-x86_64-avx2", device_name="a CPU").write(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelNotFoundError, match=message):
        read_manifest(tmp_path)


def test_compile_backend_leaves_cuda_graphs_to_the_engine():
    """No reduce-overhead on CUDA: the engine captures its own bucketed graphs (adapters.compile_settings)."""
    assert "mode" not in compile_settings("cuda") and "mode" not in compile_settings("cuda:1")
    assert compile_settings("cpu") == {"options": {"cpp_wrapper": True}}


def test_export_imports_nothing_of_the_server():
    """Imports run one way: server -> export."""
    modules = ["adapters", "artifact", "cli", "compile", "errors", "fuse", "loading", "lora", "pipeline", "presets",
               "quiet", "records", "unet_call"]
    code = ("import sys\n" + "".join(f"import lcmserve.export.{m}\n" for m in modules)
            + "bad = sorted(m for m in sys.modules if m.startswith('lcmserve.server'))\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_module_imports_no_torch():
    code = "import sys, lcmserve.export.cli; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
