"""`lcmserve dataset --shard I/N` and `lcmserve dataset merge` (issue 23) against the session's tiny
server: three shards, one of them SIGKILLed and rerun, merged equal one run of the same spec
(names, metadata, contact sheets and bytes, at --concurrency 1 as tests/test_dataset.py explains);
merge's refusals; --shard parsing; a spec asking for a scorer the server lacks; adapter sweeps as
the plan expands them (the adapters' effect on images is tests/test_dataset.py's, on a server
with adapters).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcmserve.dataset import DatasetError, make_plan, parse_spec, run
from lcmserve.dataset.shards import parse_shard, shard_plan
from test_dataset import files, lcmserve, rows, write_spec

SPEC = """\
prompts:
  - template: "a {kind} crack on a concrete wall"
    vars: {kind: [hairline, branching, spalled]}
    images: 6
  - template: "water draining next to a cracked wall"
    images: 6
seed: 7
num_inference_steps: 2
width: 64
height: 64
splits: {train: 0.75, test: 0.25}
"""  # 24 images, about 8 a shard
ARGS = ("--concurrency", "1", "--no-progress")


@pytest.fixture(scope="module")
def made(tiny_server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/single: the spec in one run; root/shard-I: its three shards, shard 1 killed once and rerun."""
    root = tmp_path_factory.mktemp("shards")
    spec = write_spec(root, SPEC)
    report = run(spec, root / "single", targets=(tiny_server,), concurrency=1, progress=False)
    assert report.complete and report.generated == 24, report.summary()
    for index in (0, 2):
        done = lcmserve("dataset", str(spec), "--out", str(root / f"shard-{index}"), "--shard", f"{index}/3",
                        "--target", tiny_server, *ARGS)
        assert done.returncode == 0, done.stderr
        assert f"of shard {index}/3" in done.stdout
    killed = root / "shard-1"
    command = [sys.executable, "-m", "lcmserve.cli", "dataset", str(spec), "--out", str(killed), "--shard", "auto/3",
               "--target", tiny_server, *ARGS]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**_environ(), "JOB_COMPLETION_INDEX": "1"})
    deadline = time.monotonic() + 120
    while len(rows(killed)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "shard 1 ended before it was killed: make the spec bigger"
    time.sleep(1.0)  # the server drops the killed client's request: the rerun's are alone in their batch
    rerun = lcmserve("dataset", str(spec), "--out", str(killed), "--shard", "1/3", "--target", tiny_server, *ARGS)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped" in rerun.stdout and "skipped 0 " not in rerun.stdout, rerun.stdout
    return root


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}


def test_three_shards_merged_equal_one_run(made: Path, tmp_path: Path) -> None:
    import datasets

    shards = [rows(made / f"shard-{i}") for i in range(3)]
    assert all(shards) and sum(len(s) for s in shards) == 24
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])  # disjoint
    out = tmp_path / "merged"
    done = lcmserve("dataset", "merge", str(out), *(str(made / f"shard-{i}") for i in (2, 0, 1)))
    assert done.returncode == 0, done.stderr
    assert "24 images from 3 shards" in done.stdout
    assert files(out) == files(made / "single")  # names, metadata lines in order, contact sheets, bytes
    manifest = json.loads((out / "dataset.json").read_text())
    single = json.loads((made / "single" / "dataset.json").read_text())
    assert manifest["spec"] == single["spec"] and manifest["counts"] == single["counts"] and manifest["complete"]
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    assert [s["images"] for s in manifest["shards"]] == [len(s) for s in shards]
    assert manifest["shards"][1]["runs"] == 2 and all(s["total_wall_s"] > 0 for s in manifest["shards"])
    assert sum(s.num_rows for s in datasets.load_dataset("imagefolder", data_dir=str(out)).values()) == 24


