"""The client SDK and CLI without a server: imports, request building, conversions of real proto
messages, errors of real failed calls (a closed port), and the CLI's exits.

No mocks: every grpc.RpcError here comes from a real call to a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import ast
import dataclasses
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lcmserve
from lcmserve import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    Image,
    InvalidArgumentError,
    LcmServeError,
    ProtocolError,
    ResourceExhaustedError,
    StepEvent,
    Summary,
    UnavailableError,
    from_rpc_error,
)
from lcmserve import GenerateFields, GenerateOptions, _convert, names
from lcmserve._common import ResultCollector
from lcmserve.cli import _image_path, main
from lcmserve.errors import _error_from_status
from lcmserve.v1 import generation_pb2 as pb

# Runs the `lcmserve` command (runpy of lcmserve/__main__.py) where torch and diffusers cannot be
# imported, as on a client-only install.
_WITHOUT_TORCH = textwrap.dedent(
    """
    import runpy, sys

    class BlockHeavyModules:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "diffusers"}:
                raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockHeavyModules())
    sys.argv = ["lcmserve", *sys.argv[1:]]
    runpy.run_module("lcmserve", run_name="__main__")
    """
)


def _lcmserve_without_torch(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *argv], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def closed_target() -> Iterator[str]:
    """host:port of a socket that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# ---- imports ------------------------------------------------------------------------------------


def test_import_pulls_no_heavy_modules() -> None:
    heavy = ("torch", "numpy", "PIL", "diffusers")
    code = f"import sys, lcmserve; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api() -> None:
    for name in (
        "Client",
        "AsyncClient",
        "Picture",
        "Latents",
        "StepEvent",
        "Image",
        "Timings",
        "Summary",
        "GenerateResult",
        "LoraInfo",
        "Limits",
        "ModelInfo",
        "LcmServeError",
        "InvalidArgumentError",
        "ResourceExhaustedError",
        "UnavailableError",
        "DeadlineExceededError",
        "CancelledError",
        "InternalError",
        "NotFoundError",
        "FieldViolation",
        "from_rpc_error",
    ):
        assert hasattr(lcmserve, name), name
    assert isinstance(lcmserve.__version__, str) and lcmserve.__version__


def test_cli_help_runs_without_torch() -> None:
    top = _lcmserve_without_torch("--help")
    assert top.returncode == 0, top.stderr
    for command in ("generate", "info", "health", "serve", "export", "bench"):
        assert command in top.stdout
    generate = _lcmserve_without_torch("generate", "--help")
    assert generate.returncode == 0, generate.stderr
    assert "--previews" in generate.stdout and "--target" in generate.stdout


def test_cli_serve_without_torch_names_the_extra() -> None:
    serve = _lcmserve_without_torch("serve", "--model", "tiny")
    assert serve.returncode == 2
    assert "the server needs the [server] extra: pip install 'lcmserve[server]'" in serve.stderr
    assert "Traceback" not in serve.stderr and serve.stderr.count("\n") == 1


# ---- request building ---------------------------------------------------------------------------


def test_request_leaves_unset_fields_to_the_server() -> None:
    request = _convert.build_generate_request("a wall")
    assert request.prompt == "a wall"
    for field in (
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "width",
        "height",
        "num_images",
        "quality",
    ):
        assert not request.HasField(field), field
    assert request.negative_prompt == ""
    assert request.output_format == pb.OUTPUT_FORMAT_JPEG
    assert request.preview_mode == pb.PREVIEW_MODE_NONE
    assert not request.include_latents


def test_request_sets_what_was_given() -> None:
    request = _convert.build_generate_request(
        "a wall",
        negative_prompt="blurry",
        num_inference_steps=2,
        guidance_scale=1.5,
        seed=2**63 - 1,
        width=768,
        height=64,
        num_images=3,
        output_format="PNG",  # type: ignore[arg-type]  # names are case-insensitive at run time
        quality=0,
        preview_mode="full",
        include_latents=True,
    )
    assert (request.num_inference_steps, request.seed, request.width, request.height) == (
        2,
        2**63 - 1,
        768,
        64,
    )
    assert request.guidance_scale == 1.5 and request.num_images == 3 and request.negative_prompt == "blurry"
    assert request.HasField("quality") and request.quality == 0  # given, so sent (the server judges it)
    assert request.output_format == pb.OUTPUT_FORMAT_PNG and request.preview_mode == pb.PREVIEW_MODE_FULL
    assert request.include_latents
    jpg = _convert.build_generate_request("x", output_format="jpg")  # type: ignore[arg-type]  # an alias
    assert jpg.output_format == pb.OUTPUT_FORMAT_JPEG


