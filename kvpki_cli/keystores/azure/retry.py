"""Bounded, jittered exponential backoff under one overall deadline.

azure-core will not retry a 429 without Retry-After on POST, nor a refused or
dropped connection on POST; signing is safe to repeat, so kvpki retries those
itself and gives up with one clear ``BackendError`` line when the deadline passes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from kvpki_cli import observe
from kvpki_cli.errors import BackendError

T = TypeVar("T")


class Retryable(Exception):
    """A transient failure (throttled, 5xx, timeout, connection lost); ``retry_after`` in seconds if given."""

    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status  # the HTTP status, when the vault answered


class RetriesExhausted(BackendError):
    """Every attempt failed transiently until the deadline: the vault may work again later."""


class RetryPolicy(NamedTuple):
    deadline: float = 30.0  # seconds for the whole operation, all attempts included
    base: float = 0.25  # first backoff
    cap: float = 8.0  # longest single backoff

    def run(self, attempt: Callable[[float], T], what: str) -> T:
        """Call ``attempt(timeout)`` until it returns, raises a non-Retryable, or the deadline passes."""
        start = time.monotonic()
        end = start + self.deadline
        tries = 0
        while True:
            tries += 1
            remaining = end - time.monotonic()
            try:
                return attempt(max(0.5, remaining))
            except Retryable as exc:
                backoff = min(self.cap, self.base * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
                delay = exc.retry_after if exc.retry_after is not None else backoff
                remaining = end - time.monotonic()
                if delay >= remaining:
                    elapsed = time.monotonic() - start
                    raise RetriesExhausted(
                        f"{what} failed after {tries} attempt{'s' if tries > 1 else ''} in {elapsed:.1f}s: "
                        f"{exc.reason} (retry deadline {self.deadline:g}s, KVPKI_AZURE_DEADLINE)",
                        retry_after=exc.retry_after,
                    ) from None
                observe.emit(observe.VAULT_RETRY, reason=str(exc.status or "error"))
                time.sleep(delay)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; HTTP dates are rare on Key Vault)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
