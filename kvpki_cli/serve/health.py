"""``/healthz``: 200 while the inventory answers and every CA's key store is reachable, else 503.

A load balancer polls it, so it must be cheap and must not hang: one probe runs
at a time in its own worker thread (a trivial indexed inventory query, then each
CA's ``KeyStore.reachable()``: key file readable, or the last Key Vault exchange
answered), its result is reused for a second, and a probe that takes longer than
``timeout`` counts as a failure.  The body is generic; the reason goes to the log
once per change.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.serve.workers import CaWorkers

log = logging.getLogger("kvpki.serve")
CACHE_S = 1.0


class Health:
    def __init__(self, pool: CaWorkers, names: list[str], timeout: float = 3.0) -> None:
        self.pool = pool  # one thread of its own: a hung database cannot take the signing workers
        self.names = names
        self.timeout = timeout
        self._inflight: asyncio.Future[str | None] | None = None
        self._last: tuple[float, str | None] | None = None  # (monotonic time, failure reason or None)
        self._logged: str | None = None

    def _probe(self, first: CertificateAuthority) -> str | None:
        """Worker thread: None when healthy, else what failed (for the log)."""
        try:
            first.inventory.ping()
        except Exception as exc:  # any failure is "unhealthy"
            return f"inventory: {type(exc).__name__}: {exc}"
        for name in self.names:
            try:
                ok = self.pool.authority(name).keystore.reachable()
            except Exception as exc:
                return f"CA {name}: {type(exc).__name__}: {exc}"
            if not ok:
                return f"CA {name}: key store unreachable"
        return None

    async def check(self) -> str | None:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < CACHE_S:
            return self._last[1]
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self.pool.run(self.names[0], self._probe))
        try:
            failure = await asyncio.wait_for(asyncio.shield(self._inflight), self.timeout)
        except TimeoutError:
            failure = f"no answer within {self.timeout:g}s (inventory or key store hanging)"
        self._last = (time.monotonic(), failure)
        if failure != self._logged:
            if failure is None:
                log.info("health: ok again")
            else:
                log.warning("health: failing: %r", failure)
            self._logged = failure
        return failure

    async def handler(self, request: web.Request) -> web.Response:
        failure = await self.check()
        if failure is None:
            return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})
        return web.Response(status=503, text="unavailable\n", headers={"Cache-Control": "no-store"})
