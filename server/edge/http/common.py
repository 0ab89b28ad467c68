"""What every HTTP route shares: the context (the edge core, the token check), body reading with a
limit (413 naming it), JSON objects, and waiting on the core while watching for the client to leave."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from ...protocol import Picture
from ..auth import TokenCheck
from ..core import EdgeCore
from ..tracing import CallInfo
from .errors import ApiError, bad_request, too_large

TRANSPORT = "http"  # the metrics' transport label of every call that comes in here
T = TypeVar("T")


def call_info(request: Request) -> CallInfo:
    """The call as its access log line and trace span name it (`POST /v1/generate`, the client's address,
    the headers a W3C traceparent continues from: edge/observe.py)."""
    client = request.client
    return CallInfo(f"{request.method} {request.url.path}", f"{client.host}:{client.port}" if client else "",
                    request.headers)


@dataclass
class HttpContext:
    core: EdgeCore
    tokens: TokenCheck | None  # None: no authentication (serve without --auth-token-file)

    @property
    def json_limit(self) -> int:
        """Most bytes of a JSON body that may carry images (/v1/generate): the gRPC receive limit,
        its images base64-encoded (4/3), plus room for JSON's own text."""
        return self.core.limits.max_request_bytes * 4 // 3 + 64 * 1024

    @property
    def form_limit(self) -> int:
        """Most bytes of a multipart body (/v1/images/edits): the gRPC receive limit plus the
        form's own framing."""
        return self.core.limits.max_request_bytes + 64 * 1024

    generation_limit: int = 1024 * 1024  # /v1/images/generations: no images; prompts are a few KiB


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def read_body(request: Request, limit: int, route: str) -> bytes:
    """The whole body, or 413 as soon as it passes `limit` (by Content-Length, or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit, route)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit, route)
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(request: Request, body: bytes) -> dict[str, Any]:
    """A JSON body that must be one object; 415 for another content type, 400 for bad JSON."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, f"the content type is {kind!r}; send a JSON object with 'Content-Type: "
                            "application/json'", code="unsupported_media_type")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise bad_request(None, f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise bad_request(None, f"the body is a JSON {type(value).__name__}; expected an object")
    return value


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client disconnects first: then cancel it (the core then cancels
    the request: its rows leave the batch at the next step) and raise ClientGone. The body must
    have been read already."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def b64(picture: Picture) -> str:
    return base64.b64encode(picture.data).decode("ascii")
