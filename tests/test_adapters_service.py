"""Per-request LoRA adapters, the edge and the client (issue 21): flags, validation, AdapterService and
its errors through the real gRPC client, GetModelInfo, the token; the server serves on through all.

Unit checks first (no server); then the session's `tiny_server` (started without adapter flags:
AdapterService answers FAILED_PRECONDITION); then one server for this module, two CPU engines behind one
edge, started with every adapter flag and a token (every load and unload goes to both engines).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pathlib
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import ServerProcess

from lcmserve import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    Image,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StepEvent,
    UnauthenticatedError,
)
from lcmserve._convert import adapter_weights, build_generate_request, parse_adapter_spec
from lcmserve.v1 import generation_pb2 as pb
from lcmserve.v1 import generation_pb2_grpc as pb_grpc

SMALL = dict(num_inference_steps=2, width=64, height=64, output_format="raw", seed=3)
TOKEN = "adapter-test-token"
SLOW_SEED = 9005  # the server fixture's slow_iteration_seed


# ---- no server: parsing and conversion ----------------------------------------------------------------


def test_serve_adapter_flags_parse_and_refuse_with_the_flag_named() -> None:
    from lcmserve.server.cli import UsageError, adapter_config, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def config(*argv: str):  # type: ignore[no-untyped-def]
        return adapter_config(parser.parse_args(["--model", "tiny", *argv]))

    good = config("--adapter", "cracks=/m/cracks.safetensors:0.8", "--adapter", "rust=C:/loras/rust:x",
                  "--max-adapters", "3", "--max-adapter-rank", "16", "--max-adapters-per-request", "2",
                  "--allow-adapter-loading")
    assert good.initial == (("cracks", "/m/cracks.safetensors", 0.8), ("rust", "C:/loras/rust:x", 1.0))
    assert (good.max_adapters, good.max_adapter_rank, good.max_adapters_per_request, good.allow_loading) == (
        3, 16, 2, True)
    assert config().initial == () and config().max_adapters == 8 and not config().allow_loading
    for argv, words in [
        (("--adapter", "cracks"), "NAME=SRC[:SCALE]"),
        (("--adapter", "=x.safetensors"), "NAME=SRC[:SCALE]"),
        (("--adapter", "bad name=x.safetensors"), "1 to 64"),
        (("--adapter", "a=x:9"), "-8 to 8"),
        (("--adapter", "a=x:nan"), "-8 to 8"),
        (("--adapter", "a=x", "--adapter", "a=y"), "twice"),
        (("--adapter", "a=x", "--adapter", "b=y", "--max-adapters", "1"), "--max-adapters 1"),
        (("--max-adapter-rank", "0"), "--max-adapter-rank must be at least 1"),
        (("--max-adapters-per-request", "0"), "--max-adapters-per-request must be at least 1"),
        (("--max-adapters", "0"), "--max-adapters must be at least 1"),
    ]:
        with pytest.raises(UsageError) as caught:
            config(*argv)
        assert words in str(caught.value), (argv, str(caught.value))


def test_request_adapters_are_checked_and_default_scales_filled() -> None:
    from lcmserve.server.edge.validation import check_adapters

    loaded = {"cracks": 0.8, "spalling": 1.0}

    def check(*weights: tuple[str, float | None], most: int = 4) -> tuple[object, list[tuple[str, str]]]:
        request = build_generate_request("x")
        for name, scale in weights:
            weight = request.adapters.add(name=name)
            if scale is not None:
                weight.scale = scale
        bad: list[tuple[str, str]] = []
        return check_adapters(request.adapters, loaded, most, bad), bad

    assert check(("spalling", 0.5), ("cracks", None)) == ((("spalling", 0.5), ("cracks", 0.8)), [])
    assert check() == ((), [])
    _, bad = check(("rust", 1.0))
    assert bad == [("adapters[0].name", "is 'rust', which is not loaded; loaded adapters: cracks, spalling")]
    for scale in (8.5, -9.0, math.nan, math.inf):
        _, bad = check(("cracks", scale))
        assert [f for f, _ in bad] == ["adapters[0].scale"] and "-8 to 8" in bad[0][1], bad
    _, bad = check(("cracks", 1.0), ("cracks", 0.5))
    assert [f for f, _ in bad] == ["adapters[1].name"] and "adapters[0].name" in bad[0][1]
    _, bad = check(("cracks", 1.0), ("spalling", 1.0), most=1)
    assert bad == [("adapters", "names 2 adapters; at most 1 per request")]


def test_sdk_adapters_option() -> None:
    request = build_generate_request("x", adapters={"cracks": 0.8, "spalling": None})
    assert [(w.name, w.HasField("scale"), w.scale) for w in request.adapters] == [
        ("cracks", True, pytest.approx(0.8)), ("spalling", False, 0.0)]
    assert adapter_weights([("a", 1), "b"]) == (("a", 1.0), ("b", None))
    assert adapter_weights(None) == () and not build_generate_request("x").adapters
    with pytest.raises(TypeError, match="adapters must be a mapping"):
        adapter_weights("cracks")
    with pytest.raises(TypeError, match=r"adapters\[0\]"):
        adapter_weights([("a", 1, 2)])
    with pytest.raises(TypeError, match="scale"):
        adapter_weights({"a": "0.8"})
    with pytest.raises(ValueError, match="not a finite"):
        adapter_weights({"a": math.nan})
    with pytest.raises(ValueError, match="named twice"):
        adapter_weights([("a", 1.0), ("a", 0.5)])
    assert parse_adapter_spec("cracks:0.8") == ("cracks", 0.8)
    assert parse_adapter_spec("cracks") == ("cracks", None)
    for bad in (":0.8", "cracks:x", "cracks:inf"):
        with pytest.raises(ValueError):
            parse_adapter_spec(bad)


def test_bench_adapter_options() -> None:
    from lcmserve.bench.cli import add_arguments, config_from_args
    from lcmserve.bench.config import BenchError
    from lcmserve.bench.driver import _RequestSource

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    mixed = config_from_args(parser.parse_args(["--target", "h:1", "--adapter-mix", "none", "--adapter-mix",
                                                "cracks:0.6+spalling"]))
    assert mixed.adapter_mix == ((), (("cracks", 0.6), ("spalling", None)))
    source = _RequestSource(mixed)
    drawn = [source.next().adapters for _ in range(16)]
    assert set(drawn) == set(mixed.adapter_mix)  # each request a set of the mix, drawn at random...
    again = _RequestSource(mixed)
    assert [again.next().adapters for _ in range(16)] == drawn  # ...seeded: the same sets every run
    one = config_from_args(parser.parse_args(["--target", "h:1", "--adapter", "cracks:0.8"]))
    assert _RequestSource(one).next().adapters == (("cracks", 0.8),)
    for argv in (["--adapter", "a", "--adapter-mix", "b"], ["--adapter-mix", "a+a"], ["--adapter", "a:x"]):
        with pytest.raises(BenchError):
            config_from_args(parser.parse_args(["--target", "h:1", *argv]))


# ---- a server started without adapter flags (the session's) ------------------------------------------


def test_adapter_service_is_off_without_the_flag(tiny_server: str) -> None:
    with Client(tiny_server, timeout=60) as client:
        with pytest.raises(FailedPreconditionError, match="--allow-adapter-loading"):
            client.load_adapter("cracks", "/nonexistent.safetensors")
        with pytest.raises(FailedPreconditionError, match="--allow-adapter-loading"):
            client.unload_adapter("cracks")
        listing = client.list_adapters()
        assert (listing.adapters, listing.free_slots, listing.loading_allowed) == ([], 8, False)
        info = client.model_info()
        assert info.adapters == []
        assert (info.limits.max_adapters, info.limits.max_adapter_rank, info.limits.max_adapters_per_request) == (
            8, 64, 4)
        with pytest.raises(InvalidArgumentError) as caught:
            client.generate("a wall", adapters={"cracks": 1.0}, **SMALL)  # type: ignore[arg-type]
        assert [v.field for v in caught.value.field_violations] == ["adapters"]
        assert "started without adapters" in str(caught.value)
        assert client.generate("a wall", **SMALL).images  # type: ignore[arg-type]


# ---- one server with every adapter flag: two CPU engines, a token ----------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    from adapter_files import make_adapter_files

    return make_adapter_files(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(tiny_artifact: pathlib.Path, files: dict[str, pathlib.Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    # The documented fault switch (server/config.py): a request of SLOW_SEED sleeps 0.5 s per engine
    # iteration, so the one test_a_load_one_engine_refuses_is_undone_on_the_other keeps in flight outlasts an
    # unload and a load on any machine.
    os.environ["LCMSERVE_FAULT_INJECTION"] = f"slow_iteration_seed={SLOW_SEED}"
    try:
        started = ServerProcess(
            "--model", str(tiny_artifact), "--devices", "cpu,cpu", "--metrics-port", "0", "--auth-token-file", str(tokens),
            "--adapter", f"cracks={files['kohya_te']}:0.8", "--adapter", f"spalling={files['diffusers']}",
            "--max-adapters", "3", "--max-adapter-rank", "8", "--max-adapters-per-request", "2",
            "--allow-adapter-loading")
    finally:
        del os.environ["LCMSERVE_FAULT_INJECTION"]
    try:
        yield started
    finally:
        started.stop()


def _client(server: ServerProcess, token: str | None = TOKEN) -> Client:
    return Client(server.target, token=token or "", timeout=120, retries=0)


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_info_and_list_describe_the_adapters(server: ServerProcess, files: dict[str, pathlib.Path]) -> None:
    with _client(server) as client:
        info = client.model_info()
        listing = client.list_adapters()
    assert [a.name for a in info.adapters] == ["cracks", "spalling"]
    cracks, spalling = info.adapters
    assert (cracks.source, cracks.sha256, cracks.rank, cracks.default_scale, cracks.format) == (
        str(files["kohya_te"]), _sha256(files["kohya_te"]), 4, pytest.approx(0.8), "kohya")
    assert sorted(cracks.targets) == ["text_encoder", "unet"] and cracks.modules > 0
    assert (spalling.source, spalling.sha256, spalling.rank, spalling.default_scale, spalling.format) == (
        str(files["diffusers"]), _sha256(files["diffusers"]), 4, 1.0, "diffusers")
    assert spalling.targets == ["unet"]
    limits = info.limits
    assert (limits.max_adapters, limits.max_adapter_rank, limits.max_adapters_per_request) == (3, 8, 2)
    assert listing.adapters == info.adapters and listing.free_slots == 1 and listing.loading_allowed


def test_token_is_required(server: ServerProcess, files: dict[str, pathlib.Path]) -> None:
    with Client(server.target, timeout=60, retries=0) as client:
        for call in (client.list_adapters, lambda: client.load_adapter("rust", str(files["kohya_b"])),
                     lambda: client.unload_adapter("cracks"),
                     lambda: client.generate("a wall", adapters={"cracks": 1.0}, **SMALL)):  # type: ignore[arg-type]
            with pytest.raises(UnauthenticatedError):
                call()
    with _client(server) as client:
        assert [a.name for a in client.list_adapters().adapters] == ["cracks", "spalling"]


def _violations(exc: pytest.ExceptionInfo[InvalidArgumentError]) -> list[str]:
    return [v.field for v in exc.value.field_violations]


def test_bad_request_adapters_are_refused_and_both_engines_serve_them(server: ServerProcess) -> None:
    with _client(server) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            client.generate("a wall", adapters={"rust": 1.0}, **SMALL)  # type: ignore[arg-type]
        assert _violations(caught) == ["adapters[0].name"]
        assert "loaded adapters: cracks, spalling" in str(caught.value)
        for scale in (8.5, -9.0):
            with pytest.raises(InvalidArgumentError) as caught:
                client.generate("a wall", adapters={"cracks": scale}, **SMALL)  # type: ignore[arg-type]
            assert _violations(caught) == ["adapters[0].scale"] and "-8 to 8" in str(caught.value)
        with pytest.raises(InvalidArgumentError) as caught:  # --max-adapters-per-request 2
            client.generate("a wall", adapters={"cracks": 1.0, "spalling": 1.0, "rust": 1.0}, **SMALL)  # type: ignore[arg-type]
        assert "adapters" in _violations(caught) and "at most 2 per request" in str(caught.value)
        # What the SDK refuses itself (a NaN scale, a name twice), sent as raw messages.
        stub = pb_grpc.GenerationServiceStub(client._channel)
        for weights, field in (([pb.AdapterWeight(name="cracks", scale=math.nan)], "adapters[0].scale"),
                               ([pb.AdapterWeight(name="cracks"), pb.AdapterWeight(name="cracks", scale=0.5)],
                                "adapters[1].name")):
            request = build_generate_request("a wall", num_inference_steps=1, width=64, height=64)
            request.adapters.extend(weights)
            with pytest.raises(grpc.RpcError) as raw:
                list(stub.Generate(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60))
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in raw.value.details()
        # Four in turn go round both engines (the pool's ties go round them): each serves the adapters alike.
        images = [client.generate("a wall", adapters={"cracks": 0.5, "spalling": None}, **SMALL).images[0].data  # type: ignore[arg-type]
                  for _ in range(4)]
        plain = client.generate("a wall", **SMALL).images[0].data  # type: ignore[arg-type]
    assert len(set(images)) == 1 and images[0] != plain


def test_load_and_unload_errors_then_the_server_serves(server: ServerProcess,
                                                         files: dict[str, pathlib.Path]) -> None:
    with _client(server) as client:
        before = client.generate("a wall", adapters={"cracks": 1.0}, **SMALL).images[0].data  # type: ignore[arg-type]
        # The edge's own refusals.
        for name, source, scale, words in (("bad name", files["kohya_b"], None, "1 to 64"),
                                           ("x" * 65, files["kohya_b"], None, "1 to 64"),
                                           ("rust", files["kohya_b"], 9.0, "-8 to 8"),
                                           ("rust", "", None, "empty")):
            with pytest.raises(InvalidArgumentError, match=words):
                client.load_adapter(name, str(source), scale)
        with pytest.raises(AlreadyExistsError, match="cracks"):
            client.load_adapter("cracks", str(files["kohya_b"]))
        with pytest.raises(NotFoundError, match="cracks, spalling"):
            client.unload_adapter("rust")
        # The engines': files they cannot use.
        for kind, words in (("garbage", ""), ("no_keys", ""), ("other_base", ""), ("rank16", "8")):
            with pytest.raises(InvalidArgumentError, match=words or None) as caught:
                client.load_adapter("rust", str(files[kind]))
            assert str(files[kind]) in str(caught.value) or kind == "garbage", (kind, str(caught.value))
        with pytest.raises(InvalidArgumentError):
            client.load_adapter("rust", str(files["kohya_b"]) + ".missing")
        # The last free slot, then none.
        rust = client.load_adapter("rust", str(files["kohya_b"]), 0.5)
        assert (rust.name, rust.rank, rust.default_scale, rust.targets) == ("rust", 2, 0.5, ["unet"])
        with pytest.raises(ResourceExhaustedError, match="no free adapter slot"):
            client.load_adapter("more", str(files["kohya_b"]))
        assert client.list_adapters().free_slots == 0
        assert client.generate("a wall", adapters=[("rust", None)], **SMALL).images  # type: ignore[arg-type]
        client.unload_adapter("rust")
        with pytest.raises(InvalidArgumentError, match="not loaded"):
            client.generate("a wall", adapters={"rust": 1.0}, **SMALL)  # type: ignore[arg-type]
        assert [a.name for a in client.list_adapters().adapters] == ["cracks", "spalling"]
        # Through all of it the server serves, the same images as before.
        assert client.generate("a wall", adapters={"cracks": 1.0}, **SMALL).images[0].data == before  # type: ignore[arg-type]
        assert client.health_status() == "SERVING"
    metrics = _metrics(server)
    for family, status, least in (("loads", "OK", 3), ("loads", "INVALID_ARGUMENT", 9), ("loads", "ALREADY_EXISTS", 1),
                                  ("loads", "RESOURCE_EXHAUSTED", 1), ("unloads", "OK", 1), ("unloads", "NOT_FOUND", 1)):
        found = re.search(rf'^lcmserve_adapter_{family}_total{{status="{status}"}} (\S+)$', metrics, re.MULTILINE)
        assert found and float(found.group(1)) >= least, (family, status, metrics[-3000:])
    assert re.search(r'^lcmserve_adapters_loaded 2\.0$', metrics, re.MULTILINE), metrics[-3000:]


def _metrics(server: ServerProcess) -> str:
    found = re.search(r"metrics on (http://\S+)", server.log_path.read_text())
    assert found, server.log()
    return urllib.request.urlopen(found.group(1), timeout=10).read().decode()


def test_cli_adapters_commands_and_generate_adapter(server: ServerProcess, files: dict[str, pathlib.Path],
                                                    tmp_path: pathlib.Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from lcmserve.cli import main

    connection = ["--target", server.target, "--token", TOKEN]
    assert main(["adapters", "list", *connection]) == 0
    listed = capsys.readouterr().out
    assert "cracks: rank 4, unet+text_encoder" in listed and "1 free slots; loading allowed" in listed
    assert main(["adapters", "load", "rust", str(files["kohya_b"]), "--scale", "0.5", *connection]) == 0
    assert "loaded rust: rank 2, unet" in capsys.readouterr().out
    out = tmp_path / "wall.png"
    assert main(["generate", "a wall", "--adapter", "rust:0.7", "--adapter", "cracks", "--steps", "1", "--width",
                 "64", "--height", "64", "-o", str(out), *connection]) == 0
    assert out.exists()
    assert main(["adapters", "unload", "rust", *connection]) == 0
    assert "unloaded rust" in capsys.readouterr().out
    assert main(["adapters", "unload", "rust", *connection]) == 1  # NOT_FOUND: one line, exit 1
    assert "no adapter named 'rust'" in capsys.readouterr().err
    assert main(["adapters", "list", "--target", server.target]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["generate", "a wall", "--adapter", "cracks:x", *connection]) == 2
    assert main(["info", *connection]) == 0
    assert "cracks (rank 4, unet+text_encoder, default scale 0.8)" in capsys.readouterr().out


def test_a_load_one_engine_refuses_is_undone_on_the_other(server: ServerProcess,
                                                         files: dict[str, pathlib.Path]) -> None:
    """All or none across engines: a request in flight on one engine keeps an unloaded adapter's slot
    there, so the next load finds a free slot on the other engine only: that one loads it, the edge
    unloads it again and answers the refusal; once the request ends, the load goes through on both."""
    with _client(server) as client, ThreadPoolExecutor(1) as pool:
        client.load_adapter("rust", str(files["kohya_b"]))  # the third and last slot on both engines
        events = client.stream("a long one", adapters={"rust": 1.0}, num_inference_steps=8, width=256, height=256,
                               num_images=2, seed=SLOW_SEED)  # 8 iterations of at least 0.5 s
        first = next(events)  # running on one engine, holding rust's slot there
        assert isinstance(first, StepEvent)
        rest = pool.submit(list, events)
        client.unload_adapter("rust")
        # The idle engine's loop frees rust's slot just after the unload's reply: wait for its log line
        # (the busy engine's comes only when the slow request ends), else both engines refuse the load.
        for _ in range(100):
            if server.log_path.read_text().count("adapter rust unloaded; slot") >= 1:
                break
            time.sleep(0.05)
        with pytest.raises(ResourceExhaustedError, match="slots"):
            client.load_adapter("more", str(files["kohya_b"]))
        assert [a.name for a in client.list_adapters().adapters] == ["cracks", "spalling"]
        assert "loaded it but another refused" in server.log_path.read_text()  # (pool.py's warning)
        assert any(isinstance(e, Image) for e in rest.result(timeout=300))  # the request finished with rust
        for _ in range(60):  # both engines free rust's slot (and the undone load's) once unused
            try:
                client.load_adapter("more", str(files["kohya_b"]))
                break
            except (ResourceExhaustedError, AlreadyExistsError):
                time.sleep(0.5)
        else:
            raise AssertionError("the load did not go through once the request had finished")
        images = {client.generate("a wall", adapters={"more": 1.0}, **SMALL).images[0].data  # type: ignore[arg-type]
                  for _ in range(4)}  # both engines hold it: one image
        assert len(images) == 1
        client.unload_adapter("more")
