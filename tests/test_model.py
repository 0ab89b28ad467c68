"""The model boundary on a CPU, without an export: the typed UNet call, the part policy (compiled where
served, else eager, logged once and counted), and the CUDA-graph bookkeeping around a UNetCall (its
extras included), a capture that runs out of memory, and the graph state GetModelInfo reports.

BucketedGraphs takes its capture function as a parameter: here a "graph" whose replay reruns the real
callable on the static buffers (as tests/test_gpu_tools.py does), so padding and copies run for real.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lcmserve.export.artifact import IO_NAMES
from lcmserve.export.unet_call import INPUT_NAMES, UNetCall
from lcmserve.server.engine.cuda_graphs import BucketedGraphs, graph_states, graphs_off
from graph_fakes import RerunGraph
from lcmserve.server.model.compiled import no_recompile
from lcmserve.server.model.parts import Compiled, Part

WEIGHT = torch.linspace(-1, 1, 16 * 8).view(8, 16)


def fake_unet(call: UNetCall) -> torch.Tensor:
    """A UNet stand-in, rows independent: latents (B, 2, 16) -> (B, 2, 8), scaled by timestep and text,
    plus each row's `slot` extra when the call has one."""
    out = torch.nn.functional.linear(call.latents, WEIGHT).tanh()
    out = out * call.timesteps.view(-1, 1, 1) / 1000 + call.text.mean(dim=(1, 2)).view(-1, 1, 1)
    for name, extra in call.extras:
        if name == "slot":
            out = out + extra.view(-1, 1, 1).float()
    return out


def make_call(batch: int, seed: int = 0, *, slots: bool = False, side: int = 2) -> UNetCall:
    g = torch.Generator().manual_seed(seed)
    extras = (("slot", torch.randint(0, 4, (batch,), generator=g)),) if slots else ()
    return UNetCall(torch.randn(batch, side, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g),
                    torch.randn(batch, 3, 5, generator=g), extras)


class CpuCapture:
    """Records graphs; raises `errors[k]` on the k-th capture (1-based)."""

    def __init__(self, errors: dict[int, Exception] | None = None) -> None:
        self.made: list[RerunGraph] = []
        self.calls = 0
        self.errors = errors or {}

    def __call__(self, fn, static: list[torch.Tensor]) -> tuple[RerunGraph, torch.Tensor]:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls in self.errors:
            raise self.errors[self.calls]
        output = fn(*static)
        graph = RerunGraph(fn, static, output)
        self.made.append(graph)
        return graph, output


# ---- the typed call ----------------------------------------------------------------------------------


def test_the_unet_call_is_the_one_signature_of_exports_and_graphs() -> None:
    assert INPUT_NAMES == ("latents", "timesteps", "text") and IO_NAMES["unet"] == (INPUT_NAMES, "noise")
    call = make_call(3, slots=True)
    assert call.rows == 3 and call.names == (*INPUT_NAMES, "slot")
    assert [x.data_ptr() for x in call.positional()] == [call.latents.data_ptr(), call.timesteps.data_ptr(),
                                                         call.text.data_ptr(), call.extras[0][1].data_ptr()]
    again = UNetCall.from_positional(call.positional(), ("slot",))
    assert again.names == call.names and all(a is b for a, b in zip(again.positional(), call.positional()))
    part = call.rows_slice(1, 3)
    assert part.rows == 2 and torch.equal(part.extras[0][1], call.extras[0][1][1:3])


@pytest.mark.parametrize("change, message", [
    ({"timesteps": torch.zeros(2, dtype=torch.long)}, "timesteps has shape \\(2,\\)"),
    ({"text": torch.zeros(2, 3, 5)}, "text has shape"),
    ({"extras": (("slot", torch.zeros(2)),)}, "slot has shape"),
    ({"extras": (("text", torch.zeros(3)),)}, "extras names"),
], ids=["timesteps-rows", "text-rows", "extra-rows", "extra-name"])  # fmt: skip
def test_a_malformed_call_is_refused_naming_the_input(change: dict[str, object], message: str) -> None:
    fields = {"latents": torch.zeros(3, 2, 16), "timesteps": torch.zeros(3, dtype=torch.long),
              "text": torch.zeros(3, 3, 5), **change}
    with pytest.raises(ValueError, match=message):
        UNetCall(**fields)  # type: ignore[arg-type]


# ---- one part: compiled where served, else eager -------------------------------------------------------


def test_a_part_runs_unserved_shapes_eagerly_logs_once_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def compiled(x: torch.Tensor) -> torch.Tensor:
        calls.append(f"compiled {x.shape[0]}")
        return x * 2

    def eager(x: torch.Tensor) -> torch.Tensor:
        calls.append(f"eager {x.shape[0]}")
        return x * 2

    def serves(inputs: object) -> str | None:
        x = inputs[0]  # type: ignore[index]
        return None if x.shape[-1] == 4 else f"latent size {x.shape[-1]}"

    part = Part("vae_decoder", "aoti", lambda: eager, Compiled(compiled, serves, max_rows=3, served="side 4"))
    assert part.runs == "compiled"
    with caplog.at_level(logging.WARNING, logger="lcmserve.compiled"):
        assert torch.equal(part(torch.ones(8, 4)), torch.full((8, 4), 2.0))  # 3 + 3 + 2 rows, compiled
        for _ in range(3):
            part(torch.ones(2, 5))
    assert calls == ["compiled 3", "compiled 3", "compiled 2", "eager 2", "eager 2", "eager 2"]
    assert part.fallbacks == 3
    lines = [r.message for r in caplog.records]
    assert len(lines) == 1 and "latent size 5 is not served by the aoti artifact (served: side 4)" in lines[0]


