"""Per-request LoRA adapters under traffic (issue 21): rows with different adapters share UNet calls and
each gets its own image; a hot load serves what diffusers serves; an unload lets requests in flight
finish; and a soak of loads and unloads under 16 clients.

One server for the module: the session's tiny artifact (a kohya LoRA fused at export) with adapter A
(kohya_ss, text encoder too) and B (diffusers/PEFT) from the start, loading allowed. The reference is
diffusers itself: StableDiffusionPipeline from the artifact's model folder, `load_lora_weights` per
adapter, `set_adapters(names, weights)` unfused, LCMScheduler, the same CPU generator.

The soak test's length: LCMSERVE_ADAPTER_SOAK_S seconds (default 60; minutes by hand, e.g.
`LCMSERVE_ADAPTER_SOAK_S=600 pytest tests/test_adapters_load.py -k soak`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import ServerProcess
from test_img2img import wall_photo
from test_lifecycle import _engine_pids, linux_only

from lcmserve import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    Image,
    InvalidArgumentError,
    ResourceExhaustedError,
    StepEvent,
)

SOAK_S = float(os.environ.get("LCMSERVE_ADAPTER_SOAK_S", "60"))
PROMPT = "a crack in a concrete wall"
SIDE = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    from adapter_files import make_adapter_files

    return make_adapter_files(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(tiny_artifact: pathlib.Path, files: dict[str, pathlib.Path]) -> Iterator[ServerProcess]:
    # --batch-wait-ms: requests sent together start together, so the mixed batch shares its first call too.
    started = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "0", "--batch-wait-ms", "300",
                            "--adapter", f"A={files['kohya_te']}", "--adapter", f"B={files['diffusers']}:0.8",
                            "--max-adapters", "4", "--allow-adapter-loading")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def reference(tiny_artifact: pathlib.Path, files: dict[str, pathlib.Path]):  # type: ignore[no-untyped-def]
    """A function (prompt, adapters {name: scale}, ...) -> diffusers' image as int (H, W, 3); a pipeline of
    its own (the session's reference_pipe stays without LoRAs), each adapter loaded once, unfused."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from test_img2img import pil

    pipe = StableDiffusionPipeline.from_pretrained(tiny_artifact / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    sources = {"A": files["kohya_te"], "B": files["diffusers"], "C": files["kohya_te_b"]}
    loaded: set[str] = set()

    def image(adapters: dict[str, float], *, seed: int, steps: int = 4, guidance: float = 1.0,
              negative_prompt: str | None = None, init_image: bytes | None = None,
              strength: float = 0.8) -> np.ndarray:
        for name in adapters:
            if name not in loaded:
                pipe.load_lora_weights(str(sources[name]), adapter_name=name)
                loaded.add(name)
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters(list(adapters), list(adapters.values()))
        elif loaded:
            pipe.disable_lora()
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                                      negative_prompt=negative_prompt,
                                      generator=torch.Generator("cpu").manual_seed(seed))
        if init_image is None:
            out = pipe(PROMPT, width=SIDE, height=SIDE, **kwargs).images[0]
        else:
            out = img2img(PROMPT, image=pil(init_image), strength=strength, **kwargs).images[0]
        return (out * 255).round().astype(np.uint8).astype(int)

    return image


def _pixels(image: Image) -> np.ndarray:
    return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 3).astype(int)


def _metrics(server: ServerProcess) -> str:
    found = re.search(r"metrics on (http://\S+)", server.log_path.read_text())
    assert found, server.log()
    return urllib.request.urlopen(found.group(1), timeout=10).read().decode()


