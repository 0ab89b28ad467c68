"""Connection limits end to end (issue 10, item 6): --max-concurrent-rpcs refuses what is beyond it,
and a client that pings an idle connection every 10 s keeps it (no GOAWAY for too many pings)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import ServerProcess

from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def one_rpc_server(tiny_artifact) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    server = ServerProcess("--model", str(tiny_artifact), "--metrics-port", "-1", "--max-concurrent-rpcs", "1")
    yield server
    server.stop()


def test_calls_beyond_max_concurrent_rpcs_are_refused(one_rpc_server: ServerProcess) -> None:
    long = pb.GenerateRequest(prompt="holds the only slot", num_inference_steps=8, width=256, height=256, seed=1)
    short = pb.GenerateRequest(prompt="one too many", num_inference_steps=1, width=64, height=64, seed=2)
    # Two connections (channels with the same target and arguments would share one, whose per-connection
    # stream limit makes a second call wait instead of being refused).
    own = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(one_rpc_server.target, options=own) as first, \
            grpc.insecure_channel(one_rpc_server.target, options=own) as other:
        stream = pb_grpc.GenerationServiceStub(first).Generate(long, timeout=120)
        next(stream)  # in flight: the server's one RPC
        with pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.GenerationServiceStub(other).Generate(short, timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(stream)[-1].HasField("summary")  # the one in flight is untouched
    with grpc.insecure_channel(one_rpc_server.target) as again:  # and the slot is free again after it
        responses = list(pb_grpc.GenerationServiceStub(again).Generate(short, timeout=60))
    assert responses[-1].HasField("summary")


@pytest.mark.slow
def test_client_pings_every_10_s_keep_an_idle_connection(tiny_server: str) -> None:
    """gRPC's default server policy answers pings more often than every 5 minutes without data with a
    GOAWAY (too_many_pings), which drops the connection: the channel would leave READY."""
    options = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
               ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    states: list[grpc.ChannelConnectivity] = []
    seen = threading.Lock()

    def watch(state: grpc.ChannelConnectivity) -> None:
        with seen:
            states.append(state)

    with grpc.insecure_channel(tiny_server, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        channel.subscribe(watch, try_to_connect=True)
        time.sleep(35)  # three client pings on an idle connection
        with seen:
            after_ready = states[states.index(grpc.ChannelConnectivity.READY):]
        assert after_ready and set(after_ready) == {grpc.ChannelConnectivity.READY}, states
        reply = pb_grpc.GenerationServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert reply.base
        channel.unsubscribe(watch)
