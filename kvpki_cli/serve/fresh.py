"""Cached answers that stay current without waiting behind issuance.

CRLs and OCSP answers are cached in memory and served on the event loop.  Each
request still checks that the cache is current (the inventory's revocation count
changes when any process revokes), but through ``FreshJob``: checks run on the
publishing pool (never the signing workers), concurrent requests share one check,
and a request whose check does not finish within ``FRESHNESS_WAIT_S`` (inventory
locked or slow) gets the cached answer, which is still within its validity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

FRESHNESS_WAIT_S = 0.5


class FreshJob(Generic[T]):
    """Runs ``job`` so that every caller gets a result computed after it asked.

    At most one run is in progress and one queued: callers arriving while a run is
    in progress share the queued run, so a burst of requests costs two runs, and a
    revocation committed before a request is always seen by that request's result.
    """

    def __init__(self, job: Callable[[], Awaitable[T]]) -> None:
        self._job = job
        self._running: asyncio.Future[T] | None = None
        self._queued: asyncio.Future[T] | None = None

    def result(self) -> asyncio.Future[T]:
        if self._queued is None:
            queued: asyncio.Future[T] = asyncio.ensure_future(self._after(self._running))
            queued.add_done_callback(_consume)
            self._queued = queued
        return self._queued

    async def _after(self, previous: asyncio.Future[T] | None) -> T:
        if previous is not None:
            await asyncio.wait([previous])
        self._queued = None  # from now on, new callers must wait for a later run
        self._running = asyncio.current_task()
        try:
            return await self._job()
        finally:
            if self._running is asyncio.current_task():
                self._running = None


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark the exception retrieved: callers that gave up waiting never look at it."""
    if not future.cancelled():
        future.exception()


async def within(future: asyncio.Future[T], seconds: float = FRESHNESS_WAIT_S) -> T:
    """The job's result if it arrives within ``seconds``; TimeoutError otherwise (the job keeps running)."""
    return await asyncio.wait_for(asyncio.shield(future), seconds)
