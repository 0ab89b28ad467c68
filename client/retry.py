"""Retries of Generate and the channel's balancing: what Client and AsyncClient share.

Every image is a pure function of (model, request, seed), and the SDK fixes the seed on the client
(`pick_seed`) before the first try, so a retried request gives the very same images, whichever
server answers it. What is retried, and how:

- UNAVAILABLE (a server unreachable, loading, draining, or whose engine died) and
  RESOURCE_EXHAUSTED carrying a google.rpc.RetryInfo (a full queue, a batch out of memory); not a
  RESOURCE_EXHAUSTED without one (a message over a size limit fails the same way every time), and
  no other code (bad input, a deadline passed, a cancelled call, a server error).
- `retries` more tries at most (the constructors' `retries=`, default 3; 0 turns retries off),
  after exponential backoff with full jitter (a uniform wait in [0, min(max, initial * 2^k)]),
  never sooner than the server's RetryInfo says.
- all inside the call's one deadline: a try gets what is left of it, and a wait that would pass it
  ends the retries (the last error is raised).

Balancing is gRPC's own: a target that names several servers (`ipv4:a:p1,b:p2`, `dns:///name:port`)
gets `round_robin` with `healthCheckConfig` in the channel's service config (`balancing_options`),
so each call goes to the next server whose grpc.health.v1 says SERVING, and a retry lands on
another one.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .errors import LcmServeError, ResourceExhaustedError, UnavailableError

log = logging.getLogger("lcmserve.client")

SEED_BITS = 31  # seeds the SDK picks: within every int type a caller may store them in

# round_robin over every resolved address, each one's health watched on grpc.health.v1 (service
# "": the whole server); one NOT_SERVING (loading, draining, engine dead) is skipped.
BALANCED_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
}


def pick_seed() -> int:
    """A random 31-bit seed for a request that names none (the OS's randomness: two processes
    forked from one never share a sequence)."""
    return secrets.randbits(SEED_BITS)


def several_servers(target: str) -> bool:
    """Whether `target` may name several servers: a list (`ipv4:a:1,b:2`) or a `dns:` name (a
    headless Service resolves to one address per ready pod). A plain `host:port` keeps gRPC's
    default pick_first without health checks, so that a lone server's own answers ("the model is
    still loading", "draining") reach the caller instead of the channel's "backend unhealthy"."""
    return "," in target or target.startswith("dns:")


def balancing_options(target: str) -> list[tuple[str, Any]]:
    """Channel arguments for `target`: gRPC's transparent retries (of calls that never reached a
    server) on, and for several servers round_robin with health checks."""
    options: list[tuple[str, Any]] = [("grpc.enable_retries", 1)]
    if several_servers(target):
        options.append(("grpc.service_config", json.dumps(BALANCED_SERVICE_CONFIG)))
    return options


@dataclass(frozen=True)
class RetryPolicy:
    """How Generate is retried (module docstring). Times in seconds."""

    retries: int = 3  # more tries after the first; 0: none
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r} must be an integer >= 0 (0 turns retries off)")

    @staticmethod
    def retryable(error: LcmServeError) -> bool:
        """UNAVAILABLE, or RESOURCE_EXHAUSTED with a RetryInfo (a size limit has none)."""
        if isinstance(error, UnavailableError):
            return True
        return isinstance(error, ResourceExhaustedError) and error.retry_after_s is not None

    def backoff_s(self, retry: int, error: LcmServeError, rng: random.Random) -> float:
        """The wait before retry number `retry` (1, 2, ...): full jitter, at least the RetryInfo."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        wait = rng.uniform(0.0, cap)
        hint = error.retry_after_s if isinstance(error, ResourceExhaustedError) else None
        return max(wait, hint or 0.0)


class Attempts:
    """The tries of one call under one deadline: `timeout()` for each try, `wait_s(error)` after a
    failed one (None: give up and raise it)."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, seed: int, rng: random.Random) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._seed = seed
        self._rng = rng
        self.retries = 0  # done so far

    def timeout(self) -> float | None:
        """What is left of the deadline, for the next try (seconds; None: no deadline)."""
        if self._deadline is None:
            return None
        return max(0.001, self._deadline - time.monotonic())

    def wait_s(self, error: LcmServeError) -> float | None:
        """How long to wait before trying again after `error`, or None to raise it."""
        policy = self._policy
        if self.retries >= policy.retries or not policy.retryable(error):
            return None
        wait = policy.backoff_s(self.retries + 1, error, self._rng)
        if self._deadline is not None and time.monotonic() + wait >= self._deadline:
            return None  # no time left for another try
        self.retries += 1
        log.info("retrying Generate seed=%d after %s (retry %d of %d, in %.3f s)", self._seed,
                 error.code, self.retries, policy.retries, wait)
        return wait
