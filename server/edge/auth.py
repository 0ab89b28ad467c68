"""The bearer-token check, one for every transport (`serve --auth-token-file`).

TokenCheck is a pure function of the `authorization` value a call carries (gRPC metadata or an
HTTP header): `Bearer <token>` with a listed token. Tokens are compared in constant time
(hmac.compare_digest against every accepted token, without stopping at the first match), so the
time an answer takes does not tell which token matched. The gRPC interceptor (service.py TokenAuth)
wraps it; it answers a refused call with `unauthenticated()`.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from .status import Refusal, Status

HEADER = "authorization"  # lower case: gRPC metadata keys and HTTP/2 header names are


class TokenCheck:
    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("TokenAuth needs at least one non-empty token")
        self._tokens = tuple(t.encode() for t in tokens)

    def allows(self, authorization: str | bytes | None) -> bool:
        """Whether `authorization` (the header's value; None when the call has none) is
        `Bearer <token>` (scheme in any case) with one of the accepted tokens."""
        if authorization is None:
            return False
        given = authorization.encode() if isinstance(authorization, str) else authorization
        scheme, _, token = given.partition(b" ")
        matched = False
        for accepted in self._tokens:  # every token compared: the time does not tell which matched
            matched |= hmac.compare_digest(token.strip(), accepted)
        return scheme.lower() == b"bearer" and matched


def unauthenticated(carrier: str = "metadata") -> Refusal:
    """The answer to a call without an accepted token; `carrier`: what the client sets ("metadata"
    for gRPC, "header" for HTTP)."""
    return Refusal(Status.UNAUTHENTICATED, f"missing or wrong token: send the {carrier} 'authorization: Bearer <token>'")
