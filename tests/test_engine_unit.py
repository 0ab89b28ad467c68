"""Pieces of the engine that need no server: the device binding and the LCM step table."""

from __future__ import annotations

import pytest
import torch

from lcmserve.server.engine.loop import bind_device
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
