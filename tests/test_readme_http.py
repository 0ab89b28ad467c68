"""README's HTTP section, run word for word: its curl snippet (bash) and its OpenAI-SDK snippet
(Python) against a real server. The one substitution: the snippets say port 8000
(`127.0.0.1:8000`), the test server's HTTP port is picked by the OS (--http-port 0)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import REPO, ServerProcess
from PIL import Image

README_ADDRESS = "127.0.0.1:8000"


def _snippet(language: str) -> str:
    """The README's ```language block in its "## HTTP" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## HTTP", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, f"expected one ```{language} block in README's HTTP section"
    assert README_ADDRESS in blocks[0]
    return str(blocks[0])


@pytest.fixture(scope="module")
def address(tiny_artifact: pathlib.Path) -> Iterator[str]:
    process = ServerProcess("--model", str(tiny_artifact), "--http-port", "0", "--metrics-port", "-1")
    try:
        yield process.http_target
    finally:
        process.stop()


def _run(command: list[str], script: str, address: str, cwd: pathlib.Path) -> str:
    done = subprocess.run(command, input=script.replace(README_ADDRESS, address), text=True, cwd=cwd,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_readme_curl_snippet(address: str, tmp_path: pathlib.Path) -> None:
    _run(["bash", "-euo", "pipefail"], _snippet("bash"), address, tmp_path)
    with Image.open(tmp_path / "crack.png") as image:
        assert image.format == "PNG" and image.size == (256, 256)


def test_readme_openai_sdk_snippet(address: str, tmp_path: pathlib.Path) -> None:
    printed = _run([sys.executable, "-"], _snippet("python"), address, tmp_path).split()
    assert printed == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    with Image.open(tmp_path / "wall.png") as image:
        assert image.format == "PNG" and image.size == (256, 256)
