"""Errors of the lcmserve SDK, one class per gRPC status code the server uses.

Every ``grpc.RpcError`` the SDK sees is turned into an ``LcmServeError`` by ``from_rpc_error``:
``str(error)`` reads ``"CODE: the server's message"``, ``error.code`` is the status code name
(``"INVALID_ARGUMENT"``), ``error.details`` the server's message as sent. The rich status details
(``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer) fill
``InvalidArgumentError.field_violations`` (``google.rpc.BadRequest``) and
``ResourceExhaustedError.retry_after_s`` (``google.rpc.RetryInfo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from google.protobuf.message import DecodeError
import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, from ``google.rpc.BadRequest``."""

    field: str  # request field name, e.g. "width"
    description: str  # what is wrong: value and limit


class LcmServeError(Exception):
    """Base of all SDK errors: a failed RPC, or a stream that broke the protocol."""

    default_code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code: str = code or self.default_code  # gRPC status code name, e.g. "UNAVAILABLE"
        self.details = details  # the server's message, as sent

    def __reduce__(self) -> tuple[Any, ...]:  # keep the attributes through pickling
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[LcmServeError], state: dict[str, Any]) -> LcmServeError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class CancelledError(LcmServeError):
    """CANCELLED: the call was cancelled (by this client or the server)."""

    default_code = "CANCELLED"


class UnknownError(LcmServeError):
    """UNKNOWN: an error without a status (e.g. request bytes the server could not parse)."""

    default_code = "UNKNOWN"


class InvalidArgumentError(LcmServeError):
    """INVALID_ARGUMENT: the request is bad; ``field_violations`` name the fields."""

    default_code = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        details: str = "",
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message, code, details)
        self.field_violations: list[FieldViolation] = list(field_violations)


class DeadlineExceededError(LcmServeError):
    """DEADLINE_EXCEEDED: the call's timeout passed before it finished."""

    default_code = "DEADLINE_EXCEEDED"


class NotFoundError(LcmServeError):
    """NOT_FOUND: the server does not know what was asked for."""

    default_code = "NOT_FOUND"


class AlreadyExistsError(LcmServeError):
    """ALREADY_EXISTS."""

    default_code = "ALREADY_EXISTS"


class PermissionDeniedError(LcmServeError):
    """PERMISSION_DENIED: the caller may not do this."""

    default_code = "PERMISSION_DENIED"


class ResourceExhaustedError(LcmServeError):
    """RESOURCE_EXHAUSTED: the server's queue is full (``retry_after_s`` says when to retry), or a
    message exceeded a size limit (then ``retry_after_s`` is None)."""

    default_code = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        details: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, code, details)
        self.retry_after_s = retry_after_s  # seconds, from google.rpc.RetryInfo


class FailedPreconditionError(LcmServeError):
    """FAILED_PRECONDITION."""

    default_code = "FAILED_PRECONDITION"


class AbortedError(LcmServeError):
    """ABORTED."""

    default_code = "ABORTED"


class OutOfRangeError(LcmServeError):
    """OUT_OF_RANGE."""

    default_code = "OUT_OF_RANGE"


class UnimplementedError(LcmServeError):
    """UNIMPLEMENTED: the server does not serve this RPC (wrong server or version?)."""

    default_code = "UNIMPLEMENTED"


class InternalError(LcmServeError):
    """INTERNAL: the server failed."""

    default_code = "INTERNAL"


class ProtocolError(InternalError):
    """The server's stream broke the lcmserve protocol (e.g. it ended without a summary)."""


class UnavailableError(LcmServeError):
    """UNAVAILABLE: the server cannot be reached, or is loading or draining."""

    default_code = "UNAVAILABLE"


class DataLossError(LcmServeError):
    """DATA_LOSS."""

    default_code = "DATA_LOSS"


class UnauthenticatedError(LcmServeError):
    """UNAUTHENTICATED: credentials missing or wrong."""

    default_code = "UNAUTHENTICATED"


_CLASSES: dict[str, type[LcmServeError]] = {
    cls.default_code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def from_rpc_error(error: Any) -> LcmServeError:
    """Maps a ``grpc.RpcError`` (sync or ``grpc.aio``) to the LcmServeError of its status code."""
    code = "UNKNOWN"
    code_method = getattr(error, "code", None)
    if callable(code_method):
        status_code = code_method()
        code = getattr(status_code, "name", None) or "UNKNOWN"
    details_method = getattr(error, "details", None)
    details = details_method() if callable(details_method) else None
    if details is None:
        details = str(error)
    return _error_from_status(code, details, _rich_status(error))


def _rich_status(error: Any) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` sent in the trailers, or None (absent, malformed, or not a call)."""
    if not callable(getattr(error, "trailing_metadata", None)):
        return None
    try:
        from grpc_status import rpc_status

        status: status_pb2.Status | None = rpc_status.from_call(error)
    except (ValueError, DecodeError, TypeError, AttributeError):
        return None  # a trailer that disagrees with the status or does not parse
    return status


def _error_from_status(code: str, details: str, status: status_pb2.Status | None) -> LcmServeError:
    """Builds the error of status code name ``code`` with the server's message ``details`` and
    the rich status ``status`` (may be None)."""
    if status is not None and not details:
        details = status.message
    message = f"{code}: {details}" if details else code
    cls = _CLASSES.get(code, LcmServeError)

    if cls is InvalidArgumentError:
        violations = _field_violations(status)
        # The server's message usually names its fields already; add the ones it does not.
        unmentioned = [v for v in violations if v.field not in details and v.description not in details]
        if unmentioned:
            message += " (" + "; ".join(f"{v.field}: {v.description}" for v in unmentioned) + ")"
        return InvalidArgumentError(message, code, details, field_violations=violations)

    if cls is ResourceExhaustedError:
        retry_after_s = _retry_after_s(status)
        if retry_after_s is not None and "retry after" not in details:  # lcmserve's own message says it
            message += f" (retry after {retry_after_s:g} s)"
        elif "larger than max" in details:
            message += " (raise the client's max_message_mb, or the server's limit)"
        return ResourceExhaustedError(message, code, details, retry_after_s=retry_after_s)

    return cls(message, code, details)


def _field_violations(status: status_pb2.Status | None) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):  # False when the detail is of another type
            violations.extend(
                FieldViolation(field=v.field, description=v.description) for v in bad_request.field_violations
            )
    return violations


def _retry_after_s(status: status_pb2.Status | None) -> float | None:
    for detail in status.details if status is not None else ():
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(retry_info):  # False when the detail is of another type
            delay = retry_info.retry_delay
            return float(delay.seconds + delay.nanos / 1e9)
    return None
