"""The caller's deadline for the work running on this thread (``time.monotonic()`` seconds, or None).

Set by whoever knows how long an answer is still useful (``kvpki serve`` sets it per
request when a job enters its worker pool); read by what may queue on the way, such
as the Key Vault rate governor, so a wait that cannot finish in time fails at once.
Thread-local, so each worker thread carries its own request's deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()


def current() -> float | None:
    """The deadline in force on this thread (monotonic), or None when nobody set one."""
    value: float | None = getattr(_local, "at", None)
    return value


@contextmanager
def until(at: float | None) -> Iterator[None]:
    """Run the block with deadline ``at`` (monotonic; None: no deadline); the outer one comes back after."""
    previous = current()
    _local.at = previous if at is None else at if previous is None else min(at, previous)
    try:
        yield
    finally:
        _local.at = previous
