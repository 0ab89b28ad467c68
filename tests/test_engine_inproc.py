"""The engine in-process (tests/engine_fixture.py): the real tiny model, a list sink, no server.

Admission order and the head-of-line accounting of submit, OrderedEvents, cancellation and deadlines
leaving the batch, batch-mix independence, no Python list indexing a tensor in a step, draws made at
submit, and faults injected where they happen (a failing UNet call) rather than by test hooks in the
loop.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from engine_fixture import EngineHarness, failure_of, pixels, steps_of
from torch.overrides import TorchFunctionMode

from lcmserve.server.config import EngineConfig, FaultInjection
from lcmserve.server.engine.faults import FaultInjectingEngine, make_engine
from lcmserve.server.engine.work import EngineStopped, OrderedEvents, QueueFull
from lcmserve.server.model.runtime import Runtime
from lcmserve.server.protocol import Admitted, Failure, ImageEvent, Queued, StepEvent, Summary


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    from lcmserve.server.model.loader import load_runtime

    return load_runtime("tiny", device="cpu")


@pytest.fixture
def harness(runtime: Runtime) -> Iterator[EngineHarness]:
    h = EngineHarness(runtime)
    yield h
    h.close()


def _harness(runtime: Runtime, **config: Any) -> EngineHarness:
    return EngineHarness(runtime, **config)


# ---- admission ----------------------------------------------------------------------------------------


def test_admission_in_line_order_and_the_head_keeps_its_place(runtime: Runtime) -> None:
    """Rows free go to the head of the line; a request that does not fit keeps its place, and nobody
    behind it overtakes, even one that would fit."""
    h = _harness(runtime, max_batch_size=4)
    try:
        first = h.submit(num_images=3, num_steps=2)  # 3 rows
        guided = h.submit(guidance_scale=2.0, num_steps=1)  # 2 rows: does not fit beside the first
        small = h.submit(num_steps=1)  # 1 row: would fit, but waits behind the head
        h.iterate()
        assert len(steps_of(h.of(first))) == 3
        assert not h.of(guided) and not h.of(small)
        h.iterate()  # the first request's last step: it leaves the batch after this iteration
        assert not h.of(guided) and not h.of(small)
        h.iterate()
        assert [len(steps_of(h.of(r))) for r in (guided, small)] == [1, 1]
        h.run(first, guided, small)
        admitted = [m for m in h.metrics if isinstance(m, Admitted)]
        assert len(admitted) == 3  # one per request, when its first image joined the batch
        assert sum(m.delta for m in h.metrics if isinstance(m, Queued)) == 0
    finally:
        h.close()


def test_submit_counts_only_requests_waiting_beyond_the_next_batch(runtime: Runtime) -> None:
    """Free rows are not a queue: requests the next admission takes in never count against
    max_queued_requests; those beyond it do, in line order."""
    h = _harness(runtime, max_batch_size=4, max_queued_requests=1)
    try:
        h.submit(num_images=2)  # rows 2 of 4
        h.submit(guidance_scale=2.0)  # rows 4 of 4
        h.submit()  # beyond the batch: 1 waiting beyond
        with pytest.raises(QueueFull, match="1 requests are waiting beyond the next batch"):
            h.submit()
        h.iterate()  # the first two are in the batch now; the third is still beyond (no free rows)
        with pytest.raises(QueueFull):
            h.submit()
    finally:
        h.close()
    none_queued = _harness(runtime, max_batch_size=4, max_queued_requests=0)
    try:
        none_queued.submit(num_images=4)
        with pytest.raises(QueueFull, match="0 requests are waiting"):
            none_queued.submit()
    finally:
        none_queued.close()


def test_every_draw_is_made_at_submit_in_the_reference_order(harness: EngineHarness) -> None:
    """The images' generator draws are made by submit, on the caller's thread (the engine process's
    receiver), not by the loop: initial latents, then each step's renoise noise, seed + index."""
    request = harness.submit(seed=40, num_images=2, num_steps=3)
    assert len(request.draws) == 2
    for index, draws in enumerate(request.draws):
        generator = torch.Generator("cpu").manual_seed(40 + index)
        want = torch.cat([torch.randn((1, 4, 8, 8), generator=generator) for _ in range(3)])
        assert torch.equal(draws, want)
    harness.run(request)
    assert all(d.numel() == 0 for d in request.draws), "the host copies are let go once on the device"


# ---- events -------------------------------------------------------------------------------------------


