"""Publishing ``/crl/<ca>.crl``, ``/crl/<ca>/<k>.crl`` (partition k, RFC 5280 5.2.5) and ``/ca/<ca>.crt``
(the URLs the core puts into certificates).

CRLs are shared through the inventory (``crl_publish.py``): one process signs
each new CRL of a CA and stores it, and every ``serve`` instance on that
inventory publishes those same bytes.  Each instance keeps the CRL in memory and
serves it while the CA's revocation count and the latest stored CRL number are
unchanged (one cheap query per check, shared by concurrent requests) and less
than half its validity has passed; otherwise it takes the stored CRL, signing a
new one only when that is not current either.  CA certificates are served from
memory.  Neither ever waits for a signing worker: inventory checks and re-signing
run on the publishing pool, and a cached CRL is served when its check is slow
(``fresh.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from kvpki_cli.authority import CertificateAuthority, crl_scope
from kvpki_cli.crl_publish import is_current, published_crl
from kvpki_cli.errors import KvpkiError, NotFound, UsageError
from kvpki_cli.inventory.base import CrlState, StoredCrl, crl_key
from kvpki_cli.serve.fresh import FreshJob, within
from kvpki_cli.serve.wire import HttpRefusal, text_response
from kvpki_cli.serve.workers import CaWorkers

log = logging.getLogger("kvpki.serve")
USABLE_FRACTION = 0.9  # a cached CRL is served while its check is slow, up to 90% of its validity

CachedCrl = StoredCrl  # the former name of what the cache holds


class CrlCache:
    """Per-CA (per partition, per key generation) CRLs as last taken from the inventory; one publishing
    thread per CRL at a time goes to the inventory, so a burst of fetches reads (or signs) once.  Cache
    keys are ``_key`` (the CA name, "<ca>/<k>" for partition k, "<ca>#<g>" for key generation g)."""

    def __init__(self, validity: timedelta) -> None:
        self.validity = validity
        self._locks_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._cache: dict[str, StoredCrl] = {}

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def forget(self, key: str) -> None:
        """Drop what is kept for ``key`` (a CRL partition that does not exist)."""
        with self._locks_lock:
            self._locks.pop(key, None)
        self._cache.pop(key, None)

    def usable(self, name: str) -> StoredCrl | None:
        """Event loop: the cached CRL of CA ``name`` if it is still well within its validity."""
        cached = self._cache.get(name)
        if cached is None:
            return None
        lifetime = cached.next_update - cached.this_update
        if datetime.now(UTC) > cached.this_update + lifetime * USABLE_FRACTION:
            return None
        return cached

    def der(self, ca: CertificateAuthority, partition: int | None = None, generation: int = 0) -> bytes:
        """Publishing thread: the current CRL of ``ca`` (of one partition, or of one key generation after
        ``kvpki rollover``) in DER, the same bytes every instance serves."""
        key = _key(ca.name, partition, generation)
        with self._lock(key):
            if generation == 0:
                state = ca.inventory.crl_state(ca.name, partition)
            else:
                head = ca.inventory.latest_crl(key, with_der=False)
                state = CrlState(ca.inventory.revocation_count(ca.name), head.number if head else None)
            cached = self._cache.get(key)
            if (
                cached is not None
                and state.latest == cached.number
                and is_current(cached, state.revocations, datetime.now(UTC))
            ):
                return cached.der
            stored = published_crl(ca, self.validity, partition=partition, generation=generation)
            self._cache[key] = stored
            return stored.der


class Publisher:
    """Serves CRLs and CA certificates for every CA known at start-up.

    ``workers`` is the publishing pool, not the signing one; ``ca_certificates``
    holds the DER certificates already loaded at start-up (others are loaded once).
    """

    def __init__(
        self,
        ca_names: set[str],
        workers: CaWorkers,
        crls: CrlCache,
        retry_after: int,
        ca_certificates: dict[str, bytes] | None = None,
    ) -> None:
        self.ca_names = ca_names
        self.workers = workers
        self.crls = crls
        self.retry_after = retry_after
        self._ca_der = dict(ca_certificates or {})
        self._crl_jobs: dict[str, FreshJob[bytes]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/crl/{name}", self.crl),
            web.get("/crl/{name}/{partition}", self.partition_crl),
            web.get("/ca/{name}", self.ca_certificate),
        ]

    def _ca_name(self, request: web.Request, suffix: str) -> tuple[str, int]:
        """``<ca><suffix>`` (key generation 0) or ``<ca>.<k><suffix>`` (generation k, see ``kvpki rollover``)."""
        stem = request.match_info["name"]
        if not stem.endswith(suffix):
            raise web.HTTPNotFound(text="unknown CA\n")
        name, _, generation = stem.removesuffix(suffix).partition(".")
        if name not in self.ca_names or not (generation == "" or (generation.isdigit() and len(generation) < 6)):
            raise web.HTTPNotFound(text="unknown CA\n")
        return name, int(generation or 0)

    def _crl_job(self, name: str, partition: int | None = None, generation: int = 0) -> FreshJob[bytes]:
        key = _key(name, partition, generation)
        job = self._crl_jobs.get(key)
        if job is None:
            job = self._crl_jobs[key] = FreshJob(
                lambda: self.workers.run(name, lambda ca: self.crls.der(ca, partition, generation))
            )
        return job

    async def crl(self, request: web.Request) -> web.Response:
        name, generation = self._ca_name(request, ".crl")
        return await self._crl(name, None, generation)

    async def partition_crl(self, request: web.Request) -> web.Response:
        """``/crl/<ca>/<k>.crl``: partition k's CRL; 404 for a CA without partitions or an unknown k."""
        name = request.match_info["name"]
        number = request.match_info["partition"].removesuffix(".crl")
        if name not in self.ca_names or not request.match_info["partition"].endswith(".crl"):
            raise web.HTTPNotFound(text="unknown CA\n")
        if not (number.isascii() and number.isdigit()) or len(number) > 9 or (number != "0" and number[0] == "0"):
            raise web.HTTPNotFound(text="unknown CRL partition\n")
        return await self._crl(name, int(number))

    async def _crl(self, name: str, partition: int | None, generation: int = 0) -> web.Response:
        key = _key(name, partition, generation)
        cached = self.crls.usable(key)
        current = self._crl_job(name, partition, generation).result()
        if cached is None:
            # A partition of a CA without partitions (UsageError) or not reached yet (NotFound): 404.
            # The full CRL of a configured CA always exists: failing to make it is the server's state (503).
            # A key generation the CA does not have (NotFound, after 'kvpki rollover'): 404 as well.
            missing: tuple[type[KvpkiError], ...] = () if partition is None else (NotFound, UsageError)
            if generation:
                missing = (NotFound,)
            response = await self._serve(current, "application/pkix-crl", key, missing)
            if response.status == 404 and (partition is not None or generation):  # no state per made-up number
                self._crl_jobs.pop(key, None)
                self.crls.forget(key)
            return response
        try:
            der = await within(current)
        except (TimeoutError, KvpkiError) as exc:
            if isinstance(exc, KvpkiError):
                log.warning("crl ca=%s: serving the cached CRL, re-checking failed: %s", name, exc)
            der = cached.der
        return self._response(der, "application/pkix-crl")

    async def ca_certificate(self, request: web.Request) -> web.Response:
        name, generation = self._ca_name(request, ".crt")
        scope = crl_scope(name, generation)
        der = self._ca_der.get(scope)
        if der is not None:
            return self._response(der, "application/pkix-cert")
        loaded = asyncio.ensure_future(self.workers.run(name, lambda ca: _certificate_der(ca, generation)))
        response = await self._serve(loaded, "application/pkix-cert", name, (NotFound,) if generation else ())
        if loaded.done() and not loaded.exception():
            self._ca_der[scope] = loaded.result()
        return response

    async def _serve(
        self,
        job: Awaitable[bytes],
        content_type: str,
        name: str,
        missing: tuple[type[KvpkiError], ...] = (),
    ) -> web.Response:
        try:
            der = await job
        except missing:  # nothing to publish under this URL (the message may name the inventory: not sent)
            return text_response(404, "not found")
        except KvpkiError as error:
            refusal = HttpRefusal.from_error(error, self.retry_after, f"publishing {content_type} of CA {name}")
            return text_response(refusal.status, refusal.reason, refusal.headers)
        return self._response(der, content_type)

    @staticmethod
    def _response(der: bytes, content_type: str) -> web.Response:
        return web.Response(body=der, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


def _key(name: str, partition: int | None, generation: int) -> str:
    """A partition's CRL (its CA has one key generation: rollover refuses partitioned CAs) or a generation's."""
    return crl_key(name, partition) if partition is not None else crl_scope(name, generation)


def _certificate_der(ca: CertificateAuthority, generation: int = 0) -> bytes:
    """The CA certificate of one key generation: what the caIssuers URL of its certificates names."""
    return ca.generation(generation).chain[0].public_bytes(Encoding.DER)
