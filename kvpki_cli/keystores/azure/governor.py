"""The Key Vault signing budget as a limit kvpki keeps, instead of a 429 storm it provokes.

Key Vault allows a fixed number of key operations per vault per 10 s, weighted by key
type ("enforcement is on their sum": one RSA-4096 HSM signature costs as much as eight
EC HSM ones).  Every thread of a process that signs with a vault takes its turn from
one ``VaultGovernor`` per vault URL before each ``POST .../sign``.  The governor
measures the budget in seconds of vault time: a signature with a key whose rate is
``r`` per second costs ``1/r`` s, so CAs of different key types in one vault share it
by weight.  It is a GCRA (a token bucket kept as one "theoretical arrival time"):
callers beyond the rate queue for their turn; one whose turn comes after its deadline
(``kvpki_cli.deadline``) is refused at once with ``BudgetExhausted`` carrying
``retry_after``, and does not spend budget.

``sign_rate`` (store setting, signatures per second for this CA's key) defaults to 95%
of the documented limit for the key type and HSM/software, leaving room for timing
jitter between our clock and the vault's window.  It is a per-process figure: with N
instances (``kvpki serve`` behind a load balancer, CI runners) on one vault, give each
instance its share, e.g. ``sign_rate = 190 / N`` for EC HSM keys.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvpki_cli import deadline as deadlines
from kvpki_cli.errors import BackendError

WINDOW_S = 10.0  # Key Vault counts transactions per 10 s per vault
SHARE = 0.95  # the default rate's share of the documented limit
BURST_S = 0.25  # vault time an idle governor may hand out at once

# Documented limit per 10 s per vault for "other" (non-create) key operations: (HSM, software).
_EC_LIMIT = (2000, 4000)
_RSA_LIMITS = {2048: (2000, 4000), 3072: (500, 1000), 4096: (250, 500)}


class BudgetExhausted(BackendError):
    """A signature would wait for the vault budget past its caller's deadline (``retry_after``: the wait)."""


def documented_limit(public_key: object, hsm: bool) -> int:
    """Signatures per 10 s Key Vault allows one vault for this key (learn.microsoft.com service limits)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        size = public_key.key_size
        pair = _RSA_LIMITS.get(size) or _RSA_LIMITS[max((s for s in _RSA_LIMITS if s <= size), default=2048)]
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        pair = _EC_LIMIT
    else:
        pair = _EC_LIMIT
    return pair[0] if hsm else pair[1]


def default_rate(public_key: object, hsm: bool) -> float:
    """Signatures per second: ``SHARE`` of the documented limit."""
    return SHARE * documented_limit(public_key, hsm) / WINDOW_S


def default_jobs(rate: float) -> int:
    """Signing threads that keep ``rate`` busy at up to ~100 ms per vault round trip (4..32)."""
    return max(4, min(32, math.ceil(rate * 0.1)))


class Stats(NamedTuple):
    granted: int
    refused: int
    throttled: int
    waited_s: float


class VaultGovernor:
    """One vault's budget, shared by all threads: ``acquire(cost)`` returns when it is the caller's turn."""

    def __init__(
        self,
        burst_s: float = BURST_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.burst_s = burst_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tat = clock()  # theoretical arrival time: the vault time already promised (full burst at start)
        self._granted = self._refused = self._throttled = 0
        self._waited = 0.0

    def reserve(self, cost: float, deadline: float | None = None) -> float:
        """Promise the caller ``cost`` seconds of vault time; returns how long to wait for it.

        Raises ``BudgetExhausted`` (nothing reserved) when the turn comes after ``deadline``.
        """
        with self._lock:
            now = self._clock()
            turn = max(now, self._tat - self.burst_s)
            wait = turn - now
            if deadline is not None and turn > deadline:
                self._refused += 1
                raise BudgetExhausted(
                    f"Key Vault signing budget: the next turn is {wait:.2f}s away, after the request's deadline",
                    retry_after=max(wait, 0.001),
                )
            self._tat = max(self._tat, now) + cost
            self._granted += 1
            self._waited += wait
            return wait

    def acquire(self, cost: float, deadline: float | None = None) -> float:
        """``reserve`` and sleep until the turn; returns the time waited."""
        wait = self.reserve(cost, deadline)
        if wait > 0:
            self._sleep(wait)
        return wait

    def throttled(self, retry_after: float | None) -> None:
        """The vault answered 429: no burst for anyone, and nothing before its Retry-After."""
        with self._lock:
            self._throttled += 1
            self._tat = max(self._tat, self._clock() + (retry_after or 0.0) + self.burst_s)

    def stats(self) -> Stats:
        with self._lock:
            return Stats(self._granted, self._refused, self._throttled, self._waited)


_registry: dict[str, VaultGovernor] = {}
_registry_lock = threading.Lock()


def governor_for(vault_url: str) -> VaultGovernor:
    """The process-wide governor of one vault (every CA, store object and thread using it shares it)."""
    key = vault_url.strip().rstrip("/").lower()
    with _registry_lock:
        governor = _registry.get(key)
        if governor is None:
            governor = _registry[key] = VaultGovernor()
        return governor


class SignBudget(NamedTuple):
    """One key's view of its vault's governor: each signature costs ``1/rate`` s of vault time."""

    governor: VaultGovernor
    rate: float

    def take(self, deadline: float | None = None) -> None:
        """Wait for this signature's turn; the thread's deadline (``kvpki_cli.deadline``) also applies."""
        caller = deadlines.current()
        if caller is not None:
            deadline = caller if deadline is None else min(deadline, caller)
        self.governor.acquire(1.0 / self.rate, deadline)
