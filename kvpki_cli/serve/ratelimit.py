"""Enrollment rate limits per identity and per EST label, shared through the inventory.

A stolen bootstrap password or certificate must not mint thousands of
certificates.  Each label may set ``rate_limit = "20/1h"`` (per identity: a
Basic user, a client certificate's subject) and ``label_rate_limit`` (all
identities together).  Counting uses fixed windows (``floor(now / window)``)
in an inventory table with an atomic increment, so every instance sharing the
inventory (PostgreSQL, or SQLite on one machine) sees the same counts.

Every authenticated attempt counts, before the CSR is parsed or anything is
signed.  Once a window's limit is reached the instance remembers it and
refuses further attempts of that window without touching the database; the
first refusal per key and window is logged, the others are not.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvpki_cli.durations import parse_duration
from kvpki_cli.errors import UsageError
from kvpki_cli.inventory.base import Inventory
from kvpki_cli.serve.logsafe import server_log
from kvpki_cli.serve.wire import HttpRefusal
from kvpki_cli.textsafe import requester_text

log = server_log()
_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\S+)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` enrollments per ``window`` seconds."""

    count: int
    window: int

    def __str__(self) -> str:
        return f"{self.count}/{self.window}s"


def parse_rate(text: object, what: str) -> Rate:
    """``"20/1h"`` -> Rate(20, 3600); the window is a duration as everywhere in kvpki."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None or not int(match.group(1)):
        raise UsageError(f'serve config: {what} must look like "20/1h" (a positive count / a duration)')
    window = int(parse_duration(match.group(2), what=what).total_seconds())
    if window > 366 * 86400:
        raise UsageError(f"serve config: {what} window must be at most a year")
    return Rate(int(match.group(1)), window)


class RateLimited(HttpRefusal):
    """429 with Retry-After; logged once per key and window by the limiter, not per request."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(429, "enrollment rate limit reached; retry later", {"Retry-After": str(retry_after)})


def identity_key(label: str, requester: str) -> str:
    """A bounded, stable key: requesters are certificate subjects of any length."""
    return f"i:{label}:{hashlib.sha256(requester.encode()).hexdigest()[:32]}"


class RateLimiter:
    """Checks and counts one enrollment attempt against a label's limits (called in a worker thread)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._full: dict[str, int] = {}  # key -> end of the window known to be exhausted
        self._lock = threading.Lock()
        self.on_refusal: Callable[[str, str], None] | None = None  # (label, scope) for metrics

    def check(
        self, inventory: Inventory, label: str, requester: str, per_identity: Rate | None, per_label: Rate | None
    ) -> None:
        """Raise RateLimited when this attempt is over a limit; otherwise count it."""
        now = self.clock()
        for scope, key, rate in (
            ("identity", identity_key(label, requester), per_identity),
            ("label", f"l:{label}", per_label),
        ):
            if rate is None:
                continue
            start = int(now // rate.window) * rate.window
            end = start + rate.window
            with self._lock:
                known_full = self._full.get(key, 0) > now
            if not known_full and inventory.rate_count(key, start) <= rate.count:
                continue
            with self._lock:
                first = self._full.get(key) != end
                self._full[key] = end
                if len(self._full) > 100_000:  # forget expired windows; bounded memory under attack
                    self._full = {k: v for k, v in self._full.items() if v > now}
            if first:
                log.warning(
                    "rate limit %s reached: label=%s %s=%s; refusing its enrollments for %ds (logged once per window)",
                    rate, label, scope, requester_text(requester) if scope == "identity" else label,
                    math.ceil(end - now),
                )  # fmt: skip
            if self.on_refusal is not None:
                self.on_refusal(label, scope)
            raise RateLimited(max(1, math.ceil(end - now)))
