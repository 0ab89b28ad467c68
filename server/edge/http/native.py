"""lcmserve's own HTTP routes: every gRPC feature over JSON.

  POST /v1/generate   body: a GenerateRequest in protobuf's JSON mapping (json_format; field names as in
                      the proto or lowerCamelCase, enums by name, bytes as base64). Answer: with
                      `Accept: text/event-stream`, one Server-Sent Event per GenerateResponse (event `step`,
                      `image` or `summary`; data: its JSON with the proto's field names), a failure after the
                      first as event `error`; otherwise one JSON document {"responses": [...]}.
  GET /v1/info        GetModelInfoResponse as JSON (the proto's field names)
  GET /v1/models      OpenAI's model list: the served model (its fused LoRAs listed), then each
                      per-request adapter as an entry of its own
  GET /health         200 while the process lives
  GET /ready          200 {"status": "SERVING"} when Generate would take a request, else 503 (as gRPC's health)
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncGenerator

from google.protobuf import json_format
from lcmserve.v1 import generation_pb2 as pb
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import convert
from ..core import Response as CoreEvent
from ..status import Refused
from .common import TRANSPORT, ClientGone, HttpContext, call_info, json_object, read_body, until_disconnect
from .errors import ApiError, bad_request, refusal_error


async def generate(ctx: HttpContext, request: Request) -> Response:
    try:
        body = await read_body(request, ctx.json_limit, "/v1/generate")
        values = json_object(request, body)
        try:
            message = json_format.ParseDict(values, pb.GenerateRequest())
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
            text = str(exc)
            named = re.search(r'field named "(\w+)"|Failed to parse (\w+) field', text)
            raise bad_request(next((g for g in named.groups() if g), None) if named else None,
                              f"the body is not a GenerateRequest: {text[:300]}") from None
    except ApiError as exc:
        ctx.core.count(exc.status, TRANSPORT, call_info(request))
        return exc.response()
    events = ctx.core.generate(message, None, TRANSPORT, call_info(request))
    sse = "text/event-stream" in request.headers.get("accept", "")
    try:
        if not sse:
            async with contextlib.aclosing(events):
                collected = await until_disconnect(request, _collect(events))
            return JSONResponse({"responses": [response_json(e) for e in collected]})
        first = await until_disconnect(request, anext(events))
    except Refused as exc:
        return refusal_error(exc.refusal).response()
    except ClientGone:
        return Response(status_code=499)
    return EventSourceResponse(_sse(first, events), ping=15)


def response_json(event: CoreEvent) -> dict[str, object]:
    """One event as GenerateResponse JSON (the proto's field names, zeros included; bytes base64;
    64-bit ints as strings)."""
    return json_format.MessageToDict(convert.response(event), preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)


async def _collect(events: AsyncGenerator[CoreEvent, None]) -> list[CoreEvent]:
    return [event async for event in events]


async def _sse(first: CoreEvent, events: AsyncGenerator[CoreEvent, None]) -> AsyncGenerator[ServerSentEvent, None]:
    async with contextlib.aclosing(events):
        yield _event(first)
        try:
            async for event in events:
                yield _event(event)
        except Refused as exc:
            yield ServerSentEvent(json.dumps(refusal_error(exc.refusal).body()), event="error")


def _event(event: CoreEvent) -> ServerSentEvent:
    data = response_json(event)
    return ServerSentEvent(json.dumps(data, separators=(",", ":")), event=next(iter(data), "message"))


async def info(ctx: HttpContext, request: Request) -> Response:
    try:
        served = ctx.core.model()
    except Refused as exc:
        return refusal_error(exc.refusal).response()
    return JSONResponse(json_format.MessageToDict(convert.model_info(served), preserving_proto_field_name=True))


async def models(ctx: HttpContext, request: Request) -> Response:
    try:
        served = ctx.core.model()
    except Refused as exc:
        return refusal_error(exc.refusal).response()
    model = served.info.model
    data: list[dict[str, object]] = [{
        "id": model.base, "object": "model", "created": 0, "owned_by": "lcmserve",
        "loras": [{"source": lo.source, "scale": lo.scale, "sha256": lo.sha256} for lo in model.loras],
        "backend": model.backend, "dtype": model.dtype, "decoders": list(model.decoders)}]
    for adapter in served.info.adapters:
        data.append({"id": adapter.name, "object": "model", "created": 0, "owned_by": "lcmserve",
                     "parent": model.base, "adapter": {k: v for k, v in vars(adapter).items()
                                                        if isinstance(v, str | int | float | bool)}})
    return JSONResponse({"object": "list", "data": data})


async def health(ctx: HttpContext, request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def ready(ctx: HttpContext, request: Request) -> Response:
    refusal = ctx.core.not_serving()
    if refusal is None:
        return JSONResponse({"status": "SERVING"})
    return JSONResponse({"status": "NOT_SERVING", "reason": refusal.message}, status_code=503)