def _value(metrics: str, series: str) -> float:
    """A sample's value by its name and labels as /metrics writes them; 0 when absent."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# The mixed batch: (adapters, fields), each request its own seed.
PHOTO = wall_photo(SIDE, SIDE, seed=4)
MIXED: list[tuple[dict[str, float], dict[str, Any]]] = [
    ({}, {}),
    ({"A": 1.0}, {}),
    ({"A": 0.5}, {}),
    ({"B": 0.8}, {}),
    ({"A": 0.6, "B": 0.4}, {}),
    ({"A": 1.0}, dict(guidance_scale=4.0, negative_prompt="blurry")),
    ({"A": 0.7}, dict(init_image=PHOTO, strength=0.6)),
    ({"B": 1.0}, dict(init_image=PHOTO, strength=0.8)),
]


async def _generate(target: str, adapters: dict[str, float], seed: int, **fields: Any) -> np.ndarray:
    async with AsyncClient(target, timeout=300, retries=0) as client:
        sized = {} if "init_image" in fields else dict(width=SIDE, height=SIDE)
        result = await client.generate(PROMPT, adapters=adapters or None, seed=seed, num_inference_steps=4,
                                       output_format="raw", **sized, **fields)
    return _pixels(result.images[0])


def test_mixed_adapters_share_unet_calls_and_each_gets_its_own_image(server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    before = _metrics(server)

    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(_generate(server.target, adapters, 100 + i, **fields)
                                      for i, (adapters, fields) in enumerate(MIXED)))

    batched = asyncio.run(together())
    after = _metrics(server)
    calls = _value(after, "lcmserve_inference_batch_size_count") - _value(before, "lcmserve_inference_batch_size_count")
    rows = _value(after, "lcmserve_inference_batch_size_sum") - _value(before, "lcmserve_inference_batch_size_sum")
    small = (_value(after, 'lcmserve_inference_batch_size_bucket{le="4.0"}')
             - _value(before, 'lcmserve_inference_batch_size_bucket{le="4.0"}'))
    assert calls > 0 and small < calls, "no UNet call had more than 4 rows: the requests did not share calls"
    assert rows / calls > 2, (rows, calls)
    for i, ((adapters, fields), got) in enumerate(zip(MIXED, batched)):
        alone = asyncio.run(_generate(server.target, adapters, 100 + i, **fields))
        assert np.abs(got - alone).max() <= 1, f"{adapters} {list(fields)}: batched differs from alone"
        want = reference(adapters, seed=100 + i, guidance=fields.get("guidance_scale", 1.0),
                         negative_prompt=fields.get("negative_prompt"), init_image=fields.get("init_image"),
                         strength=fields.get("strength", 0.8))
        assert np.abs(got - want).max() <= 1, f"{adapters} {list(fields)}: differs from diffusers"
    plain, a_full, a_half = batched[0], batched[1], batched[2]
    assert np.abs(plain - a_full).max() > 8 and np.abs(a_full - a_half).max() > 8  # the adapters do something


def test_hot_load_under_traffic_serves_what_diffusers_serves(server: ServerProcess, files, reference) -> None:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    failures: list[BaseException] = []
    served = Counter[str]()

    def traffic() -> None:
        with Client(server.target, timeout=300, retries=0) as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                adapters = [{}, {"A": 0.9}, {"B": 0.5}][i % 3]
                try:
                    client.generate(PROMPT, adapters=adapters or None, seed=i, num_inference_steps=2, width=SIDE,
                                    height=SIDE, output_format="raw")
                    served["+".join(adapters) or "none"] += 1
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)
                    return

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        with Client(server.target, timeout=300, retries=0) as client:
            while not served:  # traffic is running
                time.sleep(0.1)
            record = client.load_adapter("C", str(files["kohya_te_b"]), 0.9)
            assert (record.rank, sorted(record.targets), record.default_scale) == (8, ["text_encoder", "unet"], 0.9)
            for seed, adapters in ((7, {"C": 1.0}), (8, {"C": 0.5}), (9, {"A": 0.6, "C": 0.4})):
                got = client.generate(PROMPT, adapters=adapters, seed=seed, num_inference_steps=4, width=SIDE,
                                      height=SIDE, output_format="raw")
                want = reference(adapters, seed=seed)
                assert np.abs(_pixels(got.images[0]) - want).max() <= 1, f"{adapters}: differs from diffusers"
            default = client.generate(PROMPT, adapters=["C"], seed=7, num_inference_steps=4, width=SIDE, height=SIDE,
                                      output_format="raw")  # C's default scale, 0.9
            assert np.abs(_pixels(default.images[0]) - reference({"C": 0.9}, seed=7)).max() <= 1
    finally:
        stop.set()
        thread.join()
    assert not failures, failures
    assert sum(served.values()) >= 3


def test_unload_lets_a_request_in_flight_finish_and_refuses_the_next(server: ServerProcess) -> None:
    fields: dict[str, Any] = dict(adapters={"C": 1.0}, seed=31, num_inference_steps=8, width=128, height=128,
                                  output_format="raw")
    with Client(server.target, timeout=300, retries=0) as client:
        if "C" not in {a.name for a in client.list_adapters().adapters}:
            pytest.skip("needs adapter C from the hot-load test")
        alone = _pixels(client.generate(PROMPT, **fields).images[0])
        events = client.stream(PROMPT, **fields)
        with contextlib.closing(events):
            first = next(events)
            assert isinstance(first, StepEvent)  # admitted and running
            with Client(server.target, timeout=60, retries=0) as other:
                other.unload_adapter("C")
            rest = list(events)
        images = [event for event in rest if isinstance(event, Image)]
        assert len(images) == 1 and np.abs(_pixels(images[0]) - alone).max() <= 1
        with pytest.raises(InvalidArgumentError, match="not loaded"):
            client.generate(PROMPT, **fields)
        assert "C" not in {a.name for a in client.list_adapters().adapters}
        assert client.generate(PROMPT, adapters={"A": 1.0}, seed=1, num_inference_steps=1, width=SIDE,
                               height=SIDE).images


# ---- the soak: 16 clients, random adapter sets, loads and unloads every few seconds -------------------


def _rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


SETS: list[dict[str, float]] = [{}, {"A": 1.0}, {"B": 0.6}, {"A": 0.5, "B": 0.5}, {"D": 1.0}, {"A": 0.3, "D": 0.7}]


@pytest.mark.slow
@linux_only
def test_soak_loads_and_unloads_under_16_clients(server: ServerProcess, files) -> None:  # type: ignore[no-untyped-def]
    """D is loaded and unloaded every few seconds while 16 clients send random sets of A, B and D; a
    request naming D while it is out is refused by design (INVALID_ARGUMENT, not loaded); everything else
    succeeds with its solo image, RSS stays flat and /metrics counts what the clients counted."""
    engine = _engine_pids(server)[0]
    cases = [(sets, seed) for seed in (1, 2) for sets in range(len(SETS))]  # (set index, seed)
    with Client(server.target, timeout=300, retries=0) as client:
        client.load_adapter("D", str(files["kohya_b"]))
        solo = {case: _pixels(client.generate(PROMPT, adapters=SETS[case[0]] or None, seed=case[1],
                                              num_inference_steps=2, width=SIDE, height=SIDE,
                                              output_format="raw").images[0]) for case in cases}
    before = _metrics(server)
    counts: Counter[str] = Counter()  # "ok", "refused", "A", "B", "none"
    problems: list[str] = []
    rss: list[int] = []

    async def user(index: int, end: float) -> None:
        draw = random.Random(index)
        async with AsyncClient(server.target, timeout=300, retries=0) as client:
            while time.monotonic() < end:
                case = draw.choice(cases)
                adapters = SETS[case[0]]
                try:
                    result = await client.generate(PROMPT, adapters=adapters or None, seed=case[1],
                                                   num_inference_steps=2, width=SIDE, height=SIDE,
                                                   output_format="raw")
                except InvalidArgumentError as exc:
                    if "D" in adapters and "not loaded" in str(exc):
                        counts["refused"] += 1  # by design: D was out
                        continue
                    problems.append(f"{adapters}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 - every other failure is a finding
                    problems.append(f"{adapters}: {type(exc).__name__}: {exc}")
                    continue
                counts["ok"] += 1
                for name in adapters or {"(none)": 0.0}:
                    counts[name] += 1
                if np.abs(_pixels(result.images[0]) - solo[case]).max() > 1:
                    problems.append(f"{adapters} seed {case[1]}: differs from its solo run")

    async def cycles(end: float) -> int:
        done = 0
        async with AsyncClient(server.target, timeout=300, retries=0) as client:
            while time.monotonic() < end:
                await asyncio.sleep(2.0)
                await client.unload_adapter("D")
                await asyncio.sleep(1.0)
                for _ in range(60):  # the engine frees D's slot once no admitted request uses it
                    try:
                        await client.load_adapter("D", str(files["kohya_b"]))
                        break
                    except (AlreadyExistsError, ResourceExhaustedError):
                        await asyncio.sleep(0.5)
                else:
                    raise AssertionError("D's slot was not freed within 30 s of its unload")
                done += 1
                rss.append(_rss_kib(engine))
        return done

    async def soak() -> int:
        end = time.monotonic() + SOAK_S
        done, *_ = await asyncio.gather(cycles(end), *(user(i, end) for i in range(16)))
        return int(done)

    done = asyncio.run(soak())
    after = _metrics(server)
    assert not problems, problems[:10]
    assert done >= 2 and counts["ok"] > 0, (done, counts)
    # Memory: flat across load/unload cycles (the slots are allocated once; 32 MiB of slack for the allocator).
    half = len(rss) // 2
    assert max(rss[half:]) <= max(rss[:half]) + 32 * 1024, rss
    # /metrics counts what the clients counted (A, B and "(none)" stay loaded all along; D's series goes with it).
    def delta(series: str) -> int:
        return round(_value(after, series) - _value(before, series))
    assert delta('lcmserve_inference_request_total{status="OK",transport="grpc"}') == counts["ok"]
    assert delta('lcmserve_inference_request_total{status="INVALID_ARGUMENT",transport="grpc"}') == counts["refused"]
    for name in ("A", "B", "(none)"):
        assert delta(f'lcmserve_adapter_requests_total{{adapter="{name}"}}') == counts[name], name
    assert delta('lcmserve_adapter_loads_total{status="OK"}') == done
    assert delta('lcmserve_adapter_unloads_total{status="OK"}') == done
