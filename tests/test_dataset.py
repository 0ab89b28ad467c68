"""`lcmserve dataset` (issue #13) against a real tiny server: the imagefolder layout loaded by the
real `datasets` library, SIGKILL + resume equal to an uninterrupted run, reproducing one image
with `lcmserve generate`, --keep, img2img/inpainting specs; and the spec/plan rules without one.

Byte-identity: the tiny model on the CPU differs by up to 1/255 in a few pixels between batch
sizes (tests/test_batching.py allows 1), so runs compared byte for byte use --concurrency 1,
where every request is alone in its batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from lcmserve import GenerateOptions
from lcmserve.dataset import DatasetError, keep, load_spec, make_plan, parse_spec, run

SPEC_24 = """\
prompts:
  - template: "a {kind} crack on a {surface} concrete wall"
    vars: {kind: [hairline, branching], surface: [painted, bare]}
    images: 4
  - template: "water draining next to a cracked wall"
    images: 8
negative_prompt: ""
seed: 1000
num_inference_steps: 2
guidance_scale: 1.0
width: 64
height: 64
format: png
splits: {train: 0.5, validation: 0.25, test: 0.25}
"""
COLUMNS = ["file_name", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
           "width", "height", "format", "template", "prompt_id", "image_index", "kind", "surface", "sha256"]


def lcmserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lcmserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def rows(out: Path) -> dict[str, dict[str, Any]]:
    """Every metadata row of a dataset folder by file name, with its split added."""
    found = {}
    for metadata in sorted(out.glob("*/metadata.jsonl")):
        for line in metadata.read_text().splitlines():
            row = json.loads(line)
            found[row["file_name"]] = {**row, "split": metadata.parent.name}
    return found


def files(out: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file, dataset.json aside (it records wall times)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "dataset.json"}


@pytest.fixture(scope="module")
def reference(tiny_server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 24-image spec made by the Python API at concurrency 1 (every request alone in its batch)."""
    root = tmp_path_factory.mktemp("dataset-ref")
    report = run(write_spec(root, SPEC_24), root / "out", targets=(tiny_server,), concurrency=1, progress=False)
    assert report.complete and report.generated == 24 and not report.failures, report.summary()
    return root / "out"


# ---- against a server ---------------------------------------------------------------------------


