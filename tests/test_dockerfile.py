"""The Dockerfile's contract, read from the file (no build; scripts/container_check.sh builds and runs it).

Default base python:3.12-slim behind `ARG BASE_IMAGE`, `ARG TORCH` (a requirement or a wheel in the
build context), a non-root USER, a HEALTHCHECK through `lcmserve health` on the served port, and
every path it copies present in the repository and in the build context.
"""

from __future__ import annotations

import fnmatch
import json
import pathlib
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) in order: continuation lines joined, comment lines dropped (as Docker does)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, its FROM first (the ARGs before the first FROM left out)."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, arguments))
    return stages


def _final(keyword: str) -> str:
    """The arguments of the final stage's last `keyword` instruction (the one that takes effect)."""
    found = [arguments for k, arguments in _stages()[-1] if k == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def _copy_sources(arguments: str) -> list[str] | None:
    """The sources of a COPY from the build context; None for COPY --from (another stage or image)."""
    words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
    if any(word.startswith("--from=") for word in words):
        return None
    words = [word for word in words if not word.startswith("--")]
    return words[:-1]


def _dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    parts = pathlib.PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) for pattern in patterns for prefix in prefixes)


def test_default_base_is_python_slim_behind_build_arg() -> None:
    before_first_from = []
    for keyword, arguments in _instructions():
        if keyword == "FROM":
            break
        before_first_from.append((keyword, arguments))
    assert ("ARG", "BASE_IMAGE=python:3.12-slim") in before_first_from
    stage_names = set()
    for stage in _stages():
        image, _, name = stage[0][1].partition(" AS ")
        assert image in {"${BASE_IMAGE}", "$BASE_IMAGE"} | stage_names, f"FROM {image}: not the BASE_IMAGE arg"
        stage_names.add(name.strip())


def test_torch_arg_is_a_requirement_or_a_wheel_in_the_context() -> None:
    final = _stages()[-1]
    assert ("ARG", "TORCH=torch==2.13.0") in final  # PyPI's torch (CUDA build) by default, for GPU hosts
    assert any(k == "ARG" and a.startswith("TORCHVISION=") for k, a in final)
    installs = [a for k, a in final if k == "RUN" and '"$TORCH"' in a]
    assert len(installs) == 1, "one RUN installs $TORCH"
    # A wheel path in TORCH is read from the build context, mounted for that step and made the cwd.
    assert "--mount=type=bind,target=/context" in installs[0] and "cd /context" in installs[0]
    assert "pip install" in installs[0]


def test_runs_as_non_root_user_made_in_the_image() -> None:
    user = _final("USER")
    assert user.split(":")[0] not in {"root", "0", ""}
    runs = " ".join(a for k, a in _stages()[-1] if k == "RUN")
    assert f"useradd --create-home --uid 1000 {user}" in runs  # uid 1000: deploy/kubernetes runs as it
    assert f"chown {user}:{user} /models" in runs  # the volume (caches, artifacts) is the user's


def test_healthcheck_asks_the_served_port_over_grpc_health() -> None:
    options, _, command = _final("HEALTHCHECK").partition("CMD ")
    assert "--timeout=" in options and "--start-period=" in options
    test = json.loads(command)
    assert test[:3] == ["lcmserve", "health", "--target"]
    entrypoint = json.loads(_final("ENTRYPOINT"))
    assert entrypoint[:2] == ["lcmserve", "serve"]
    port = entrypoint[entrypoint.index("--port") + 1]
    assert test[3] == f"127.0.0.1:{port}"
    exposed = _final("EXPOSE").split()
    assert port in exposed


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    sources = [s for k, a in _instructions() if k == "COPY" for s in (_copy_sources(a) or [])]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not _dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_the_wheel_build_copies_every_folder_pyproject_maps() -> None:
    """pip builds the wheel from what the build stage copied: every package folder, whole, and the readme."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    build_stage = _stages()[0]
    copied = {s.rstrip("/") for k, a in build_stage if k == "COPY" for s in (_copy_sources(a) or [])}
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    for package, folder in pyproject["tool"]["setuptools"]["package-dir"].items():
        top = pathlib.PurePosixPath(folder).parts[0]
        assert top in copied, f"{package} lives in {folder}/, which the build stage does not copy"


def test_container_check_script_parses_and_has_a_make_target() -> None:
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "container_check.sh")], check=True)
    makefile = (REPO / "Makefile").read_text()
    assert "\ncontainer-check:" in makefile and "scripts/container_check.sh" in makefile
