"""A sticky CUDA error ends the server (issue 18 item 4), end to end through a real server.

An illegal address or a launch failure leaves the CUDA context unusable: every later batch would
fail while health said SERVING. The engine treats such an error as the death of its loop, as an
exception escaping it: in-flight requests fail UNAVAILABLE, health turns NOT_SERVING and the server
exits 3 for its supervisor to restart it. On a CPU the error is injected with the documented switch
LCMSERVE_FAULT_INJECTION="cuda_error_seed=N" (server/config.py: FaultInjection).
"""

from __future__ import annotations

import pytest
from conftest import ServerProcess
from test_lifecycle import _assert_not_serving_within_10_s

from lcmserve import Client, UnavailableError

CUDA_ERROR_SEED = 669


def test_a_sticky_cuda_error_fails_in_flight_requests_and_ends_the_server(tiny_artifact, monkeypatch) -> None:
    monkeypatch.setenv("LCMSERVE_FAULT_INJECTION", f"cuda_error_seed={CUDA_ERROR_SEED}")
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1")
    try:
        with Client(server.target) as client, Client(server.target) as killer:
            stream = client.stream("in flight", seed=1, num_inference_steps=8, width=256, height=256)
            next(stream)
            with pytest.raises(UnavailableError, match="engine loop died.*CUDA error"):
                killer.generate("the fault", seed=CUDA_ERROR_SEED, num_inference_steps=1, width=64, height=64,
                                timeout=60)
            with pytest.raises(UnavailableError, match="engine loop died"):
                list(stream)
            _assert_not_serving_within_10_s(client)
        assert server.proc.wait(60) == 3, server.log()
        assert "CUDA error: an illegal memory access was encountered" in server.log()
    finally:
        server.kill()