def test_24_images_load_with_datasets(tiny_server: str, tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "cracks"
    done = lcmserve("dataset", str(write_spec(tmp_path, SPEC_24)), "--target", tiny_server, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "24 of 24 images" in done.stdout and "images/s" in done.stdout

    loaded = datasets.load_dataset("imagefolder", data_dir=str(out))
    assert set(loaded) == {"train", "validation", "test"}
    assert sum(split.num_rows for split in loaded.values()) == 24
    expected_columns = ["image"] + [c for c in COLUMNS if c != "file_name"]
    by_name = rows(out)
    for name, split in loaded.items():
        assert split.column_names == expected_columns, name
        for row in split:
            assert row["image"].size == (64, 64)
    for file_name, row in by_name.items():  # sha256 of every file as recorded
        assert hashlib.sha256((out / row["split"] / file_name).read_bytes()).hexdigest() == row["sha256"]
        assert list(row)[:-1] == COLUMNS  # every column, in order (split added by rows())
    assert {r["kind"] for r in by_name.values()} == {"hairline", "branching", ""}

    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["models"][0]["base"] == "tiny" and manifest["models"][0]["loras"]
    assert manifest["spec"]["seed"] == 1000 and manifest["images"] == 24 and manifest["complete"]
    assert sum(manifest["counts"].values()) == 24 and manifest["last_run"]["wall_s"] > 0
    sheets = sorted((out / "contact").glob("*.png"))
    assert len(sheets) == 5  # one per expanded prompt: 2 x 2 + 1


def test_sigkill_then_rerun_equals_uninterrupted(tiny_server: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC_24.replace("images: 4", "images: 8").replace("images: 8\nneg", "images: 16\nneg"))
    assert len(make_plan(load_spec(spec)).images) == 48
    args = ["--target", tiny_server, "--concurrency", "1", "--no-progress"]
    whole = tmp_path / "whole"
    assert lcmserve("dataset", str(spec), "--out", str(whole), *args).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lcmserve.cli", "dataset", str(spec), "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while sum(1 for _ in killed.glob("*/*.png")) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before it was killed: make the spec bigger"
    partial = len(rows(killed))
    assert 0 < partial < 48
    # What a crash can leave besides: a half-written part file and a cut metadata line.
    (killed / "train" / ".0123456789ab-0000.png.part").write_bytes(b"\x89PNG half")
    with (killed / "train" / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "cut-of')
    time.sleep(1.0)  # let the server drop the killed client's request: the rerun's must be alone

    rerun = lcmserve("dataset", str(spec), "--out", str(killed), *args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {partial} already done" in rerun.stdout
    assert files(killed) == files(whole)  # same names, same bytes, metadata in the same order
    again = lcmserve("dataset", str(spec), "--out", str(killed), *args)
    assert "generated 0" in again.stdout and files(killed) == files(whole)


def test_a_server_with_a_token_file(tmp_path: Path) -> None:
    """`--token` reaches the job's clients (as tests/test_security.py starts such a server); without
    it the job stops at GetModelInfo with the server's UNAUTHENTICATED, exit 1."""
    from conftest import ServerProcess

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# one a line\ndataset-token\n")
    server = ServerProcess("--model", "tiny", "--metrics-port", "-1", "--auth-token-file", str(tokens))
    try:
        spec = write_spec(tmp_path, SPEC_24.replace("images: 4", "images: 1").replace("images: 8\nneg", "images: 2\nneg"))
        args = ["--target", server.target, "--no-progress", "--no-contact-sheets"]
        env = {k: v for k, v in os.environ.items() if k != "LCMSERVE_TOKEN"}
        refused = subprocess.run([sys.executable, "-m", "lcmserve.cli", "dataset", str(spec), "--out",
                                  str(tmp_path / "refused"), *args], capture_output=True, text=True, timeout=120,
                                 env=env)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
        done = subprocess.run([sys.executable, "-m", "lcmserve.cli", "dataset", str(spec), "--out",
                               str(tmp_path / "out"), *args, "--token", "dataset-token"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert "6 of 6 images" in done.stdout and len(rows(tmp_path / "out")) == 6
    finally:
        server.stop()


def test_one_image_reproduced_by_generate(reference: Path, tiny_server: str, tmp_path: Path) -> None:
    row = next(r for r in rows(reference).values() if r["image_index"] == 3)
    out = tmp_path / "again.png"
    done = lcmserve("generate", row["prompt"], "--target", tiny_server, "--seed", str(row["seed"]),
                    "--steps", str(row["num_inference_steps"]), "--guidance", str(row["guidance_scale"]),
                    "--width", str(row["width"]), "--height", str(row["height"]), "--format", row["format"],
                    "--negative-prompt", row["negative_prompt"], "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == (reference / row["split"] / row["file_name"]).read_bytes()


def test_keep_writes_a_filtered_copy(reference: Path, tmp_path: Path) -> None:
    import datasets

    by_name = rows(reference)
    names = sorted(by_name)[:2]
    seed = next(r["seed"] for n, r in sorted(by_name.items()) if n not in names)
    picked = tmp_path / "picked.txt"
    picked.write_text(f"# good ones\n{names[0]}\n{names[1]}  # sharp\n\n{seed}\n")
    dest = tmp_path / "kept"
    assert sum(keep(reference, picked, dest).values()) == 3
    kept = rows(dest)
    assert sorted(kept) == sorted([*names, next(n for n, r in by_name.items() if r["seed"] == seed)])
    assert all(kept[n] == by_name[n] for n in kept)
    assert sum(s.num_rows for s in datasets.load_dataset("imagefolder", data_dir=str(dest)).values()) == 3
    picked.write_text("nope.png\n")
    with pytest.raises(DatasetError, match="nope.png"):
        keep(reference, picked, tmp_path / "kept2")


def _has_sdk_fields(*names: str) -> bool:
    return all(name in {f.name for f in dataclasses.fields(GenerateOptions)} for name in names)


def _init_folders(root: Path) -> None:
    from PIL import Image, ImageDraw

    for folder in ("walls", "masks"):
        (root / folder).mkdir()
    for i, colour in enumerate(("khaki", "grey")):
        wall = Image.new("RGB", (64, 64), colour)
        ImageDraw.Draw(wall).line((8 + 20 * i, 0, 40, 63), fill="black", width=2)
        wall.save(root / "walls" / f"wall{i}.png")
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
        mask.save(root / "masks" / f"wall{i}.png")


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpainting"])
def test_img2img_and_inpainting_specs(inpaint: bool, tiny_server: str, tmp_path: Path) -> None:
    needed = ("init_image", "strength", "mask_image") if inpaint else ("init_image", "strength")
    if not _has_sdk_fields(*needed):
        pytest.skip(f"the SDK has no {'/'.join(needed)} in GenerateOptions yet (img2img issue)")
    import datasets
    from PIL import Image

    _init_folders(tmp_path)
    text = SPEC_24 + "init_images: walls/\nstrength: 0.6\n" + ("masks: masks/\n" if inpaint else "")
    text = text.replace("images: 4", "images: 1").replace("images: 8\nneg", "images: 2\nneg")
    out = tmp_path / "out"
    report = run(write_spec(tmp_path, text), out, targets=(tiny_server,), progress=False)
    assert report.complete and report.done == (4 + 2) * 2, report.summary()
    by_name = rows(out)
    for row in by_name.values():
        assert row["init_image"] in ("wall0.png", "wall1.png") and row["strength"] == 0.6
        assert row["init_sha256"] == hashlib.sha256((tmp_path / "walls" / row["init_image"]).read_bytes()).hexdigest()
        if inpaint:  # the mask next to the image as its label (64x64 already: its pixels unchanged)
            label = out / row["split"] / row["mask_file_name"]
            with Image.open(label) as got, Image.open(tmp_path / "masks" / row["init_image"]) as mask:
                assert got.mode == "L" and got.tobytes() == mask.tobytes()
            assert hashlib.sha256(label.read_bytes()).hexdigest() == row["mask_sha256"]
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out))
    assert sum(s.num_rows for s in loaded.values()) == 12
    assert ("mask" in next(iter(loaded.values())).column_names) == inpaint


def _server_mask(init: Path, mask: Path, width: int, height: int) -> bytes:
    """The mask pixels the server uses for a (width, height) request with these files, (H, W) uint8."""
    from lcmserve.server.config import Limits
    from lcmserve.server.edge.images import prepare_images
    from lcmserve.v1 import generation_pb2 as pb

    request = pb.GenerateRequest(prompt="a crack", init_image=init.read_bytes(), mask_image=mask.read_bytes(),
                                 width=width, height=height)
    prepared = prepare_images(request, Limits())
    assert prepared.mask_image is not None, prepared.violations
    return prepared.mask_image


@pytest.mark.parametrize("size", ["", "width: 96\nheight: 64\n"], ids=["photo-size", "spec-size"])
def test_inpainting_labels_are_the_masks_the_server_used(size: str, tiny_server: str, tmp_path: Path) -> None:
    """A 130x100 photo and mask: the image and its label are 128x96 (the photo floored to 8, as
    `lcmserve generate` does) or the spec's size, and the label holds the server's resized mask."""
    if not _has_sdk_fields("init_image", "strength", "mask_image"):
        pytest.skip("the SDK has no init_image/mask_image in GenerateOptions yet (img2img issue)")
    from PIL import Image, ImageDraw

    for folder in ("walls", "masks"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (130, 100), "khaki").save(tmp_path / "walls" / "wall.jpg")
    mask = Image.new("L", (130, 100), 0)
    ImageDraw.Draw(mask).line((5, 95, 125, 3), fill=255, width=5)  # a thin diagonal: resizing blends it
    mask.save(tmp_path / "masks" / "wall.png")
    spec = write_spec(tmp_path, "prompts: ['a crack']\nnum_inference_steps: 2\ninit_images: walls/\n"
                                "masks: masks/\nstrength: 1.0\n" + size)
    report = run(spec, tmp_path / "out", targets=(tiny_server,), progress=False, contact_sheets=False)
    assert report.complete, report.summary()
    (row,) = rows(tmp_path / "out").values()
    width, height = (96, 64) if size else (128, 96)
    assert (row["width"], row["height"]) == (width, height)
    folder = tmp_path / "out" / row["split"]
    with Image.open(folder / row["file_name"]) as image, Image.open(folder / row["mask_file_name"]) as label:
        assert image.size == label.size == (width, height)
        assert label.mode == "L"
        assert label.tobytes() == _server_mask(tmp_path / "walls" / "wall.jpg", tmp_path / "masks" / "wall.png",
                                               width, height)


# ---- without a server ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown key 'colour'"),
        ({"prompts": []}, "prompts: must be a non-empty list"),
        ({"prompts": [{"template": "a {kind} wall"}]}, "prompts[0].template: {kind} has no entry in prompts[0].vars"),
        ({"prompts": [{"template": "a wall", "vars": {"kind": ["x"]}}]}, "prompts[0].vars.kind: not used"),
        ({"prompts": [{"template": "a {seed} wall", "vars": {"seed": ["x"]}}]}, "metadata column"),
        ({"prompts": [{"template": "a wall", "images": 0}]}, "prompts[0].images: 0 is out of range"),
        ({"width": 100}, "width: 100 must be a multiple of 8"),
        ({"format": "raw"}, "format: 'raw' is not one of png, jpeg, webp"),
        ({"splits": {"train": 0.8, "test": 0.1}}, "splits: the fractions sum to 0.9"),
        ({"strength": 0.5}, "strength: needs init_images"),
        ({"init_images": "no/such/folder"}, "init_images: 'no/such/folder' is not a folder"),
    ],
)
def test_spec_errors_name_the_key(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    data = {"prompts": [{"template": "a wall"}], **change}
    with pytest.raises(DatasetError) as caught:
        parse_spec(data, tmp_path)
    assert message in str(caught.value)


def test_seeds_splits_and_names_survive_appending_entries(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(SPEC_24)
    before = make_plan(parse_spec(data, tmp_path)).images
    data["prompts"].insert(0, {"template": "a new {x} entry", "vars": {"x": ["a", "b"]}, "images": 3})
    after = {i.file_name: i for i in make_plan(parse_spec(data, tmp_path)).images}
    for image in before:
        assert (after[image.file_name].seed, after[image.file_name].split) == (image.seed, image.split)
    # Expansion order: the first variable varies slowest; images of one prompt have consecutive seeds.
    prompts = [i.prompt for i in before if i.image_index == 0]
    assert prompts[:2] == ["a hairline crack on a painted concrete wall", "a hairline crack on a bare concrete wall"]
    assert [i.seed - before[0].seed for i in before[:4]] == [0, 1, 2, 3]
    assert len({i.seed for i in before}) == 24


def test_import_and_help_without_torch(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "diffusers"}:
                    raise ImportError(f"blocked: {name}", name=name)
        sys.meta_path.insert(0, Block())
        import lcmserve.dataset
        from lcmserve.cli import main
        sys.exit(main(["dataset", "--help"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--concurrency" in done.stdout and "--keep" in done.stdout


def test_bad_spec_is_one_line_and_exit_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "prompts:\n  - template: 'a {kind} wall'\n")
    done = lcmserve("dataset", str(spec), "--out", str(tmp_path / "out"), "--target", "127.0.0.1:1", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "prompts[0].template: {kind} has no entry" in done.stderr


def test_no_pillow_means_no_contact_sheets_and_a_warning(tiny_server: str, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "diffusers", "PIL"}:
                    raise ImportError(f"blocked: {name}", name=name)
        sys.meta_path.insert(0, Block())
        from lcmserve.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    spec = write_spec(tmp_path, SPEC_24)
    done = subprocess.run([sys.executable, "-c", code, "dataset", str(spec), "--out", str(tmp_path / "out"),
                           "--target", tiny_server, "--limit", "3", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning: no contact sheets" in done.stdout and "pip install pillow" in done.stdout
    assert len(rows(tmp_path / "out")) == 3 and not (tmp_path / "out" / "contact").exists()


def test_a_folder_of_another_model_is_refused(tiny_server: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json").write_text(json.dumps({"models": [{"base": "sd15", "loras": [], "dtype": "float16",
                                                               "backend": "eager"}]}))
    with pytest.raises(DatasetError, match="another model"):
        run(write_spec(tmp_path, SPEC_24), out, targets=(tiny_server,), progress=False)


# ---- best-of-N and adapters (issues 23, 21): a server with the tiny scorer and two adapters ------


@pytest.fixture(scope="module")
def scored_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The session's tiny artifact served with `--scorer tiny` and two rank-2 kohya adapters."""
    import torch
    from conftest import ServerProcess
    from synthetic import make_lora

    from lcmserve.export.loading import load_pipeline

    root = tmp_path_factory.mktemp("scored")
    pipe = load_pipeline("tiny", dtype=torch.float32, device="cpu")
    loras = [make_lora(pipe, root / f"v{i}.safetensors", fmt="kohya", rank=2, seed=30 + i) for i in (1, 2)]
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1", "--scorer", "tiny",
                           *(a for i, lora in enumerate(loras, 1) for a in ("--adapter", f"cracks_v{i}={lora}")))
    try:
        yield server.target
    finally:
        server.stop()


BEST_OF = SPEC_24.replace("images: 4", "images: 1").replace("images: 8\nneg", "images: 2\nneg") + \
    "candidates: 2\nmax_rounds: 2\nmin_score: MIN\n"  # 6 images


def test_best_of_n_with_min_score_and_rounds(scored_server: str, tmp_path: Path) -> None:
    import datasets

    from lcmserve import Client

    first = make_plan(load_spec(write_spec(tmp_path, BEST_OF.replace("MIN", "0")))).images[0]
    with Client(scored_server) as client:  # image 0's two rounds, to set min_score just above both
        probes = [client.generate(first.prompt, seed=first.seed + 2 * r, candidates=2, num_inference_steps=2,
                                  width=64, height=64, output_format="png").images[0].score for r in (0, 1)]
    min_score = round(max(s for s in probes if s is not None) + 0.01, 4)
    spec = write_spec(tmp_path, BEST_OF.replace("MIN", str(min_score)))
    keep_run = run(spec, tmp_path / "keep", targets=(scored_server,), concurrency=1, progress=False)
    assert keep_run.complete and keep_run.done == 6, keep_run.summary()
    assert keep_run.below >= 1 and keep_run.retried >= 1 and "stayed below it (kept" in keep_run.summary()
    by_name = rows(tmp_path / "keep")
    for row in by_name.values():
        assert row["candidates"] == 2 and row["rounds"] in (1, 2) and isinstance(row["score"], float)
        assert row["passed"] == (row["score"] >= min_score)
        assert row["passed"] or row["rounds"] == 2  # below min_score: retried up to max_rounds
    image0 = by_name[first.file_name]  # below min_score in both rounds by construction: its best kept
    assert (image0["rounds"], image0["passed"]) == (2, False)
    assert image0["score"] == pytest.approx(max(probes), abs=1e-3)
    assert image0["seed"] in range(first.seed, first.seed + 4)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "keep"))
    assert {"score", "candidates", "rounds", "passed"} <= set(next(iter(loaded.values())).column_names)
    manifest = json.loads((tmp_path / "keep" / "dataset.json").read_text())
    assert manifest["scorer"]["source"] == "tiny" and manifest["spec"]["candidates"] == 2
    assert len(list((tmp_path / "keep" / "contact").glob("*.png"))) == 5

    # on_fail: skip leaves the failed ones out (rejected.jsonl); the rest are the same images: the
    # seeds of every round are fixed, so runs agree byte for byte (at concurrency 1).
    skip = write_spec(tmp_path, spec.read_text() + "on_fail: skip\n", "skip.yaml")
    skip_run = run(skip, tmp_path / "skip", targets=(scored_server,), concurrency=1, progress=False)
    failed = {n for n, r in by_name.items() if not r["passed"]}
    assert failed and skip_run.complete and skip_run.rejected == len(failed), skip_run.summary()
    rejected = [json.loads(line) for line in (tmp_path / "skip" / "rejected.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in rejected} == failed
    kept = files(tmp_path / "skip")
    for name, row in by_name.items():
        if name not in failed:
            assert kept[f"{row['split']}/{name}"] == (tmp_path / "keep" / row["split"] / name).read_bytes()
    again = run(skip, tmp_path / "skip", targets=(scored_server,), concurrency=1, progress=False)
    assert again.generated == 0 and again.skipped == 6 and again.complete


def test_adapter_sweep_recorded_in_metadata(scored_server: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, textwrap.dedent("""\
        prompts:
          - template: "a crack on a wall"
            vars: {lora: [cracks_v1, cracks_v2], scale: [0.5, 1.5]}
            adapters: {"{lora}": "{scale}"}
        num_inference_steps: 2
        width: 64
        height: 64
        """))
    report = run(spec, tmp_path / "out", targets=(scored_server,), progress=False, contact_sheets=False)
    assert report.complete and report.done == 4, report.summary()
    by_name = rows(tmp_path / "out")
    assert {(r["lora"], r["scale"], r["adapters"]) for r in by_name.values()} == {
        (f"cracks_v{i}", s, f"cracks_v{i}:{s}") for i in (1, 2) for s in ("0.5", "1.5")}
    assert len({r["seed"] for r in by_name.values()}) == 1  # one noise under each adapter and scale
    assert len({r["sha256"] for r in by_name.values()}) == 4  # and the adapters change the image
    row = next(r for r in by_name.values() if r["adapters"] == "cracks_v2:1.5")
    out = tmp_path / "again.png"
    done = lcmserve("generate", row["prompt"], "--target", scored_server, "--seed", str(row["seed"]), "--steps", "2",
                    "--width", "64", "--height", "64", "--adapter", "cracks_v2:1.5", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == (tmp_path / "out" / row["split"] / row["file_name"]).read_bytes()
    spec.write_text(spec.read_text().replace("cracks_v2]", "cracks_v3]"))
    with pytest.raises(DatasetError, match="adapters: cracks_v3 not loaded on the server"):
        run(spec, tmp_path / "out3", targets=(scored_server,), progress=False)
