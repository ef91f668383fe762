"""Publishing ``/crl/<ca>.crl`` and ``/ca/<ca>.crt`` (the URLs the core puts into certificates).

A CRL is signed once and served from memory until the inventory's revocation
count changes (a ``kvpki revoke`` in another process) or half its validity has
passed, so relying parties always fetch a current, unexpired CRL cheaply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.errors import KvpkiError
from kvpki_cli.serve.wire import HttpRefusal, text_response
from kvpki_cli.serve.workers import CaWorkers


@dataclass(frozen=True)
class CachedCrl:
    revocations: int
    created: float
    der: bytes


class CrlCache:
    """Per-CA signed CRLs; regeneration is serialised so a burst of fetches signs once."""

    def __init__(self, validity: timedelta) -> None:
        self.validity = validity
        self._lock = threading.Lock()
        self._cache: dict[str, CachedCrl] = {}

    def der(self, ca: CertificateAuthority) -> bytes:
        """Worker thread: the current CRL of ``ca`` in DER."""
        with self._lock:
            count = ca.inventory.revocation_count(ca.name)
            cached = self._cache.get(ca.name)
            fresh = cached is not None and time.monotonic() - cached.created < self.validity.total_seconds() / 2
            if cached is not None and fresh and cached.revocations == count:
                return cached.der
            der = ca.crl(self.validity).public_bytes(Encoding.DER)
            self._cache[ca.name] = CachedCrl(count, time.monotonic(), der)
            return der


class Publisher:
    """Serves CRLs and CA certificates for every CA known at start-up."""

    def __init__(self, ca_names: set[str], workers: CaWorkers, crls: CrlCache, retry_after: int) -> None:
        self.ca_names = ca_names
        self.workers = workers
        self.crls = crls
        self.retry_after = retry_after

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/crl/{name}", self.crl), web.get("/ca/{name}", self.ca_certificate)]

    def _ca_name(self, request: web.Request, suffix: str) -> str:
        name = request.match_info["name"]
        if not name.endswith(suffix) or name.removesuffix(suffix) not in self.ca_names:
            raise web.HTTPNotFound(text="unknown CA\n")
        return name.removesuffix(suffix)

    async def crl(self, request: web.Request) -> web.Response:
        return await self._serve(self._ca_name(request, ".crl"), self.crls.der, "application/pkix-crl")

    async def ca_certificate(self, request: web.Request) -> web.Response:
        name = self._ca_name(request, ".crt")
        return await self._serve(name, lambda ca: ca.certificate.public_bytes(Encoding.DER), "application/pkix-cert")

    async def _serve(self, name: str, job: Callable[[CertificateAuthority], bytes], content_type: str) -> web.Response:
        try:
            der = await self.workers.run(name, job)
        except KvpkiError as error:
            refusal = HttpRefusal.from_error(error, self.retry_after, f"publishing {content_type} of CA {name}")
            return text_response(refusal.status, refusal.reason, refusal.headers)
        return web.Response(body=der, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