def test_ordered_events_wait_for_pictures_being_encoded() -> None:
    got: list[tuple[int, object]] = []
    encoded = threading.Event()
    events = OrderedEvents(7, lambda rid, event: got.append((rid, event)), encoded.set)
    step = StepEvent(image_index=0, step=0, num_steps=1, timestep=999, preview=None, latents=None)
    picture: concurrent.futures.Future[Any] = concurrent.futures.Future()
    summary = Summary(seed=1, num_images=1, prompt_truncated=False, prompt_tokens=3, timings=None)  # type: ignore[arg-type]
    events.put(step)
    events.put(picture)
    events.put(summary)
    assert got == [(7, step)], "the summary waits for the picture ahead of it"
    image = ImageEvent(index=0, seed=1, picture=None, latents=None)  # type: ignore[arg-type]
    picture.set_result(image)
    assert got == [(7, step), (7, image), (7, summary)] and encoded.is_set() and events.closed
    events.put(step)
    assert len(got) == 3, "nothing after a terminal event"

    failed: list[object] = []
    broken = OrderedEvents(8, lambda rid, event: failed.append(event), None)
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    broken.put(future)
    broken.put(summary)
    future.set_exception(ValueError("bad pixels"))
    assert len(failed) == 1 and isinstance(failed[0], Failure) and failed[0].code == grpc.StatusCode.INTERNAL
    assert "bad pixels" in failed[0].message and broken.closed


# ---- requests leaving, and batch-mix independence -------------------------------------------------------


def test_cancelled_and_expired_requests_leave_the_batch_and_the_rest_is_unchanged(harness: EngineHarness) -> None:
    alone = pixels(harness.run(harness.submit("kept", seed=3, num_steps=4, guidance_scale=1.5))[0])
    kept = harness.submit("kept", seed=3, num_steps=4, guidance_scale=1.5)
    cancelled = harness.submit("cancelled", seed=4, num_steps=4)
    expired = harness.submit("expired", seed=5, num_steps=4, guidance_scale=2.0)
    harness.iterate()
    assert [len(steps_of(harness.of(r))) for r in (kept, cancelled, expired)] == [1, 1, 1]
    cancelled.cancelled = True  # as the receiver does on Cancel
    expired.deadline = time.monotonic() - 1
    harness.iterate()
    assert len(steps_of(harness.of(kept))) == 2
    assert len(steps_of(harness.of(cancelled))) == 1 and failure_of(harness.of(cancelled)) is None
    failure = failure_of(harness.of(expired))
    assert failure is not None and failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    events = harness.run(kept)[0]
    assert len(harness.of(cancelled)) == 1 and len(harness.of(expired)) == 2, "no events after leaving"
    assert np.abs(pixels(events)[0] - alone[0]).max() <= 1


def _mix(h: EngineHarness) -> list[dict[str, Any]]:
    """Requests of every kind the step lays out differently: guided or not, step counts that end at
    different iterations, another resolution, img2img, inpainting, previews, latents, several images."""
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes()
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return [
        dict(prompt="plain", seed=11, num_steps=3),
        dict(prompt="guided", seed=12, num_steps=2, guidance_scale=3.0, preview_mode="approx"),
        dict(prompt="two images", seed=13, num_steps=4, num_images=2, include_latents=True),
        dict(prompt="wide", seed=14, num_steps=2, width=96, guidance_scale=1.5, preview_mode="full"),
        dict(prompt="img2img", seed=15, num_steps=4, init_image=init, strength=0.5, guidance_scale=2.0),
        dict(prompt="inpaint", seed=16, num_steps=4, init_image=init, mask_image=mask.tobytes(), strength=0.75),
        dict(prompt="inpaint full", seed=17, num_steps=2, init_image=init, mask_image=mask.tobytes(), strength=1.0),
    ]


def test_batch_mix_independence(harness: EngineHarness) -> None:
    """Every request of a mixed batch gets the images it gets alone."""
    mix = _mix(harness)
    alone = [pixels(harness.run(harness.submit(**fields))[0]) for fields in mix]
    together = [pixels(events) for events in harness.run(*[harness.submit(**fields) for fields in mix])]
    for fields, a, t in zip(mix, alone, together):
        assert len(a) == len(t) == fields.get("num_images", 1)
        assert max(np.abs(x - y).max() for x, y in zip(a, t)) <= 1, f"{fields['prompt']}: changed by its batch"