def test_request_refuses_unknown_names_and_types() -> None:
    with pytest.raises(ValueError, match=r"output_format='bmp'.*'jpeg', 'png', 'webp', 'raw'"):
        _convert.build_generate_request("x", output_format="bmp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"preview_mode='vae'.*'none', 'approx', 'full'"):
        _convert.build_generate_request("x", preview_mode="vae")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"seed=-1"):
        _convert.build_generate_request("x", seed=-1)
    with pytest.raises(TypeError, match=r"num_inference_steps"):
        _convert.build_generate_request("x", num_inference_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"prompt"):
        _convert.build_generate_request(None)  # type: ignore[arg-type]
    with Client("127.0.0.1:1") as client, pytest.raises(ValueError, match="output_format"):
        client.stream("x", output_format="gif")  # type: ignore[arg-type]  # checked before any call


def test_options_value_and_keywords_are_one_type() -> None:
    # GenerateFields is GenerateOptions as keyword arguments: same names, same types, same order
    assert typing.get_type_hints(GenerateFields) == typing.get_type_hints(GenerateOptions)
    assert list(GenerateFields.__annotations__) == [f.name for f in dataclasses.fields(GenerateOptions)]
    options = GenerateOptions(num_inference_steps=2, width=64, output_format="png")
    by_value = _convert.build_generate_request("a wall", options, seed=5, width=72)
    by_keywords = _convert.build_generate_request(
        "a wall", num_inference_steps=2, width=72, output_format="png", seed=5
    )
    assert by_value == by_keywords and by_value.width == 72 and not by_value.HasField("height")
    assert options.width == 64  # frozen: the keywords changed a copy
    with pytest.raises(TypeError, match=r"unknown Generate option 'widht'.*width"):
        _convert.build_generate_request("x", widht=64)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"options must be a GenerateOptions.*got str"):
        _convert.build_generate_request("x", "blurry")  # type: ignore[arg-type]


def test_format_and_preview_names_are_the_protos() -> None:
    # The SDK's Literal types list exactly the generated enums' names, in their order
    assert typing.get_args(lcmserve.OutputFormat) == tuple(names.OUTPUT_FORMAT_VALUES)
    assert typing.get_args(lcmserve.PreviewMode) == tuple(names.PREVIEW_MODE_VALUES)
    for name, number in _convert.OUTPUT_FORMATS.items():
        assert pb.OutputFormat.Name(number) == f"OUTPUT_FORMAT_{name.upper()}"
    for name, number in _convert.PREVIEW_MODES.items():
        assert pb.PreviewMode.Name(number) == f"PREVIEW_MODE_{name.upper()}"


