"""What a new user hits (issue 20), client side: the CLI's hints, flags and files, bench's and the
dataset job's edges. Real servers (the session's tiny server; one TLS server caught while loading),
the real CLI; no mocks.
"""

from __future__ import annotations

import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from lcmserve import Client, LcmServeError
from lcmserve.cli import main

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]


def lcmserve(*args: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lcmserve.cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=300, cwd=REPO)


@pytest.fixture
def closed_target() -> Iterator[str]:
    """host:port of a socket that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# ---- 4: what an UNAVAILABLE means --------------------------------------------------------------------


def test_an_http_url_target_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--target", "http://127.0.0.1:50051/", "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert "gRPC targets are HOST:PORT" in err and "--target 127.0.0.1:50051" in err
    assert "lcmserve serve --model" not in err and err.count("\n") == 1


def test_a_target_without_a_port_says_which_port_was_dialled(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--target", "127.0.0.1", "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert "names no port, so gRPC dialled port 443" in err and "50051" in err


def test_nothing_listening_and_an_http_port_are_told_apart(closed_target: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--target", closed_target, "--timeout", "10"]) == 1
    port = closed_target.rpartition(":")[2]
    assert f"no server is listening at {closed_target}" in capsys.readouterr().err
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:  # a metrics port answers HTTP/1
        assert main(["info", "--target", f"127.0.0.1:{httpd.server_address[1]}", "--timeout", "10"]) == 1
    finally:
        httpd.shutdown()
    err = capsys.readouterr().err
    assert "not as a gRPC server" in err and "metrics port" in err and f"--port {port}" not in err


def test_draining_and_shutting_down_are_not_start_a_server() -> None:
    from lcmserve._connection import unavailable_hint

    for message in ("the server is draining", "the server is shutting down"):
        hint = unavailable_hint("h:1", message, tls=False, client_cert=False)
        assert "draining" in hint and "lcmserve serve" not in hint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_loading_tls_and_mtls_hints_from_a_real_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One mTLS server, caught while it loads its model: a client with everything hears 'loading',
    a plaintext one 'pass --root-certificates', one without a certificate 'pass --client-cert', one
    trusting only the system's roots that the certificate is not trusted."""
    from test_security import Pki

    pki = Pki(tmp_path)
    target = f"127.0.0.1:{_free_port()}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "lcmserve.cli", "serve", "--model", "tiny", "--host", "127.0.0.1",
         "--port", target.rpartition(":")[2], "--metrics-port", "-1", "--tls-cert", str(pki.server_cert),
         "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
        stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
    )
    tls = ["--root-certificates", str(pki.ca)]
    cert = ["--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    try:
        status = ""
        with Client(target, root_certificates=pki.ca.read_bytes(), client_cert=pki.client_cert.read_bytes(),
                    client_key=pki.client_key.read_bytes()) as client:
            deadline = time.monotonic() + 240
            while not status and server.poll() is None and time.monotonic() < deadline:
                try:
                    status = client.health_status(timeout=2)  # answers once the port is open
                except LcmServeError:
                    time.sleep(0.1)
        assert status == "NOT_SERVING", f"the port opened only once the model was loaded ({status!r})"
        assert main(["generate", "a wall", "--target", target, *tls, *cert, "--retries", "0", *SMALL]) == 1
        err = capsys.readouterr().err
        assert "still loading its model" in err and f"lcmserve health --target {target}" in err, err
        for flags, expected in (([], "pass --root-certificates"), (tls, "pass --client-cert"),
                                (["--secure"], "does not trust")):
            assert main(["info", "--target", target, "--timeout", "20", *flags]) == 1
            err = capsys.readouterr().err
            assert expected in err and "lcmserve serve --model" not in err, (flags, err)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# ---- 7, 8, 9, 10, 13, 16, 19: the generate and info commands -------------------------------------------


def test_a_closed_stdout_is_not_a_traceback(tiny_server: str, tmp_path: Path) -> None:
    for args in (["info", "--target", tiny_server],
                 ["generate", "a wall", "--target", tiny_server, *SMALL, "--num-images", "2",
                  "-o", str(tmp_path / "wall.png")]):
        read, write = os.pipe()
        os.close(read)  # `| head -1` that has already gone: every write to stdout fails
        try:
            done = lcmserve(*args, stdout=write)
        finally:
            os.close(write)
        assert done.returncode == 0 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done
    assert len(list(tmp_path.glob("wall-*.png"))) == 2  # the work was done all the same


def test_the_file_format_follows_the_suffix_and_contradictions_are_refused(
        tiny_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    for name, pil_format in (("wall.webp", "WEBP"), ("wall.png", "PNG")):
        assert main(["generate", "a wall", "--target", tiny_server, *SMALL, "-o", str(tmp_path / name)]) == 0
        with Image.open(tmp_path / name) as image:
            assert image.format == pil_format
    for args, message in ((["-o", "x.png", "--format", "jpeg"], "--format jpeg contradicts -o x.png"),
                          (["-o", "x.bmp"], ".bmp names no format")):
        # Refused before sending anything: the target would answer UNAVAILABLE.
        assert main(["generate", "a wall", "--target", "127.0.0.1:1", *args]) == 2
        assert message in capsys.readouterr().err
    assert not Path("x.png").exists() and not Path("x.bmp").exists()


def test_previews_folder_only_for_an_accepted_request_and_only_this_runs(tiny_server: str, tmp_path: Path) -> None:
    previews = tmp_path / "previews"
    assert main(["generate", "a wall", "--target", tiny_server, "--steps", "20", "--previews", str(previews)]) == 1
    assert not previews.exists()  # refused (20 steps): no folder
    previews.mkdir()
    (previews / "image0-step7.png").write_bytes(b"an older run's")
    (previews / "notes.txt").write_text("mine")
    assert main(["generate", "a wall", "--target", tiny_server, *SMALL, "--previews", str(previews),
                 "-o", str(tmp_path / "w.png")]) == 0
    assert sorted(p.name for p in previews.iterdir()) == ["image0-step0.png", "image0-step1.png", "notes.txt"]


def test_timeout_is_checked_and_named_when_it_passes(tiny_server: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-1", "nan"):
        assert main(["generate", "a wall", "--timeout", bad]) == 2
        assert "--timeout" in capsys.readouterr().err
    assert main(["generate", "--help"]) == 0
    assert "default: none" in " ".join(capsys.readouterr().out.split())
    assert main(["generate", "a wall", "--target", tiny_server, "--timeout", "0.001", "-o", str(tmp_path / "w.jpg")]) == 1
    err = capsys.readouterr().err
    assert "DEADLINE_EXCEEDED" in err and "--timeout 0.001 s passed" in err


def test_an_unknown_flag_shows_the_subcommand_usage_and_the_closest_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--num_images", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lcmserve generate") and "(did you mean --num-images?)" in err
    assert main(["info", "--jsno"]) == 2
    assert "did you mean --json?" in capsys.readouterr().err


def test_help_lists_every_command_and_one_spelling_of_each_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    description = capsys.readouterr().out.split("positional arguments")[0]
    assert all(name in description for name in ("serve", "export", "generate", "bench", "dataset"))
    for argv in (["generate", "--help"], ["bench", "--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "tiny-vae" in out and "tiny_vae" not in out, argv
    # either spelling is still accepted; none is a preview mode of generate too
    assert main(["generate", "x", "--decoder", "tiny_vae", "--preview-mode", "none", "--target", "127.0.0.1:1",
                 "--timeout", "5", "--retries", "0"]) == 1


def test_queue_full_says_retry_after_once() -> None:
    from google.protobuf import duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    from lcmserve.errors import _error_from_status

    message = "server overloaded: the admission queue is full (256 requests); retry after 0.1 s"  # the server's
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=10**8)))
    error = _error_from_status("RESOURCE_EXHAUSTED", message, status)
    assert str(error).count("retry after") == 1 and error.retry_after_s == pytest.approx(0.1)


# ---- 3, 12, 19: bench ------------------------------------------------------------------------------------


def test_bench_writes_into_new_folders_and_refuses_unwritable_paths_before_running(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lcmserve.bench import main as bench

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for flag in ("--json", "--csv", "--plot"):
        # 127.0.0.1:1 would fail the smoke request: the path is refused before it
        assert bench(["--target", "127.0.0.1:1", flag, str(blocker / "x")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {blocker / 'x'}: cannot write there" in err and "smoke" not in err
    assert bench(["--target", "127.0.0.1:1", "--json", str(tmp_path)]) == 2  # a folder
    assert "cannot write there" in capsys.readouterr().err


def test_bench_takes_the_target_from_the_environment_and_writes_csv_booleans(
        tiny_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    from lcmserve.bench import main as bench

    monkeypatch.setenv("LCMSERVE_TARGET", tiny_server)
    out = tmp_path / "new" / "folder"
    code = bench([*SMALL, "--requests", "2", "--warmup", "0", "--no-progress", "--csv", str(out / "r.csv"),
                  "--json", str(out / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert f"lcmserve bench: {tiny_server}," in capsys.readouterr().out
    with (out / "r.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["interrupted"] == "false" and int(row["ok"]) == 2
    assert (out / "r.json").is_file()


# ---- 11, 14, 19: the dataset job -------------------------------------------------------------------------

SPEC = """\
prompts:
  - template: "a {kind} crack"
    vars: {kind: [hairline, wide]}
    images: 2
num_inference_steps: 2
width: 64
height: 64
"""


def test_dataset_against_nothing_stops_at_once_and_made_nothing(closed_target: str, tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    done = lcmserve("dataset", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"),
                    "--target", closed_target, "--no-progress")
    assert done.returncode == 1, done.stderr
    assert f"no server is listening at {closed_target}" in done.stderr and "nothing was made" in done.stderr
    assert "not SERVING after" not in done.stderr and "resume" not in done.stderr  # no 30 s wait, no false promise


def test_dataset_limit_says_what_makes_the_rest(tiny_server: str, tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    done = lcmserve("dataset", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"),
                    "--target", tiny_server, "--limit", "1", "--no-progress", "--no-contact-sheets")
    assert done.returncode == 0, done.stderr
    assert "--limit 1: the first 1 images of the plan are done" in done.stdout
    assert "run without --limit" in done.stdout and "rerun the same command" not in done.stdout


def test_a_yaml_error_names_the_spec_file(tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("prompts:\n  - template: [unclosed\n")
    done = lcmserve("dataset", str(spec), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.count(str(spec)) >= 2 and "<unicode string>" not in done.stderr, done.stderr


# ---- 21: contact sheets ------------------------------------------------------------------------------


def test_contact_sheet_seed_labels_never_wrap(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    from lcmserve.dataset.contact import _LINE_H, _sheet
    from lcmserve.dataset.plan import PlannedImage

    (tmp_path / "train").mkdir()
    seeds = [2**62 - 1 - k for k in range(3)]  # 19 digits, the longest a plan makes
    images = []
    for k, seed in enumerate(seeds):
        name = f"abcdef012345-{k:04d}.png"
        Image.new("RGB", (64, 64), "grey").save(tmp_path / "train" / name)
        images.append(PlannedImage(order=k, prompt_id="abcdef012345", prompt="a wall", negative_prompt="",
                                   template="a wall", variables=(), image_index=k, seed=seed, split="train",
                                   file_name=name, init_image=None, mask=None, width=64, height=64))
    with Image.open(io.BytesIO(_sheet(tmp_path, images, Image, ImageDraw))) as sheet:
        width, height = sheet.size
    label_width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(seeds[0]))
    columns = 2  # ceil(sqrt(3))
    assert width / columns >= label_width  # each tile holds its whole seed on one line
    header = _LINE_H + 4
    assert height == header + 2 * (64 + _LINE_H + 2)  # one label line under each 64-pixel tile
