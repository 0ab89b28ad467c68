"""How an edge call ends, whatever the transport: a Status, and a Refusal each transport renders.

    Status    the outcome, named as google.rpc.Code names them: gRPC sends the code of that name,
              an HTTP handler maps it to an HTTP status; metrics count calls under its name.
    Refusal   a call the edge refuses or fails: the status, the whole message the client reads, the
              fields at fault (INVALID_ARGUMENT: field and what is wrong with it) and, when trying
              again later can succeed, how long to wait (RESOURCE_EXHAUSTED).
    Refused   the exception that carries a Refusal out of the edge core (core.py) to the transport.

No transport imports here: convert.py renders a Refusal as gRPC's status with google.rpc details.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    """google.rpc.Code, by name (the numbers are gRPC's: the codes of the same names)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def named(cls, name: str) -> Status:
        """The status of that name (e.g. a grpc.StatusCode's `.name`), UNKNOWN for a name it does not have."""
        return cls.__members__.get(name, cls.UNKNOWN)


@dataclass(frozen=True)
class Refusal:
    status: Status
    message: str  # the whole text the client reads
    violations: tuple[tuple[str, str], ...] = ()  # (field, what is wrong: its value and the limit)
    retry_after_s: float | None = None  # a retry may succeed after this long


class Refused(Exception):
    """The edge refuses (or the engine failed) a call; `refusal` says how, for the transport to render."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