def _client_import_graph() -> dict[str, set[str]]:
    """Module -> the lcmserve modules it imports anywhere (top level, functions, TYPE_CHECKING),
    for every hand-written module of client/ (the implicit import of a parent package left out)."""
    root = Path(lcmserve.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ["lcmserve", *path.relative_to(root).with_suffix("").parts]
        if "v1" not in parts:
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    edges.add(target if target in modules else str(source))
        edges &= set(modules)
        edges.discard(name)
    return graph


def test_client_modules_import_without_cycles() -> None:
    graph = _client_import_graph()
    assert {"lcmserve.bench.driver", "lcmserve.bench.report", "lcmserve.demo"} <= set(graph)
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join((*path[path.index(name):], name))}")
        if name not in done:
            for target in sorted(graph[name]):
                visit(target, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


# ---- conversions of real messages ---------------------------------------------------------------


def _raw_picture(width: int, height: int) -> pb.Picture:
    pixels = bytes((x * 7 + y * 3 + c) % 256 for y in range(height) for x in range(width) for c in range(3))
    return pb.Picture(data=pixels, format=pb.OUTPUT_FORMAT_RAW, width=width, height=height)


def test_events_from_messages() -> None:
    step = _convert.event_from_proto(
        pb.GenerateResponse(step=pb.StepEvent(image_index=1, step=2, num_steps=4, timestep=259))
    )
    assert step == StepEvent(image_index=1, step=2, num_steps=4, timestep=259, preview=None, latents=None)

    latents = pb.Tensor(shape=[4, 2, 3], dtype="float32", data=bytes(4 * 2 * 3 * 4))
    image = _convert.event_from_proto(
        pb.GenerateResponse(image=pb.Image(index=1, seed=43, latents=latents, picture=_raw_picture(8, 4)))
    )
    assert isinstance(image, Image)
    assert (image.index, image.seed, image.format, image.width, image.height) == (1, 43, "raw", 8, 4)
    assert image.latents is not None and image.latents.shape == (4, 2, 3) and image.latents.dtype == "float32"

    summary = _convert.event_from_proto(
        pb.GenerateResponse(
            summary=pb.Summary(
                seed=42,
                num_images=2,
                prompt_truncated=True,
                prompt_tokens=90,
                timings=pb.Timings(
                    queue_ms=1.5, text_ms=2.0, unet_ms=30.25, vae_ms=10.0, encode_ms=2.5, total_ms=50.0
                ),
            )
        )
    )
    assert isinstance(summary, Summary)
    assert (summary.seed, summary.num_images, summary.prompt_truncated, summary.prompt_tokens) == (
        42,
        2,
        True,
        90,
    )
    assert summary.timings.unet_ms == 30.25 and summary.timings.total_ms == 50.0

    for event in (step, image, summary):  # and back
        assert _convert.event_from_proto(_convert.event_to_proto(event)) == event


def test_broken_messages_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        _convert.event_from_proto(pb.GenerateResponse())
    with pytest.raises(ProtocolError, match="99"):
        _convert.picture_from_proto(pb.Picture(format=99))  # type: ignore[arg-type]
    assert _convert.picture_from_proto(pb.Picture(width=1)).format == "jpeg"  # unset means JPEG


def test_result_collector_orders_images_and_needs_a_summary() -> None:
    collector = ResultCollector()
    for index in (1, 0):
        collector.add(
            _convert.image_from_proto(pb.Image(index=index, seed=index, picture=_raw_picture(2, 2)))
        )
    with pytest.raises(ProtocolError, match="summary"):
        collector.result()
    collector.add(_convert.summary_from_proto(pb.Summary(seed=0, num_images=2)))
    result = collector.result()
    assert [image.index for image in result.images] == [0, 1] and result.seed == 0 and result.steps == []


def test_model_info_from_message() -> None:
    message = pb.GetModelInfoResponse(
        base="tiny",
        dtype="float32",
        device="cpu",
        backend="eager",
        server_version="0.1.0",
        loras=[pb.LoraInfo(source="cracks.safetensors", sha256="ab" * 32, scale=0.75)],
        limits=pb.Limits(
            max_steps=8,
            min_side=64,
            max_side=1024,
            side_multiple=8,
            max_images=8,
            max_prompt_chars=2000,
            min_guidance_scale=1.0,
            max_guidance_scale=20.0,
            max_batch_size=32,
            max_queued_requests=256,
        ),
    )
    info = _convert.model_info_from_proto(message)
    assert (
        info.base == "tiny" and info.loras[0].source == "cracks.safetensors" and info.loras[0].scale == 0.75
    )
    assert info.limits.max_side == 1024 and info.limits.max_guidance_scale == 20.0
    assert _convert.model_info_to_proto(info) == message


def test_pictures_decode_and_convert(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("PIL")
    picture = _convert.picture_from_proto(_raw_picture(8, 4))
    pixels = picture.to_numpy()
    assert pixels.shape == (4, 8, 3) and pixels.dtype == np.uint8 and pixels[1, 2, 0] == (2 * 7 + 1 * 3) % 256
    png = picture.save(tmp_path / "image.png")  # RAW -> PNG by the suffix
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same = lcmserve.Picture(data=png.read_bytes(), format="png", width=8, height=4)
    assert (same.to_numpy() == pixels).all()
    assert picture.save(tmp_path / "image.rgb").read_bytes() == picture.data  # same format: bytes as sent
    with pytest.raises(ValueError, match="should hold 96 bytes"):
        lcmserve.Picture(data=b"\0", format="raw", width=8, height=4).to_numpy()

    latents = lcmserve.Latents(shape=(2, 3), dtype="float32", data=np.arange(6, dtype="<f4").tobytes())
    assert latents.to_numpy().tolist() == [[0, 1, 2], [3, 4, 5]]


# ---- errors -------------------------------------------------------------------------------------


def test_error_of_a_real_failed_call(closed_target: str) -> None:
    with grpc.insecure_channel(closed_target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    error = from_rpc_error(info.value)
    assert isinstance(error, UnavailableError) and isinstance(error, LcmServeError)
    assert error.code == "UNAVAILABLE" and str(error).startswith("UNAVAILABLE: ") and error.details


def test_client_calls_to_a_closed_port(closed_target: str) -> None:
    with Client(closed_target, timeout=10) as client:
        assert client.health() is False
        with pytest.raises(UnavailableError):
            client.model_info()
        with pytest.raises(UnavailableError):
            client.generate("a wall")
        with pytest.raises(DeadlineExceededError, match="not SERVING after 0.3 s"):
            client.wait_until_ready(timeout=0.3)


def test_async_client_calls_to_a_closed_port(closed_target: str) -> None:
    async def calls() -> None:
        async with AsyncClient(closed_target, timeout=10) as client:
            assert await client.health() is False
            with pytest.raises(UnavailableError):
                await client.model_info()
            with pytest.raises(UnavailableError):
                async for _ in client.stream("a wall"):
                    pass

    asyncio.run(calls())


def test_rich_status_details() -> None:
    bad = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="width=70: not a multiple of 8")
    bad.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="width", description="70 is not a multiple of 8"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="num_inference_steps", description="12 > 8"
                ),
            ]
        )
    )
    error = _error_from_status("INVALID_ARGUMENT", bad.message, bad)
    assert isinstance(error, InvalidArgumentError)
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("width", "70 is not a multiple of 8"),
        ("num_inference_steps", "12 > 8"),
    ]
    # the field the server's message does not name is appended, the other is not repeated
    assert str(error) == "INVALID_ARGUMENT: width=70: not a multiple of 8 (num_inference_steps: 12 > 8)"

    busy = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="queue full")
    busy.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=5 * 10**8))
    )
    error = _error_from_status("RESOURCE_EXHAUSTED", "queue full", busy)
    assert isinstance(error, ResourceExhaustedError) and error.retry_after_s == 1.5
    assert str(error) == "RESOURCE_EXHAUSTED: queue full (retry after 1.5 s)"

    overflow = _error_from_status("RESOURCE_EXHAUSTED", "Received message larger than max (5 vs. 4)", None)
    assert isinstance(overflow, ResourceExhaustedError) and overflow.retry_after_s is None
    assert "max_message_mb" in str(overflow)
    assert type(_error_from_status("NOT_FOUND", "x", None)).__name__ == "NotFoundError"
    assert type(_error_from_status("INTERNAL", "x", None)).__name__ == "InternalError"


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_against_an_unreachable_server(closed_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["generate", "a wall"], ["info"], ["health"]):
        assert main([*argv, "--target", closed_target, "--timeout", "10"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert closed_target in err and "lcmserve serve" in err


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--preview-mode", "full"]) == 2
    assert "--previews DIR" in capsys.readouterr().err
    assert main(["generate", "x", "--format", "bmp"]) == 2
    assert main([]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lcmserve {lcmserve.__version__}"


def test_cli_image_paths() -> None:
    assert _image_path(None, "jpeg", 0, several=False) == Path("out.jpg")
    assert _image_path(None, "raw", 2, several=True) == Path("out-2.rgb")
    assert _image_path(Path("dir/wall"), "png", 0, several=False) == Path("dir/wall.png")
    assert _image_path(Path("dir/wall.webp"), "webp", 1, several=True) == Path("dir/wall-1.webp")
