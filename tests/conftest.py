"""Shared fixtures: a private preset cache, an exported tiny artifact, real servers on port 0.

No mocks: servers are real `lcmserve serve` processes serving the real (small) tiny model, and
tests call them with the real client.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240.0  # importing torch + diffusers and building the preset on a busy 2-core CI box

# Presets and exports go to a private cache for the whole session (server subprocesses inherit it);
# nothing may touch the network. Server logs go to a private folder too; both are removed when the
# session ends (a failing test shows the log it needs in its message).
_CACHE = pathlib.Path(tempfile.mkdtemp(prefix="lcmserve-test-cache-"))
_LOGS = pathlib.Path(tempfile.mkdtemp(prefix="lcmserve-test-logs-"))
_LOG_NUMBERS = itertools.count()
os.environ["LCMSERVE_CACHE"] = str(_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ServerProcess:
    """`lcmserve serve ... --port 0` in a subprocess; `target` once it printed `listening on`."""

    def __init__(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        self.log_path = _LOGS / f"server-{next(_LOG_NUMBERS)}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lcmserve.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO,
        )
        self.target = ""
        self.http_target = ""  # "HOST:PORT" of --http-port (printed before the gRPC line)
        found = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("http listening on "):
                    self.http_target = line.split()[-1]
                if line.startswith("listening on "):
                    self.target = line.split()[-1]
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start (exit {self.proc.returncode}):\n{self.log()}")

    def log(self) -> str:
        """The start of the server's log (start-up lines: `metrics on ...`) and its last 6000 characters
        (one access line per request fills the middle)."""
        if not self._log.closed:  # (after stop() too)
            self._log.flush()
        text = self.log_path.read_text()
        return text if len(text) <= 9000 else f"{text[:3000]}\n...\n{text[-6000:]}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave nothing in the temp folder: the session's preset cache and server logs."""
    for folder in (_CACHE, _LOGS):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """`lcmserve export --base tiny --lora <kohya LoRA>:0.8`: a fused float32 artifact on the CPU."""
    import torch

    from lcmserve.export.fuse import export_model
    from lcmserve.export.loading import load_pipeline
    from lcmserve.export.lora import LoraSpec
    from synthetic import make_lora

    root = tmp_path_factory.mktemp("artifact")
    lora = root / "crack_kohya.safetensors"
    make_lora(load_pipeline("tiny", dtype=torch.float32, device="cpu"), lora, fmt="kohya", rank=4, seed=1)
    out = root / "tiny-crack"
    export_model("tiny", [LoraSpec(str(lora), 0.8)], out, dtype=torch.float32, device="cpu", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_server(tiny_artifact: pathlib.Path) -> Iterator[str]:
    """One server for the session, serving the exported tiny artifact; yields "127.0.0.1:PORT"."""
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "0")
    try:
        yield server.target
    finally:
        server.stop()


@pytest.fixture(scope="session")
def reference_pipe(tiny_artifact: pathlib.Path):  # type: ignore[no-untyped-def]
    """The project's reference for correctness: diffusers itself on the exported folder."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_artifact / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def telemetry_server(tiny_artifact: pathlib.Path):  # type: ignore[no-untyped-def]
    """The tiny artifact with traces, JSON logs, metrics and HTTP, set by LCMSERVE_* variables (telemetry.py)."""
    from telemetry import start

    yield from start(ServerProcess, tiny_artifact)


def reference_image(pipe, prompt: str, *, steps: int, seed: int, width: int = 64, height: int = 64,  # type: ignore[no-untyped-def]
                    guidance: float = 1.0, negative_prompt: str | None = None):
    """diffusers' image for one seed, as uint8 (H, W, 3), rounded as its PIL output is."""
    import numpy as np
    import torch

    images = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                  width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="np").images
    return (images[0] * 255).round().astype(np.uint8)