def test_a_compiled_call_that_would_recompile_runs_eagerly() -> None:
    """The compile backend's guard: after the warm-up, a shape dynamo has no graph for is declined
    (fail_on_recompile) and run eagerly, not compiled in the middle of traffic."""
    torch._dynamo.reset()
    module = torch.nn.Linear(4, 3)
    compiled = torch.compile(module, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        compiled(torch.ones(2, 4))  # the warm-up
        part = Part("unet", "compile", lambda: module,
                    Compiled(no_recompile(compiled), lambda inputs: None, max_rows=None, served="warmed"))
        x = torch.randn(5, 4)
        assert torch.allclose(part(x), module(x)) and part.fallbacks == 1  # declined: a new batch size
        assert torch.allclose(part(x), module(x)) and part.fallbacks == 2
        part(torch.ones(2, 4))  # the warmed shape stays compiled
    assert part.fallbacks == 2


# ---- CUDA graphs around a UNetCall -------------------------------------------------------------------


@pytest.mark.parametrize("slots", [False, True])
def test_graphs_of_a_unet_call_pad_every_input_and_match_eager(slots: bool) -> None:
    capture = CpuCapture()
    graphs = BucketedGraphs(fake_unet, (2, 4), "unet", capture=capture)
    for seed, batch in enumerate((3, 3, 4, 1)):
        call = make_call(batch, seed, slots=slots)
        assert torch.equal(graphs(call), fake_unet(call))
    assert graphs.captures == 2 and graphs.replays == 4  # buckets 4 (for 3 and 4 rows) and 2 (for 1)
    static = capture.made[0].static
    assert len(static) == (4 if slots else 3) and all(x.shape[0] == 4 for x in static)
    plain = make_call(3, 9)  # same shapes without the extra: another resolution, not the slots' graph
    assert torch.equal(graphs(plain), fake_unet(plain))
    assert graphs.state().enabled and str(graphs.state()) == "enabled"


def test_a_capture_out_of_memory_runs_eagerly_evicts_and_tries_again_later(caplog: pytest.LogCaptureFixture) -> None:
    capture = CpuCapture({2: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")})
    graphs = BucketedGraphs(fake_unet, (4,), "unet", admit_after=2, capture=capture)
    small, large = make_call(4, 1, side=2), make_call(4, 2, side=3)
    graphs(small)  # captured
    with caplog.at_level(logging.WARNING, logger="lcmserve.cuda_graphs"):
        assert torch.equal(graphs(large), fake_unet(large))  # its capture runs out of memory: eager
    assert graphs.capture_ooms == 1 and graphs.evictions == 1 and capture.made[0].released
    assert graphs.disabled is None and graphs.state().enabled  # graphs stay on
    assert "ran out of memory" in caplog.text and "trying again after 2 calls" in caplog.text
    for _ in range(2):  # not tried again at once
        assert torch.equal(graphs(large), fake_unet(large))
    assert capture.calls == 2
    assert torch.equal(graphs(large), fake_unet(large))  # then captured, and replayed
    assert capture.calls == 3 and graphs.captures == 2 and graphs.replays == 2
    assert torch.equal(graphs(small), fake_unet(small))  # the evicted size comes back: captured again
    assert capture.calls == 4


def test_graph_state_says_why_graphs_are_off() -> None:
    capture = CpuCapture({1: RuntimeError("operation not permitted when stream is capturing")})
    graphs = BucketedGraphs(fake_unet, (4,), "unet", capture=capture)
    call = make_call(2)
    assert torch.equal(graphs(call), fake_unet(call))
    state = graphs.state()
    assert not state.enabled and state.name == "unet"
    assert str(state) == "disabled: RuntimeError: operation not permitted when stream is capturing"
    # An engine that never wraps its callables says why, on this machine: no CUDA device.
    assert graphs_off(torch.device("cpu"), cuda_graphs=True, capturable=True) == "no CUDA device (cpu)"
    assert graphs_off(torch.device("cuda", 0), cuda_graphs=False, capturable=True) == "turned off (--no-cuda-graphs)"
    assert "cannot be captured" in str(graphs_off(torch.device("cuda", 0), cuda_graphs=True, capturable=False))
    assert graphs_off(torch.device("cuda", 0), cuda_graphs=True, capturable=True) is None
    states = graph_states({"unet": graphs, "vae": fake_unet}, graphs_off(torch.device("cpu"), True, True))
    assert [str(state) for state in states] == [str(state), "disabled: no CUDA device (cpu)"]


def test_the_runtime_refuses_extras_its_unet_does_not_read() -> None:
    from lcmserve.server.model.loader import load_runtime

    runtime = load_runtime("tiny", device="cpu")
    assert runtime.spec.unet_extras == () and runtime.spec.graph_capturable
    assert runtime.spec.details.part("unet") == "eager" and runtime.fallbacks() == {}
    call = UNetCall(torch.zeros(1, 4, 8, 8), torch.tensor([999]), torch.zeros(1, 77, runtime.spec.text_hidden_size),
                    (("adapter_slots", torch.zeros(1, dtype=torch.long)),))
    with pytest.raises(ValueError, match="reads no adapter_slots"):
        runtime.unet(call)
