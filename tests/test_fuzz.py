"""Fuzzing Generate (issue 10): requests drawn from GenerateRequest's own descriptor (hypothesis,
bounded examples), raw random bytes and truncated messages. Every answer is OK, INVALID_ARGUMENT or
RESOURCE_EXHAUSTED, never UNKNOWN or INTERNAL, and the server is alive after."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from lcmserve import Client
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
GENERATE = "/lcmserve.v1.GenerationService/Generate"

# Fields whose valid values cost real work: drawn near their limits so that valid examples stay cheap
# on a CPU (64x64, few steps); every other field gets the generic strategy of its type. The sides
# are always set: unset means 512x512.
CHEAP = {
    "width": st.sampled_from([64, 72, 0, 63, 65, 1025, -8, 2**31 - 1]),
    "height": st.sampled_from([64, 64, 0, 32, 66, 4096, -64]),
    "num_inference_steps": st.one_of(st.none(), st.sampled_from([1, 2, 0, 9, -1, 2**31 - 1])),
    "num_images": st.one_of(st.none(), st.sampled_from([1, 2, 0, 9, -3])),
}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _strategy(field: FieldDescriptor) -> Any:
    """A hypothesis strategy for one scalar field, by its protobuf type (None: leave it unset)."""
    kind = field.type
    if field.name in CHEAP:  # (values the field's type cannot hold dropped: protobuf refuses to set them)
        low, high = _INT_RANGES.get(kind, (-(2**63), 2**64))
        return CHEAP[field.name].filter(lambda v: v is None or low <= v <= high)
    if kind == FieldDescriptor.TYPE_STRING:
        values = st.one_of(st.text(max_size=40), st.just(""), st.just("crack " * 400))
    elif kind == FieldDescriptor.TYPE_BYTES:
        values = st.binary(max_size=64)
    elif kind == FieldDescriptor.TYPE_BOOL:
        values = st.booleans()
    elif kind == FieldDescriptor.TYPE_ENUM:
        values = st.integers(-3, len(field.enum_type.values) + 3)  # known values and a few unknown ones
    elif kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        values = st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)  # nan and inf included
    elif kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        values = st.one_of(st.integers(low, high), st.sampled_from([low, 0, 1, high]))
    else:  # messages: left unset
        return st.none()
    return st.one_of(st.none(), values)


@st.composite
def generate_requests(draw: Any) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    for field in pb.GenerateRequest.DESCRIPTOR.fields:
        if field.is_repeated:
            continue
        value = draw(_strategy(field))
        if value is not None:
            setattr(request, field.name, value)
    return request


@pytest.fixture(scope="module")
def channel(tiny_server: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(tiny_server) as ch:
        yield ch


def _status(call: Iterator[Any]) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert "<class" not in (exc.details() or ""), exc.details()  # plain messages, no Python class names
        return code
    return grpc.StatusCode.OK


def test_requests_from_the_descriptor_get_only_expected_statuses(tiny_server: str, channel: grpc.Channel) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    seen: set[grpc.StatusCode] = set()

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(generate_requests())
    def check(request: pb.GenerateRequest) -> None:
        code = _status(stub.Generate(request, timeout=120))
        assert code in ALLOWED, (code, request)
        seen.add(code)

    check()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    _alive(tiny_server)


def test_random_bytes_and_truncated_messages_are_invalid_argument(tiny_server: str, channel: grpc.Channel) -> None:
    raw = channel.unary_stream(GENERATE)  # no serializer: the bytes go as they are
    rng = random.Random(10)
    blobs = [rng.randbytes(rng.randint(1, 300)) for _ in range(200)]
    whole = pb.GenerateRequest(prompt="a cracked wall", negative_prompt="blur", width=64, height=64,
                               num_inference_steps=1, seed=3).SerializeToString()
    blobs += [whole[:cut] for cut in range(1, len(whole)) if _truncation_is_invalid(whole[:cut])]
    blobs.append(pb.GenerateRequest(width=64, height=64).SerializeToString()[:-1] + b"\x0a\x03\xff\xc3\x28")
    codes = [_status(raw(blob, timeout=120)) for blob in blobs]
    assert set(codes) <= ALLOWED, sorted({c.name for c in codes})
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) >= len(blobs) - 5  # a random blob rarely parses
    _alive(tiny_server)


def _truncation_is_invalid(prefix: bytes) -> bool:
    """Whether protobuf refuses this prefix (some cuts fall between fields and parse fine)."""
    try:
        pb.GenerateRequest.FromString(prefix)
    except Exception:  # noqa: BLE001 - DecodeError, whatever its class in this protobuf
        return True
    return False


def _alive(target: str) -> None:
    with Client(target, timeout=60) as client:
        assert client.health_status() == "SERVING"
        assert len(client.generate("still alive", num_inference_steps=1, width=64, height=64).images) == 1
