"""Every `lcmserve serve` flag as a LCMSERVE_<FLAG> variable (issue 24, server/env_flags.py): walked
over the real parser, so a flag added later is covered too; the command line wins; a bad value exits
2 naming the variable. The smoke start is the session's telemetry server, configured only by
variables (tests/telemetry.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

import pytest

from lcmserve.server.cli import add_arguments
from lcmserve.server.env_flags import flags
from telemetry import TelemetryServer

CANDIDATES = ("3", "1,2", "some-value")  # a value for a flag: the first its type accepts


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcmserve serve")
    add_arguments(parser)
    return parser


def value_for(action: argparse.Action) -> tuple[str, Any]:
    """(variable text, what the flag must then hold) for one flag, unlike its default."""
    if action.nargs == 0:
        return "1", (not action.default) if isinstance(action.default, bool) else action.const
    if action.choices is not None:
        choice = [c for c in action.choices if c != action.default][-1]
        return str(choice), choice
    convert = action.type if callable(action.type) else str
    for text in CANDIDATES:
        try:
            value = convert(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        if isinstance(action, argparse._AppendAction):
            return f"{text},{text}", [value, value]
        return text, value
    raise AssertionError(f"no test value for {action.option_strings}")


def test_every_flag_is_set_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    expected: dict[str, Any] = {}
    walked = flags(serve_parser())
    assert len(walked) > 30 and {name for _, name in walked} >= {"LCMSERVE_MODEL", "LCMSERVE_MAX_BATCH_SIZE",
                                                               "LCMSERVE_DEVICES", "LCMSERVE_OTLP_ENDPOINT"}
    for action, name in walked:
        text, value = value_for(action)
        monkeypatch.setenv(name, text)
        expected[action.dest] = value
    parser = serve_parser()  # (reads the variables)
    args = parser.parse_args([])  # --model too: nothing on the command line
    for dest, value in expected.items():
        assert getattr(args, dest) == value, dest
    help_text = " ".join(parser.format_help().split())
    for action, name in flags(parser):
        assert f"[env {name}]" in help_text, f"--help does not name {name}"


def test_the_command_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LCMSERVE_MODEL", "tiny")
    monkeypatch.setenv("LCMSERVE_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("LCMSERVE_NO_REFLECTION", "true")
    monkeypatch.setenv("LCMSERVE_LORA", "a.safetensors:0.5,b")
    args = serve_parser().parse_args(["--model", "other", "--max-batch-size", "8", "--lora", "c"])
    assert (args.model, args.max_batch_size, args.no_reflection) == ("other", 8, True)
    assert args.lora == ["a.safetensors:0.5", "b", "c"]  # a repeatable flag: the command line adds to it
    monkeypatch.setenv("LCMSERVE_NO_REFLECTION", "0")
    assert serve_parser().parse_args([]).no_reflection is False


@pytest.mark.parametrize(("name", "value", "says"), [
    ("LCMSERVE_MAX_BATCH_SIZE", "lots", "invalid int value"),
    ("LCMSERVE_BACKEND", "fastest", "invalid choice"),
    ("LCMSERVE_NO_REFLECTION", "maybe", "expected one of"),
    ("LCMSERVE_BUCKETS", "1,x", "batch sizes"),
])
def test_a_bad_value_exits_2_naming_the_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 name: str, value: str, says: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        serve_parser()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"{name}={value!r}" in err and says in err, err


def test_the_serve_command_exits_2_naming_the_variable() -> None:
    env = {**os.environ, "LCMSERVE_MAX_BATCH_SIZE": "lots"}
    out = subprocess.run([sys.executable, "-m", "lcmserve.cli", "serve", "--model", "tiny"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "LCMSERVE_MAX_BATCH_SIZE='lots'" in out.stderr, out.stderr


def test_a_server_configured_by_variables_serves(telemetry_server: TelemetryServer) -> None:
    """The telemetry server's only flag is --port 0: model, metrics, HTTP port, JSON logs and the OTLP
    endpoint came from LCMSERVE_* variables."""
    lines = telemetry_server.log_lines()  # JSON: LCMSERVE_LOG_FORMAT=json took
    assert any(line["message"].startswith("metrics on http://") for line in lines)  # LCMSERVE_METRICS_PORT=0
    assert "lcmserve_inference_request_total" in telemetry_server.metrics()