class _ListIndexes(TorchFunctionMode):
    """Records every tensor indexed with a Python list from code under `under` (the engine's own)."""

    def __init__(self, under: str = "/server/engine/") -> None:
        super().__init__()
        self.under = under
        self.found: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, list) for p in parts):
                caller = sys._getframe(1)
                where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
                if self.under in where.replace("\\", "/"):
                    self.found.append(where)
        return func(*args, **(kwargs or {}))


def test_no_python_list_indexes_a_tensor_in_the_loop(harness: EngineHarness) -> None:
    """Issue 18 item 1: a Python list used as an index makes the host wait for the GPU (a blocking copy
    of the list); the loop uses device index tensors or slices (rows.py). Every layout of the mix
    runs here, on this thread, under a mode that sees each index."""
    check = _ListIndexes(under="/tests/test_engine_inproc.py")
    with check:  # (the mode does see a list index)
        torch.zeros(3)[[0, 2]]
    assert len(check.found) == 1
    probe = _ListIndexes()
    with probe:
        harness.run(*[harness.submit(**fields) for fields in _mix(harness)])
    assert probe.found == []


def test_row_helpers() -> None:
    from lcmserve.server.engine.rows import indices, pick

    x = torch.arange(12.0).view(6, 2)
    assert pick(x, range(6)) is x
    assert torch.equal(pick(x, [2, 3]), x[2:4]) and pick(x, [2, 3]).data_ptr() == x[2:4].data_ptr()  # a view
    assert torch.equal(pick(x, [4, 0, 5]), x[torch.tensor([4, 0, 5])])
    assert pick(x, []).shape == (0, 2)
    a, b, c = indices(torch.device("cpu"), [1, 2], [], [5])
    assert a.tolist() == [1, 2] and b.tolist() == [] and c.tolist() == [5] and a.dtype == torch.long


# ---- faults, injected where they happen ----------------------------------------------------------------


def _failing_unet(harness: EngineHarness, error: BaseException, times: int = 1) -> None:
    real = harness.engine.unet
    left = [times]

    def unet(*args: Any, **kwargs: Any) -> torch.Tensor:
        if left[0] > 0:
            left[0] -= 1
            raise error
        return real(*args, **kwargs)

    harness.engine.unet = unet


@pytest.mark.parametrize(("error", "code"), [
    (RuntimeError("a bad batch"), grpc.StatusCode.INTERNAL),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_a_failing_unet_call_fails_only_its_batch(harness: EngineHarness, error: Exception,
                                                 code: grpc.StatusCode) -> None:
    _failing_unet(harness, error)
    doomed = harness.submit(seed=1, num_images=2)
    harness.iterate()
    failure = failure_of(harness.of(doomed))
    assert failure is not None and failure.code == code and str(error) in failure.message
    after = harness.run(harness.submit(seed=2))[0]
    assert len(pixels(after)) == 1 and isinstance(after[-1], Summary)


_STICKY = [RuntimeError("CUDA error: an illegal memory access was encountered")]
if isinstance(getattr(torch, "AcceleratorError", None), type):
    _STICKY.append(torch.AcceleratorError("CUDA error: unspecified launch failure"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("error", _STICKY, ids=lambda e: type(e).__name__)
def test_a_sticky_device_error_ends_the_loop(runtime: Runtime, error: Exception) -> None:
    """Issue 18 item 4: after a sticky CUDA error every later call would fail; the loop dies of it
    (the engine process then reports LoopDied and exits 3: tests/test_device_errors.py)."""
    h = _harness(runtime)
    died = threading.Event()
    deaths: list[BaseException] = []
    h.engine.on_death = lambda exc: (deaths.append(exc), died.set())
    _failing_unet(h, error)
    try:
        h.engine.start()
        h.submit(seed=3)
        assert died.wait(60), "the loop did not die"
        assert deaths == [error] and h.engine.dead is error
        with pytest.raises(EngineStopped):
            h.submit(seed=4)
    finally:
        h.close()


def test_the_fault_switch_picks_the_fault_injecting_engine(runtime: Runtime) -> None:
    plain = make_engine(runtime, EngineConfig(), lambda rid, event: None, lambda update: None)
    faulty = make_engine(runtime, EngineConfig(faults=FaultInjection(cuda_error_seed=9)),
                         lambda rid, event: None, lambda update: None)
    try:
        assert type(plain).__name__ == "Engine" and isinstance(faulty, FaultInjectingEngine)
    finally:
        plain.stop(1)
        faulty.stop(1)
