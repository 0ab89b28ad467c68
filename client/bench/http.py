"""The HTTP driver of `lcmserve bench --target http://HOST:PORT` (or https://): the same requests as
over gRPC, sent to the server's native route POST /v1/generate (a GenerateRequest in protobuf's JSON
mapping) and read back as Server-Sent Events of GenerateResponse JSON, so the two transports compare
in one report.

Standard library only (asyncio streams; the client's base install has no HTTP library): HTTP/1.1
with keep-alive, one connection per request in flight, idle connections reused. A stream left early
(timeout, Ctrl-C) closes its connection: the server then cancels the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from .._convert import build_generate_request, event_from_proto, model_info_from_proto
from ..errors import LcmServeError
from ..options import GenerateFields, GenerateOptions
from ..types import GenerateEvent, ModelInfo, Summary
from ..v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Unpack


def is_http_target(target: str | None) -> bool:
    return target is not None and target.startswith(("http://", "https://"))


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """What the bench driver needs of a client (`stream`, `model_info`), over HTTP."""

    def __init__(self, target: str, *, root_certificates: bytes | None = None, client_cert: bytes | None = None,
                 client_key: bytes | None = None, token: str | None = None) -> None:
        url = urllib.parse.urlsplit(target)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {target!r}")
        self.target = target
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.authority = url.netloc
        self.ssl = _context(root_certificates, client_cert, client_key) if url.scheme == "https" else None
        token = token if token is not None else os.environ.get("LCMSERVE_TOKEN")
        self.headers = f"Authorization: Bearer {token}\r\n" if token else ""
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        while self._idle:
            self._idle.pop().close()

    async def stream(self, prompt: str, options: GenerateOptions | None = None, *, timeout: float | None = None,
                     **fields: Unpack[GenerateFields]) -> AsyncGenerator[GenerateEvent, None]:
        """StepEvent..., Image..., Summary, as AsyncClient.stream yields them; LcmServeError on a refusal.
        (`timeout`: the driver bounds each stream itself.)"""
        request = build_generate_request(prompt, options, **fields)
        body = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)).encode()
        connection = await self._connect()
        reusable = False
        try:
            status, headers = await self._send(connection, "POST", "/v1/generate", body,
                                               "Accept: text/event-stream\r\nContent-Type: application/json\r\n")
            if status != 200:
                raise _error(status, await _read_body(connection.reader, headers))
            summary = False
            async for event_name, data in _sse(connection.reader, headers):
                if event_name == "error":
                    raise _error(500, data)
                event = event_from_proto(json_format.Parse(data, pb.GenerateResponse()))
                summary = summary or isinstance(event, Summary)
                yield event
            if not summary:
                raise LcmServeError("the stream ended without a summary", "INCOMPLETE")
            reusable = headers.get("connection", "").lower() != "close"
        finally:
            if reusable:
                self._idle.append(connection)
            else:
                connection.close()  # (mid-stream: the server sees the disconnect and cancels)

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        connection = await self._connect()
        try:
            status, headers = await self._send(connection, "GET", "/v1/info", b"", "")
            body = await _read_body(connection.reader, headers)
            if status != 200:
                raise _error(status, body)
            return model_info_from_proto(json_format.Parse(body, pb.GetModelInfoResponse(), ignore_unknown_fields=True))
        finally:
            connection.close()

    async def _connect(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.reader.at_eof() and not connection.writer.is_closing():
                return connection
            connection.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=2**24)
        except OSError as exc:
            raise LcmServeError(f"cannot connect to {self.target}: {exc}", "UNAVAILABLE", str(exc)) from exc
        return _Connection(reader, writer)

    async def _send(self, connection: _Connection, method: str, path: str, body: bytes,
                    extra: str) -> tuple[int, dict[str, str]]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.authority}\r\nContent-Length: {len(body)}\r\n"
                f"{self.headers}{extra}\r\n").encode()
        connection.writer.write(head + body)
        await connection.writer.drain()
        status_line = await connection.reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise LcmServeError(f"not an HTTP answer from {self.target}: {status_line[:80]!r}", "UNAVAILABLE")
        headers: dict[str, str] = {}
        while (line := await connection.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncGenerator[bytes, None]:
    """The body's bytes as they come: chunked transfer encoding, or Content-Length."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()  # the empty trailer
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF
            yield data
    else:
        length = int(headers.get("content-length", "0"))
        if length:
            yield await reader.readexactly(length)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> str:
    return b"".join([chunk async for chunk in _chunks(reader, headers)]).decode("utf-8", "replace")


async def _sse(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncGenerator[tuple[str, str], None]:
    """(event, data) of a Server-Sent Events body; comments (pings) skipped."""
    buffer = b""
    async for chunk in _chunks(reader, headers):
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            event, data = "message", []
            for line in block.decode("utf-8").split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
            if data:
                yield event, "\n".join(data)


def _error(status: int, body: str) -> LcmServeError:
    """An answer in OpenAI's error shape -> LcmServeError with the status's name (`code`)."""
    error: Any = {}
    with contextlib.suppress(ValueError):
        error = json.loads(body).get("error", {})
    message = str(error.get("message") or body[:200] or f"HTTP {status}") if isinstance(error, dict) else body[:200]
    code = str(error.get("code") or f"HTTP_{status}").upper() if isinstance(error, dict) else f"HTTP_{status}"
    return LcmServeError(f"{code}: {message}", code, message)


def _context(root_certificates: bytes | None, client_cert: bytes | None, client_key: bytes | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=root_certificates.decode("ascii") if root_certificates else None)
    if client_cert is not None and client_key is not None:
        with tempfile.TemporaryDirectory(prefix="lcmserve-bench-") as folder:  # ssl loads a chain from files only
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, data in ((cert, client_cert), (key, client_key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
            context.load_cert_chain(cert, key)
    return context


__all__ = ["HttpClient", "is_http_target"]
