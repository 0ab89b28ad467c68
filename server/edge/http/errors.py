"""Errors of the HTTP front door in OpenAI's shape, from the edge core's refusals (status.Refusal).

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

  status        HTTP status from the Refusal's google.rpc name (HTTP_STATUS): INVALID_ARGUMENT 400,
                UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429 (with Retry-After), UNAVAILABLE 503, ...
  type          OpenAI's family of the status: invalid_request_error, authentication_error,
                rate_limit_error, server_error
  param         the first field at fault, named as the route names it (`size` for width/height on the
                OpenAI routes), or null
  code          the status name in lower case (`invalid_argument`), or `request_too_large` (413)
  violations    (lcmserve's extension) every field at fault: [{"param", "message"}], as gRPC's BadRequest
                (the message names the GenerateRequest field: `width is 65; ...` under param `size`)

Retry-After is whole seconds (HTTP's delta-seconds, rounded up); `retry-after-ms` carries the exact
hint (the OpenAI SDKs read it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from starlette.responses import JSONResponse

from ..status import Refusal, Status

HTTP_STATUS: dict[Status, int] = {
    Status.INVALID_ARGUMENT: 400, Status.FAILED_PRECONDITION: 400, Status.OUT_OF_RANGE: 400,
    Status.UNAUTHENTICATED: 401, Status.PERMISSION_DENIED: 403, Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409, Status.ABORTED: 409, Status.RESOURCE_EXHAUSTED: 429, Status.CANCELLED: 499,
    Status.UNIMPLEMENTED: 501, Status.UNAVAILABLE: 503, Status.DEADLINE_EXCEEDED: 504,
}  # anything else: 500


def error_type(http_status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if http_status == 401:
        return "authentication_error"
    if http_status == 403:
        return "permission_error"
    if http_status == 429:
        return "rate_limit_error"
    if 400 <= http_status < 500:
        return "invalid_request_error"
    return "server_error"


class ApiError(Exception):
    """An answer of the HTTP front door other than 2xx; `response()` renders it."""

    def __init__(self, http_status: int, message: str, param: str | None = None, code: str | None = None,
                 violations: tuple[tuple[str, str], ...] = (),  # (param, the whole message)
                 retry_after_s: float | None = None,
                 status: Status = Status.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.param = param
        self.code = code
        self.violations = violations
        self.retry_after_s = retry_after_s
        self.status = status  # the google.rpc status the call is counted under (metrics)

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"message": self.message, "type": error_type(self.http_status),
                                    "param": self.param, "code": self.code}
        if self.violations:
            error["violations"] = [{"param": param, "message": text} for param, text in self.violations]
        return {"error": error}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s))),
                "retry-after-ms": str(max(1, round(self.retry_after_s * 1e3)))}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.http_status, headers=self.headers())


def bad_request(param: str | None, message: str) -> ApiError:
    """400 for a field the HTTP layer itself refuses (a JSON type, an unknown value, a bad form)."""
    return ApiError(400, message, param=param, code="invalid_argument",
                    violations=((param, message),) if param else ())


def refusal_error(refusal: Refusal, rename: Mapping[str, str] | None = None) -> ApiError:
    """A Refusal of the edge core as an ApiError; `rename` maps GenerateRequest fields to the
    route's names (the OpenAI routes: width/height -> size, num_images -> n, ...)."""
    rename = rename or {}
    violations = tuple((rename.get(field, field), f"{field} {text}") for field, text in refusal.violations)
    http_status = HTTP_STATUS.get(refusal.status, 500)
    return ApiError(http_status, refusal.message, param=violations[0][0] if violations else None,
                    code=refusal.status.name.lower(), violations=violations, retry_after_s=refusal.retry_after_s,
                    status=refusal.status)


def too_large(limit: int, what: str) -> ApiError:
    """413: the body is over `limit` bytes."""
    return ApiError(413, f"the request body is over the limit of {limit} bytes for {what} (images sent as "
                         f"base64 take 4/3 of their size; send smaller images)", code="request_too_large")


def not_found(path: str) -> ApiError:
    return ApiError(404, f"no route {path}; see /v1/models, /v1/images/generations, /v1/images/edits, "
                         "/v1/generate, /health, /ready", code="not_found", status=Status.NOT_FOUND)
