"""Minimal repros of issue #15's predicted CUDA failures, on tiny modules (parts of gpu_probe.py).

Each one reports what happened as a row (`reproduced`: the predicted failure happened) and raises
only when the repro itself could not run; a reproduced bug is a result, not a failed part.
  failed_capture  item 3: BucketedGraphs after a capture that fails; raw torch.cuda.graph beside it
  compile_thread  item 2: torch.compile(mode="reduce-overhead") warmed in the main thread, a new
                  batch size from another thread (the engine's case), and the two ways out
  aoti_graph      item 1: an AOTInductor package captured at batch 1, then called at batch 2, loaded
                  with run_single_threaded=True (the server's way, expected to pass) and without
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch


class ProbeLike(Protocol):
    work: pathlib.Path
    device: torch.device

    def row(self, part: str, **fields: Any) -> None: ...


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _host_sync_inside(x: torch.Tensor) -> torch.Tensor:
    """Doubles x + 1, with a host sync in the middle: forbidden while a stream captures."""
    y = x * 2
    if float(y.abs().sum()) < 0:  # .item()-like sync: invalidates a capture
        y = -y
    return y + 1


def failed_capture(probe: ProbeLike) -> dict[str, Any]:
    from lcmserve.server.engine.cuda_graphs import BucketedGraphs

    caller = torch.cuda.current_stream()
    x = torch.randn(3, 64, device=probe.device)
    with torch.inference_mode():
        graphs = BucketedGraphs(_host_sync_inside, (4,), "probe-bad")
        out = graphs(x)
        fixed = {
            "variant": "BucketedGraphs", "disabled": bool(graphs.disabled), "reason": (graphs.disabled or "")[:160],
            "stream_restored": torch.cuda.current_stream() == caller,
            "capturing": torch.cuda.is_current_stream_capturing(),
            "eager_result_ok": bool(torch.allclose(out, x * 2 + 1)),
            "second_call_eager": bool(torch.allclose(graphs(x), x * 2 + 1)) and graphs.replays == 0,
        }
        good = BucketedGraphs(lambda t: t * 3, (4,), "probe-good")  # allocator not left in capture mode
        fixed["next_capture_ok"] = bool(torch.allclose(good(x), x * 3)) and good.replays == 1
    probe.row("failed_capture", **fixed)

    # The same failure with torch.cuda.graph alone: where is the thread's stream afterwards?
    graph = torch.cuda.CUDAGraph()
    static = x.clone()
    raw: dict[str, Any] = {"variant": "raw torch.cuda.graph"}
    try:
        with torch.inference_mode(), torch.cuda.graph(graph):
            _host_sync_inside(static)
        raw["raised"] = False
    except Exception as exc:  # noqa: BLE001 - the expected outcome
        raw["raised"] = True
        raw["error"] = _error(exc)
    raw["left_on_capture_stream"] = torch.cuda.current_stream() != caller
    raw["reproduced"] = raw["left_on_capture_stream"]
    torch.cuda.set_stream(caller)
    try:
        pool = graph.pool()
    except RuntimeError as exc:  # torch may refuse the pool id of a capture that did not end well
        raw["allocator_left_routing"] = f"unknown ({_error(exc)[:120]})"
    else:
        try:  # succeeds only if the failed capture left the allocator routing to its pool
            torch._C._cuda_endAllocateToPool(caller.device_index, pool)
            raw["allocator_left_routing"] = True
        except RuntimeError:
            raw["allocator_left_routing"] = False
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:
        raw["sync_error"] = _error(exc)
    probe.row("failed_capture", **raw)
    ok = fixed["stream_restored"] and fixed["eager_result_ok"] and fixed["next_capture_ok"] and fixed["disabled"]
    return {"fix_holds": bool(ok), "raw_left_on_capture_stream": raw["left_on_capture_stream"]}


def _tiny_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


def _in_thread(fn: Callable[[], None], timeout_s: float = 60.0) -> str | None:
    """Run fn in a new thread (under inference_mode, as the engine thread); its error, or None."""
    errors: list[str] = []

    def body() -> None:
        try:
            with torch.inference_mode():
                fn()
        except BaseException as exc:  # noqa: BLE001 - reported
            errors.append(_error(exc))

    thread = threading.Thread(target=body, name="probe-engine-thread", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"still running after {timeout_s:.0f} s"
    return errors[0] if errors else None


def compile_thread(probe: ProbeLike) -> dict[str, Any]:
    from lcmserve.server.engine.cuda_graphs import BucketedGraphs

    device = probe.device
    x1, x2, x3 = (torch.randn(n, 64, device=device, dtype=torch.float16) for n in (1, 2, 3))
    outcomes: dict[str, str] = {}
    # (name, mode, warmed in the main thread, called through BucketedGraphs in the 2nd thread)
    variants: list[tuple[str, str, bool, bool]] = [
        ("reduce-overhead: warm in main, batch 2 in a 2nd thread (the engine's case)", "reduce-overhead", True, False),
        ("reduce-overhead: warm and run in the 2nd thread", "reduce-overhead", False, False),
        ("default mode: warm in main, BucketedGraphs in a 2nd thread", "default", True, True),
    ]
    for name, mode, warm_in_main, bucketed in variants:
        torch._dynamo.reset()
        module = _tiny_mlp().to(device, torch.float16).eval()
        compiled: Callable[..., torch.Tensor] = torch.compile(module, mode=mode)
        with torch.inference_mode():
            reference = module(x2)

        def warm(compiled: Callable[..., torch.Tensor] = compiled) -> None:
            for _ in range(3):
                compiled(x1)

        def serve(compiled: Callable[..., torch.Tensor] = compiled, reference: torch.Tensor = reference,
                  bucketed: bool = bucketed) -> None:
            fn = BucketedGraphs(compiled, (2, 3), "probe-compiled") if bucketed else compiled
            for _ in range(3):
                out = fn(x2).clone()
                fn(x3)
            torch.cuda.synchronize()
            if isinstance(fn, BucketedGraphs) and (fn.disabled or fn.captures != 2):
                raise RuntimeError(f"graphs of the compiled callable: {fn.stats()} {fn.disabled or ''}")
            if not torch.allclose(out.float(), reference.float(), atol=1e-2):
                raise AssertionError(f"wrong result: max |diff| {float((out - reference).abs().max())}")

        def both(warm: Callable[[], None] = warm, serve: Callable[[], None] = serve) -> None:
            warm()
            serve()

        if warm_in_main:
            with torch.inference_mode():
                warm()
            error = _in_thread(serve)
        else:
            error = _in_thread(both)
        outcomes[name] = error or "ok"
        probe.row("compile_thread", variant=name, ok=error is None, error=error or "")
    engine_case = outcomes[variants[0][0]]
    return {"reproduced": engine_case != "ok", "engine_case": engine_case[:160]}


class _TinyConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.nn.functional.silu(self.conv(x)))
        return out


def aoti_graph(probe: ProbeLike) -> dict[str, Any]:
    from lcmserve.server.engine.cuda_graphs import BucketedGraphs

    device = probe.device
    module = _TinyConv().to(device, torch.float16).eval()
    example = torch.randn(2, 4, 16, 16, device=device, dtype=torch.float16)
    batch = torch.export.Dim("batch", min=1, max=63)
    with torch.inference_mode():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    package = str(probe.work / "probe_tiny_conv.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=package)
    results: dict[str, Any] = {}
    for single in (True, False):  # the variant expected to pass first: a cut part still has its row
        runner = torch._inductor.aoti_load_package(package, run_single_threaded=single)
        variant = f"aoti_load_package(run_single_threaded={single})"
        graphs = BucketedGraphs(lambda x, runner=runner: runner(x), (1, 2), f"probe-aoti-{single}")
        row: dict[str, Any] = {"variant": variant}
        with torch.inference_mode():
            x1, x2 = (torch.randn(n, 4, 16, 16, device=device, dtype=torch.float16) for n in (1, 2))
            try:
                out1 = graphs(x1)  # capture at bucket 1
                out2 = graphs(x2)  # warm-up then capture at bucket 2: the predicted failure
                torch.cuda.synchronize()
                row["max_abs_diff_b1"] = float((out1 - module(x1)).abs().max())
                row["max_abs_diff_b2"] = float((out2 - module(x2)).abs().max())
                row["error"] = ""
            except Exception as exc:  # noqa: BLE001 - the predicted outcome for the default runner
                row["error"] = _error(exc)
        row.update(captures=graphs.captures, disabled=(graphs.disabled or "")[:200], replays=graphs.replays)
        row["ok"] = not row["error"] and not graphs.disabled and graphs.captures == 2
        results[variant] = row["ok"]
        probe.row("aoti_graph", **row)
        torch.cuda.set_stream(torch.cuda.default_stream())
    return {"reproduced": not results["aoti_load_package(run_single_threaded=False)"],
            "single_threaded_ok": results["aoti_load_package(run_single_threaded=True)"]}
