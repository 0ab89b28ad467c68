"""Pieces of the engine that need no server: the device binding and the LCM step table."""

from __future__ import annotations

import pytest
import torch

from lcmserve.server.engine.device import bind_device
from lcmserve.server.engine.lcm import LcmSchedule, lcm_step, renoise


def test_bind_device_sets_the_current_cuda_device_and_nothing_on_a_cpu() -> None:
    assert bind_device(torch.device("cpu")) is False
    if torch.cuda.is_available():
        last = torch.device("cuda", torch.cuda.device_count() - 1)
        assert bind_device(last) is True and torch.cuda.current_device() == last.index
    else:  # the call path is real: asking for a CUDA device here reaches torch.cuda.set_device
        with pytest.raises((RuntimeError, AssertionError, AttributeError)):  # (CPU builds lack the binding)
            bind_device(torch.device("cuda", 1))


def test_step_table_matches_the_scheduler_for_every_step_count() -> None:
    from diffusers import LCMScheduler

    from lcmserve.export.presets import SD15_SCHEDULER_CONFIG

    scheduler = LCMScheduler(**SD15_SCHEDULER_CONFIG)
    schedule = LcmSchedule(scheduler, max_steps=8)
    gen = torch.Generator().manual_seed(0)
    for num_steps in range(1, 9):
        reference = LCMScheduler.from_config(scheduler.config)
        reference.set_timesteps(num_steps)
        sample = torch.randn(1, 4, 8, 8, generator=gen)
        steps = schedule.steps[num_steps]
        assert [s.timestep for s in steps] == reference.timesteps.tolist()
        for index, step in enumerate(steps):
            eps = torch.randn(1, 4, 8, 8, generator=gen)
            noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(index))
            c = schedule.coefficients(torch.tensor([step.row]))
            denoised = lcm_step(sample, eps, c)
            ours = denoised if step.is_last else renoise(denoised, noise, c)
            # LCMScheduler.step draws its renoise noise from the generator it is given: the same draw.
            # The timestep goes in as the pipeline passes it (a 0-d tensor from scheduler.timesteps): with a
            # Python int the boundary scalings are computed in float64 instead of float32, and on some
            # CPUs (AMD EPYC here) c_out then rounds to 0.99999994 where the pipeline's is 1.0.
            out = reference.step(eps, reference.timesteps[index], sample, generator=torch.Generator().manual_seed(index))
            prev, ref_denoised = out.prev_sample, out.denoised
            torch.testing.assert_close(denoised, ref_denoised, rtol=0, atol=0)
            torch.testing.assert_close(ours, prev, rtol=0, atol=0)
            sample = ours
        assert steps[-1].is_last and not any(s.is_last for s in steps[:-1])



def test_cuda_graph_counters_reach_metrics() -> None:
    from lcmserve.server.edge.metrics import Metrics
    from lcmserve.server.protocol import GraphStats

    metrics = Metrics()
    metrics.record(GraphStats("unet", (("captures", 10), ("eager_calls", 3))))
    metrics.record(GraphStats("unet", (("captures", 10), ("eager_calls", 5))))  # cumulative counters
    value = metrics.registry.get_sample_value
    assert value("lcmserve_cuda_graph_events", {"callable": "unet", "counter": "eager_calls"}) == 5
    assert value("lcmserve_cuda_graph_events", {"callable": "unet", "counter": "captures"}) == 10


@pytest.mark.parametrize("error", [OSError("libnvjpeg.so.13: cannot open shared object file"),
                                   ValueError("nvjpeg: unsupported"), AttributeError("no encode_jpeg"),
                                   RuntimeError("CUDA error: invalid device ordinal"), Exception("anything else")],
                         ids=lambda e: type(e).__name__)
def test_gpu_jpeg_selection_survives_any_exception(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 18 item 5: whatever goes wrong selecting nvjpeg, the server serves with the host encoder,
    saying so in one log line."""
    from lcmserve.server.engine.encode import select_jpeg_encoder

    def load(device: torch.device):  # type: ignore[no-untyped-def]
        raise error

    with caplog.at_level("INFO", logger="lcmserve.encode"):
        assert select_jpeg_encoder(torch.device("cuda", 0), load) is None
    assert len(caplog.records) == 1 and "JPEG on the host" in caplog.records[0].getMessage()


def test_gpu_jpeg_is_probed_at_a_real_image_size() -> None:
    from lcmserve.server.engine.encode import PROBE_SHAPE, probe_jpeg

    seen: list[tuple[int, ...]] = []

    def encode_jpeg(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
        seen.extend(tuple(image.shape) for image in images)
        return [torch.tensor(list(b"\xff\xd8\xff\xd9"), dtype=torch.uint8) for _ in images]

    probe_jpeg(encode_jpeg, torch.device("cpu"))
    assert seen == [(3, 512, 512)] == [PROBE_SHAPE]
    with pytest.raises(RuntimeError, match="no JPEG"):
        probe_jpeg(lambda images, quality: [torch.zeros(4, dtype=torch.uint8)], torch.device("cpu"))


def test_sticky_device_errors_are_told_from_a_bad_batch() -> None:
    from lcmserve.server.engine.device import is_sticky_device_error

    assert is_sticky_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_sticky_device_error(RuntimeError("CUDA error: unspecified launch failure"))
    if isinstance(getattr(torch, "AcceleratorError", None), type):
        assert is_sticky_device_error(torch.AcceleratorError("an illegal instruction was encountered"))
    assert not is_sticky_device_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_sticky_device_error(RuntimeError("shape mismatch: CUDA error mentioned later"))
    assert not is_sticky_device_error(ValueError("CUDA error: not a RuntimeError"))


def test_the_fault_switch_parses_every_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    from lcmserve.server.config import FaultInjection

    monkeypatch.setenv(FaultInjection.ENV, "cuda_error_seed=669, iteration_oom_seed=668")
    assert FaultInjection.from_env() == FaultInjection(cuda_error_seed=669, iteration_oom_seed=668)
    monkeypatch.setenv(FaultInjection.ENV, "cuda_error=1")
    with pytest.raises(ValueError, match="cuda_error_seed"):
        FaultInjection.from_env()
