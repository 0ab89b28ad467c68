"""The `lcmserve` command against a real server: generate with previews, info, health."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def lcmserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lcmserve.cli", *args], capture_output=True, text=True, timeout=120)


def test_generate_writes_images_and_previews(tiny_server: str, tmp_path) -> None:
    out = tmp_path / "wall.png"
    previews = tmp_path / "previews"
    done = lcmserve("generate", "a crack in a concrete wall", "--target", tiny_server, "--steps", "3", "--seed", "7",
                    "--width", "64", "--height", "96", "--num-images", "2", "-o", str(out), "--previews", str(previews))
    assert done.returncode == 0, done.stderr
    images = sorted(tmp_path.glob("wall-*.png"))
    assert len(images) == 2
    assert all(Image.open(p).size == (64, 96) for p in images)
    steps = sorted(previews.iterdir())
    assert len(steps) == 2 * 3, [p.name for p in steps]  # a preview per step per image
    assert "7" in done.stdout  # the seed is reported


def test_info_and_health(tiny_server: str) -> None:
    info = lcmserve("info", "--target", tiny_server, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["base"] == "tiny"
    assert lcmserve("health", "--target", tiny_server).returncode == 0


def test_bad_request_is_one_clear_line(tiny_server: str) -> None:
    done = lcmserve("generate", "wall", "--target", tiny_server, "--steps", "20")
    assert done.returncode != 0
    assert "num_inference_steps" in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_bad_buckets_before_loading() -> None:
    done = lcmserve("serve", "--model", "tiny", "--port", "0", "--buckets", "0,4")
    assert done.returncode == 2 and "--buckets" in done.stderr and "positive" in done.stderr


def test_serve_help_states_the_real_bucket_default() -> None:
    from lcmserve.server.engine.loop import EngineConfig

    help_text = " ".join(lcmserve("serve", "--help").stdout.split())
    assert f"(default {','.join(map(str, EngineConfig.buckets))})" in help_text