def test_merge_refuses_another_spec_a_missing_shard_and_duplicates(made: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-spec"
    shutil.copytree(made / "shard-1", other)
    manifest = json.loads((other / "dataset.json").read_text())
    manifest["spec"]["seed"] = 8
    (other / "dataset.json").write_text(json.dumps(manifest))
    shard = [str(made / f"shard-{i}") for i in range(3)]
    cases = [
        ([shard[0], str(other), shard[2]], "was made from another spec than", "seed"),
        (shard[:2], "shard 2/3 missing", "--shard I/3"),
        ([shard[0], shard[1], shard[1]], "shard 1/3 given twice", shard[1]),
        ([shard[0], shard[1], str(made / "single")], "not a shard", "without --shard"),
    ]
    for folders, message, detail in cases:
        out = tmp_path / "out"
        done = lcmserve("dataset", "merge", str(out), *folders)
        assert done.returncode == 2 and message in done.stderr and detail in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and not out.exists()  # refused before writing anything


def test_a_shard_folder_is_not_another_shard(made: Path, tiny_server: str) -> None:
    with pytest.raises(DatasetError, match="holds shard 0/3; this run makes shard 1/3"):
        run(made / "spec.yaml", made / "shard-0", targets=(tiny_server,), shard=(1, 3), progress=False)


def test_min_score_without_a_scorer_is_refused_before_the_job_starts(tiny_server: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC + "candidates: 2\nmin_score: 20\nmax_rounds: 2\n")
    done = lcmserve("dataset", str(spec), "--out", str(tmp_path / "out"), "--target", tiny_server, *ARGS)
    assert done.returncode == 2, done.stderr
    assert "min_score: the server at" in done.stderr and "has no scorer" in done.stderr
    assert not rows(tmp_path / "out")  # nothing was made


# ---- without a server ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("3/3", {}, "I must be an integer from 0 to 2, got '3'"),
        ("1", {}, "expected I/N"),
        ("1/0", {}, "N must be an integer from 1"),
        ("a/b", {}, "N must be an integer"),
        ("auto/4", {}, "$JOB_COMPLETION_INDEX is not set"),
        ("auto/4", {"JOB_COMPLETION_INDEX": "4"}, "($JOB_COMPLETION_INDEX='4'): I must be an integer from 0 to 3"),
    ],
)
def test_shard_parsing_errors(text: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(DatasetError) as caught:
        parse_shard(text, environ)
    assert message in str(caught.value)


def test_shard_parsing_and_the_cli_error(tmp_path: Path) -> None:
    assert parse_shard("2/5", {}) == (2, 5)
    assert parse_shard("auto/5", {"JOB_COMPLETION_INDEX": "3"}) == (3, 5)
    spec = write_spec(tmp_path, SPEC)
    done = subprocess.run([sys.executable, "-m", "lcmserve.cli", "dataset", str(spec), "--out", str(tmp_path / "o"),
                           "--shard", "auto/4", "--target", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=60, env=_environ())
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--shard auto/4: $JOB_COMPLETION_INDEX is not set" in done.stderr


@pytest.mark.parametrize("count", [1, 3, 7])
def test_shards_are_disjoint_and_cover_the_plan(count: int, tmp_path: Path) -> None:
    spec = parse_spec({"prompts": [{"template": "a {k} wall", "vars": {"k": list("abcdefgh")}, "images": 25}],
                       "images_per_request": 4}, tmp_path)
    plan = make_plan(spec)
    shards = [shard_plan(plan, (i, count), spec.images_per_request).images for i in range(count)]
    names = [i.file_name for shard in shards for i in shard]
    assert len(names) == len(set(names)) == len(plan.images) == 200
    assert all(shards)  # spread over every shard
    for shard in shards:  # a request's images (4 consecutive seeds of one prompt) stay in one shard
        assert {(i.prompt_id, i.image_index // 4) for i in shard}.isdisjoint(
            {(i.prompt_id, i.image_index // 4) for other in shards if other is not shard for i in other})


SWEEP = {
    "prompts": [
        {"template": "a {kind} crack", "vars": {"kind": ["hairline", "spalled"], "lora": ["cracks_v1", "cracks_v2"],
                                               "scale": [0.5, 1.0]},
         "adapters": {"{lora}": "{scale}"}, "images": 2},
        {"template": "a clean wall", "adapters": {"cracks_v1": 0.0}},
    ],
    "adapters": {"concrete": 0.3},
}


def test_adapter_sweep_expands_into_metadata_columns(tmp_path: Path) -> None:
    from lcmserve.dataset.store import metadata_row

    spec = parse_spec(SWEEP, tmp_path)
    plan = make_plan(spec)
    assert len(plan.images) == 2 * 2 * 2 * 2 + 1
    first = plan.images[0]
    assert first.adapters == (("concrete", 0.3), ("cracks_v1", 0.5))
    row = metadata_row(spec, plan, first, "0" * 64)
    assert (row["lora"], row["scale"], row["adapters"]) == ("cracks_v1", "0.5", "concrete:0.3,cracks_v1:0.5")
    assert plan.images[-1].adapters == (("concrete", 0.3), ("cracks_v1", 0.0))
    # A sweep over adapters and scales keeps the noise: the same seeds (and split) for every variant.
    variants = [i for i in plan.images if i.prompt.startswith("a hairline") and i.image_index == 0]
    assert len(variants) == 4 and len({i.seed for i in variants}) == 1 and len({i.file_name for i in variants}) == 4
    assert len({i.seed for i in plan.images if i.prompt.startswith("a spalled")}) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"adapters": {"x": 9}}, "adapters.x: scale 9 is out of range -8 to 8"),
        ({"adapters": ["x"]}, "adapters: must be a mapping of adapter name: scale"),
        ({"adapters": {"{lora}": 1}}, "the spec's adapters are literal"),
        ({"prompts": [{"template": "a wall", "adapters": {"{lora}": 1}}]}, "{lora} has no entry in prompts[0].vars"),
        ({"prompts": [{"template": "a wall", "vars": {"s": ["x"]}, "adapters": {"a": "{s}"}}]},
         "prompts[0].adapters.a: scale 'x' is not a number"),
        ({"candidates": 9}, "candidates: 9 is out of range 1 to 8"),
        ({"max_rounds": 2}, "max_rounds: needs min_score"),
        ({"min_score": 20, "on_fail": "drop"}, "on_fail: 'drop' is not one of keep, skip"),
        ({"candidates": 2, "images_per_request": 2}, "images_per_request: 2 with candidates"),
    ],
)
def test_best_of_n_and_adapter_spec_errors_name_the_key(change: dict[str, object], message: str,
                                                         tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        make_plan(parse_spec({"prompts": [{"template": "a wall"}], **change}, tmp_path))
    assert message in str(caught.value)


def test_best_of_n_seeds_do_not_overlap(tmp_path: Path) -> None:
    spec = parse_spec({"prompts": [{"template": "a wall", "images": 3}], "candidates": 3, "min_score": 25,
                       "max_rounds": 2}, tmp_path)
    seeds = [i.seed for i in make_plan(spec).images]
    assert [s - seeds[0] for s in seeds] == [0, 6, 12]  # each image owns K x R = 6 seeds
    plain = make_plan(parse_spec({"prompts": [{"template": "a wall", "images": 3}]}, tmp_path)).images
    assert seeds[0] == plain[0].seed and [i.split for i in make_plan(spec).images] == [i.split for i in plain]


def test_contact_sheets_print_each_score_under_its_seed(tmp_path: Path) -> None:
    import io

    from PIL import Image, ImageDraw

    from lcmserve.dataset.contact import _LINE_H, _sheet
    from lcmserve.dataset.plan import PlannedImage

    (tmp_path / "train").mkdir()
    images = []
    for k in range(2):
        name = f"abcdef012345-{k:04d}.png"
        Image.new("RGB", (64, 64), "grey").save(tmp_path / "train" / name)
        images.append(PlannedImage(order=k, prompt_id="abcdef012345", prompt="a wall", negative_prompt="",
                                   template="a wall", variables=(), image_index=k, seed=10 + k, split="train",
                                   file_name=name, init_image=None, mask=None, width=64, height=64))
    rows = [{"seed": 11, "score": 27.345}, {"seed": 12, "score": 19.0}]
    with Image.open(io.BytesIO(_sheet(tmp_path, images, Image, ImageDraw, rows))) as sheet:
        scored = sheet.size
    with Image.open(io.BytesIO(_sheet(tmp_path, images, Image, ImageDraw, [{"seed": 11}, {"seed": 12}]))) as sheet:
        plain = sheet.size
    assert scored[1] == plain[1] + _LINE_H  # a second label line under each tile: "score 27.35"
