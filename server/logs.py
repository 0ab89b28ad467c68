"""How both server processes log: text or JSON lines on stderr, the access log, the request context.

    setup(settings, process)   the root logger's one handler; the edge calls it from the serve CLI, the
                               engine process from its main with the same settings (EngineProcess
                               passes `current()` when it spawns one)
    text                       `TIME LEVEL LOGGER: message` (the engine's logger names end in [engine])
    json                       one object per line: time (UTC, ISO 8601), level, logger, message, process
                               ("edge" | "engine"), request_id / trace_id / span_id inside a request, the
                               access line's fields, exception. Every line on stderr is JSON: warnings go
                               through logging, and in the edge the stderr file descriptor itself is a pipe
                               whose reader wraps any other line (a library's print, gRPC's C core, a
                               traceback; the engine processes inherit it) as {"logger": "stderr", ...}.
                               `listening on HOST:PORT` stays on stdout.
    access(...)                one INFO line per request on `lcmserve.access`: transport, method, peer,
                               status, seed, images, ms; the prompt only with --log-prompts.
    REQUEST                    the request a log line is about (the edge sets it for each call).

Standard library only: both processes import it, the edge without torch.
"""

from __future__ import annotations

import atexit
import contextvars
import datetime
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Literal

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
ACCESS = logging.getLogger("lcmserve.access")


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"  # a name of LEVELS
    format: Literal["text", "json"] = "text"
    prompts: bool = False  # the access line carries the prompt (--log-prompts)


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    trace_id: str | None = None  # 32 hex digits, when the request is traced
    span_id: str | None = None  # 16 hex digits, the server span's


REQUEST: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("lcmserve_request", default=None)


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": self.process,
        }
        request = getattr(record, "request", None) or REQUEST.get()
        if isinstance(request, RequestContext):
            line["request_id"] = request.request_id
            if request.trace_id is not None:
                line["trace_id"], line["span_id"] = request.trace_id, request.span_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # (generic in typeshed only)
    """The root's handler that setup() installs; it remembers the settings (current())."""

    def __init__(self, settings: LogSettings) -> None:
        super().__init__(sys.stderr)
        self.settings = settings


def setup(settings: LogSettings, process: Literal["edge", "engine"] = "edge") -> None:
    """Make the root logger's one handler write `settings.format` lines at `settings.level` on stderr."""
    handler = _Handler(settings)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter(process))
        if process == "edge":
            _wrap_stderr(process)
    else:
        name = "%(name)s[engine]" if process == "engine" else "%(name)s"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger, in the chosen format


def current() -> LogSettings:
    """The settings setup() installed in this process; else the defaults at the root's level."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler):
            return handler.settings
    return LogSettings(level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))


def access(transport: str, method: str, peer: str, status: str, seed: int | None, images: int, ms: float,
           prompt: str | None = None, request: RequestContext | None = None) -> None:
    """The access log line of one request (INFO on lcmserve.access); `request`: its ids, when the line is
    written outside the request's own context (a streamed HTTP response ends in another task)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {"transport": transport, "method": method, "peer": peer, "status": status,
                              "seed": seed, "images": images, "ms": round(ms, 1)}
    text = f"{transport} {method} {peer or '-'} {status} seed={seed} images={images} ms={ms:.1f}"
    if prompt is not None and current().prompts:
        fields["prompt"] = prompt
        text += f" prompt={prompt!r}"
    ACCESS.info("%s", text, extra={"fields": fields, "request": request})


# ---- json mode: every line on stderr is JSON ------------------------------------------------------


def _wrap_stderr(process: str) -> None:
    """Point file descriptor 2 at a pipe; a thread copies each line to the real stderr, JSON lines as
    they are, any other line wrapped as a JSON object. Child processes inherit the pipe. Restored at
    exit, after what is in the pipe has been written."""
    if getattr(_wrap_stderr, "done", False):
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=_copy_lines, args=(read_end, real), name="lcmserve-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.write(2, _END + b"\n")  # (the reader stops there: children such as multiprocessing's resource
        os.dup2(real, 2)  # tracker keep the pipe open, so its end of file would come only after we exit)
        thread.join(2.0)

    atexit.register(restore)
    _wrap_stderr.done = True  # type: ignore[attr-defined]


_END = b"lcmserve-stderr-end"


def _copy_lines(read_end: int, real: int) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            line = raw.rstrip(b"\r\n")
            if line == _END:
                return
            if not line.strip():
                continue
            if not line.startswith(b"{"):
                text = line.decode("utf-8", "replace")
                line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                                   "level": "WARNING", "logger": "stderr", "message": text},
                                  ensure_ascii=False).encode()
            try:
                os.write(real, line + b"\n")
            except OSError:
                return
