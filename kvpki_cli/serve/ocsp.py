"""The OCSP responder at ``/ocsp/<ca>`` (POST) and ``/ocsp/<ca>/<base64 request>`` (GET, RFC 6960 A.1).

Responses are built in ``pki/ocsp.py``; this module decides when to sign.  A
response is signed once per (certificate, status) and served from memory (POST
and GET share the cache) until half of ``ocsp_validity`` has passed or the
certificate's status changes.  Status changes are noticed through the CA's
revocation count, checked per request on the publishing pool (a slow check
serves the cached answer, see ``fresh.py``); when the count moves, each cached
certificate is looked up again and re-signed only if its own status changed.

Signer: the ``[ocsp.<ca>]`` certificate of the serve config if set, else the
responder made by ``kvpki init-ocsp-responder`` (renewed here before it
expires), else the CA key.  With a delegated responder no OCSP response costs a
CA-key (Key Vault) signature.  GET answers carry RFC 5019 caching headers so a
CDN can answer most traffic.  Nonces: echoed (``ocsp_nonces = "echo"``, a fresh
signature per such request) or ignored (``"ignore"``, RFC 5019 2.1: the cached
response, without a nonce).  Echoes signed by the CA key itself are capped per CA
(``noncebudget.py``); beyond the cap the nonce is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import unquote

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp

from kvpki_cli.authority import CertificateAuthority, Generation
from kvpki_cli.errors import KvpkiError, UsageError
from kvpki_cli.fileutil import read_regular_file
from kvpki_cli.pki import ocsp as pki_ocsp
from kvpki_cli.pki.ocsp import CertStatus, OcspQuery, Responder, parse_request
from kvpki_cli.pki.ocsp import _key_bits as _key_bits  # the former home of these helpers
from kvpki_cli.serve.config import OcspSignerConfig
from kvpki_cli.serve.fresh import FreshJob, within
from kvpki_cli.serve.noncebudget import NonceBudget
from kvpki_cli.serve.ratelimit import Rate
from kvpki_cli.serve.wire import HttpRefusal, media_type, text_response
from kvpki_cli.serve.workers import CaWorkers

OCSP_REQUEST = "application/ocsp-request"
OCSP_RESPONSE = "application/ocsp-response"
MAX_REQUEST_BYTES = 8 * 1024
MAX_SIGNER_FILE = 1024 * 1024
CACHE_ENTRIES = 100_000
RESPONDER_CHECK_S = 60.0  # how often serve looks for a new responder and renews an ageing one
NONCE_MODES = ("echo", "ignore")
log = logging.getLogger("kvpki.serve")

MALFORMED = pki_ocsp.unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED = pki_ocsp.unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)


def load_delegate(config: OcspSignerConfig, ca_certificate: x509.Certificate) -> Responder:
    """Load and check a configured delegated responder: issued by the CA, with EKU id-kp-OCSPSigning."""
    try:
        cert = x509.load_pem_x509_certificate(read_regular_file(config.cert, MAX_SIGNER_FILE))  # no FIFO hang
        key = serialization.load_pem_private_key(read_regular_file(config.key, MAX_SIGNER_FILE), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot load OCSP signer {config.cert} / {config.key}: {exc}") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise UsageError(f"OCSP signer key {config.key} is neither RSA nor EC")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        cert.verify_directly_issued_by(ca_certificate)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        raise UsageError(f"OCSP signer {config.cert} must be issued by the CA and have EKU OCSPSigning") from None
    if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        raise UsageError(f"OCSP signer {config.cert} lacks EKU id-kp-OCSPSigning")
    return Responder(cert, key, delegated=True)


Delegate = Responder  # the former name


def certificate_status(
    ca: CertificateAuthority, serial: int, now: datetime, generation: int | None = None
) -> CertStatus:
    """What the inventory says of ``serial``; unknown when ``generation`` is given and another key signed it."""
    record = ca.inventory.get(ca.name, format(serial, "x"))
    if record is None or (generation is not None and record.issuer_generation != generation):
        return CertStatus(ocsp.OCSPCertStatus.UNKNOWN)
    if record.status == "revoked":
        return CertStatus(ocsp.OCSPCertStatus.REVOKED, record.revoked_at or now, record.reason)
    return CertStatus(ocsp.OCSPCertStatus.GOOD)


@dataclass(frozen=True)
class OcspAnswer:
    """One signed response and what the cache needs to know about it."""

    body: bytes
    cacheable: bool  # successful, for a certificate the inventory knows (good or revoked)
    revocations: int  # the CA's revocation count, read before the certificate's status
    status: CertStatus | None = None
    this_update: datetime | None = None
    next_update: datetime | None = None
    delegated: bool = False  # signed by a responder key, not the CA key


def build_answer(
    ca: CertificateAuthority,
    request_der: bytes,
    responder: Responder | None,
    validity: timedelta,
    *,
    echo_nonce: bool = True,
    known: OcspAnswer | None = None,
) -> OcspAnswer:
    """Worker thread: the answer to one request (``known``: a cached answer to reuse if the status is the same)."""
    revocations = ca.inventory.revocation_count(ca.name)
    query = parse_request(request_der)
    if query is None:
        return OcspAnswer(MALFORMED, False, revocations)
    generation = _issuing_generation(ca, query)
    if generation is None:
        return OcspAnswer(UNAUTHORIZED, False, revocations)
    now = datetime.now(UTC).replace(microsecond=0)
    status = certificate_status(ca, query.serial, now, generation.number)
    if known is not None and known.status == status:
        return replace(known, revocations=revocations)  # same status: no new signature
    issuer = generation.chain[0]
    if responder is None or not _signed_by_key(responder.certificate, issuer):
        # No responder of this generation's key (an earlier generation after 'kvpki rollover', or a
        # responder not yet renewed under the new key): that generation's CA key signs.
        responder = Responder(issuer, ca.keystore.signer_for(generation.number), delegated=False)
    signer = responder
    next_update = now + validity
    if signer.delegated:
        next_update = min(next_update, signer.certificate.not_valid_after_utc)
    body = pki_ocsp.build_response(query, status, signer, now, next_update, echo_nonce=echo_nonce)
    cacheable = status.status != ocsp.OCSPCertStatus.UNKNOWN and not (echo_nonce and query.nonce)
    return OcspAnswer(body, cacheable, revocations, status, now, next_update, signer.delegated)


def _issuing_generation(ca: CertificateAuthority, query: OcspQuery) -> Generation | None:
    """The CA key generation the request's issuer hashes name (current first), or None."""
    current = ca.current()
    if pki_ocsp.issued_by(query, current.chain[0]):
        return current
    return next((g for g in ca.generations()[1:] if pki_ocsp.issued_by(query, g.chain[0])), None)


def _signed_by_key(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``certificate``'s authority key identifier is ``issuer``'s subject key identifier."""
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return certificate.issuer == issuer.subject
    return aki.key_identifier == ski.digest


def build_response(
    ca: CertificateAuthority, request_der: bytes, delegate: Responder | None, validity: timedelta
) -> bytes:
    """Worker thread: a signed OCSPResponse (or an unsuccessful one) in DER."""
    return build_answer(ca, request_der, delegate, validity).body


CacheKey = tuple[str, str, bytes, bytes, int]


def cache_key(ca_name: str, query: OcspQuery | bytes) -> CacheKey | None:
    """(CA, hash, issuer name hash, issuer key hash, serial): all a nonce-less answer depends on.

    Given the DER request, None when it cannot be parsed or carries a nonce.
    """
    if isinstance(query, bytes):
        parsed = parse_request(query)
        if parsed is None or parsed.nonce is not None:
            return None
        query = parsed
    return (ca_name, *query.cert_id)


@dataclass
class Cached:
    """A cached answer with its HTTP caching headers (RFC 5019 6.2), computed once."""

    answer: OcspAnswer
    refresh_at: float  # time.monotonic() after which it is re-signed (half its validity)
    etag: str
    last_modified: str
    expires: str

    @classmethod
    def of(cls, answer: OcspAnswer, max_age: float) -> Cached:
        this_update, next_update = answer.this_update, answer.next_update
        lifetime = (next_update - this_update).total_seconds() if this_update and next_update else 2 * max_age
        return cls(
            answer,
            time.monotonic() + min(max_age, lifetime / 2),
            '"' + hashlib.sha1(answer.body, usedforsecurity=False).hexdigest() + '"',
            format_datetime(this_update, usegmt=True) if this_update else "",
            format_datetime(next_update, usegmt=True) if next_update else "",
        )

    def headers(self) -> dict[str, str]:
        max_age = max(0, int(self.refresh_at - time.monotonic()))
        headers = {
            "Content-Type": OCSP_RESPONSE,
            "Cache-Control": f"max-age={max_age}, public, no-transform, must-revalidate",
            "ETag": self.etag,
        }
        if self.last_modified:
            headers.update({"Last-Modified": self.last_modified, "Expires": self.expires})
        return headers


class OcspCache:
    """Cacheable answers by certificate ID: a bounded LRU, each fresh for half its validity."""

    def __init__(self, validity: timedelta, entries: int = CACHE_ENTRIES) -> None:
        self.max_age = validity.total_seconds() / 2
        self.entries = entries
        self._entries: OrderedDict[CacheKey, Cached] = OrderedDict()

    def get(self, key: CacheKey) -> Cached | None:
        cached = self._entries.get(key)
        if cached is None or time.monotonic() >= cached.refresh_at:
            return None
        self._entries.move_to_end(key)
        return cached

    def put(self, key: CacheKey, answer: OcspAnswer) -> Cached:
        cached = Cached.of(answer, self.max_age)
        self._entries[key] = cached
        self._entries.move_to_end(key)
        while len(self._entries) > self.entries:
            self._entries.popitem(last=False)
        return cached

    def confirm(self, key: CacheKey, cached: Cached, revocations: int) -> None:
        """The status was re-read after a revocation elsewhere and is unchanged: keep the signature."""
        cached.answer = replace(cached.answer, revocations=revocations)


class Responders:
    """The signer per CA: configured delegate, else the stored responder (kept renewed), else the CA key."""

    def __init__(self, configured: dict[str, Responder]) -> None:
        self.configured = configured
        self.current: dict[str, Responder | None] = dict(configured)

    def get(self, name: str) -> Responder | None:
        return self.current.get(name)

    def refresh(self, ca: CertificateAuthority) -> None:
        """Publishing worker: pick up a new responder, renew an ageing one (one CA signature)."""
        from kvpki_cli.ocsp_responder import refresh

        if ca.name in self.configured:
            return
        responder = refresh(ca)
        previous = self.current.get(ca.name)
        if responder is not None and (previous is None or previous.certificate != responder.certificate):
            certificate = responder.certificate
            log.info("OCSP for CA %s signed by responder %x (valid until %s)", ca.name,
                     certificate.serial_number, certificate.not_valid_after_utc.isoformat())  # fmt: skip
        self.current[ca.name] = responder


class OcspResponder:
    """POST ``/ocsp/<ca>`` and GET ``/ocsp/<ca>/<base64 request>`` (RFC 6960 appendix A)."""

    def __init__(
        self,
        ca_names: set[str],
        workers: CaWorkers,
        delegates: dict[str, Responder],
        validity: timedelta,
        retry: int,
        nonces: str = "echo",
        responders: Responders | None = None,
        nonce_budget: NonceBudget | None = None,
    ) -> None:
        self.ca_names = ca_names
        self.workers = workers
        self.responders = responders or Responders(delegates)
        self.validity = validity
        self.retry_after = retry
        self.echo_nonce = nonces == "echo"
        self.cache = OcspCache(validity)
        self.nonce_budget = nonce_budget or NonceBudget(Rate(5, 1), 20)
        # (CA, hash, issuer name hash, issuer key hash) -> (responder, whether it signed that issuer's answers)
        self._signers: dict[tuple[str, str, bytes, bytes], tuple[Responder | None, bool]] = {}
        self._counts: dict[str, FreshJob[int]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/ocsp/{ca}", self.post), web.get("/ocsp/{ca}/{request:.+}", self.get)]

    async def maintain(self, interval: float = RESPONDER_CHECK_S) -> None:
        """Background task: keep every stored responder current (new ones picked up, ageing ones renewed)."""
        while True:
            await asyncio.sleep(interval)
            for name in sorted(self.ca_names):
                try:
                    await self.workers.run(name, self.responders.refresh)
                except KvpkiError as error:
                    log.error("OCSP responder check for CA %s failed: %s", name, error)

    async def post(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            return text_response(413, "OCSP request too large")
        if media_type(request.headers.get("Content-Type")) != OCSP_REQUEST:
            return text_response(415, f"Content-Type must be {OCSP_REQUEST}")
        return await self._answer(request.match_info["ca"], await request.read(), None)

    async def get(self, request: web.Request) -> web.Response:
        """RFC 6960 A.1: the URL-encoded base64 (standard or URL-safe, padding optional) of the DER request."""
        # the raw path's fourth segment on: the CA name may itself be percent-encoded (%69ssuing)
        raw = request.raw_path.split("?", 1)[0].split("/", 3)
        encoded = unquote(raw[3] if len(raw) == 4 else "")
        if len(encoded) > MAX_REQUEST_BYTES * 2:
            return text_response(413, "OCSP request too large")
        try:
            encoded = encoded.replace("-", "+").replace("_", "/")
            der = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            return text_response(400, "the OCSP request in the URL is not valid base64")
        return await self._answer(request.match_info["ca"], der, request)

    async def _answer(self, name: str, der: bytes, get: web.Request | None = None) -> web.Response:
        if name not in self.ca_names:
            return text_response(404, "unknown CA")
        if len(der) > MAX_REQUEST_BYTES:
            return text_response(413, "OCSP request too large")
        query = parse_request(der)
        if query is None:
            return web.Response(body=MALFORMED, headers={"Content-Type": OCSP_RESPONSE})
        key = (name, *query.cert_id)
        issuer = (name, *query.cert_id[:3])
        responder = self.responders.get(name)
        echo = self.echo_nonce and query.nonce is not None
        if echo and not self._delegated(issuer, responder) and not self.nonce_budget.take(name):
            echo = False  # the CA key would sign: beyond its nonce budget the nonce is ignored (RFC 5019 2.1)
        cached = None if echo else self.cache.get(key)
        if cached is not None:
            current = await self._current_count(name)
            if current is None or current == cached.answer.revocations:
                return self._cached_response(cached, get)
        known = cached.answer if cached is not None else None
        job: Callable[[CertificateAuthority], OcspAnswer] = lambda ca: build_answer(  # noqa: E731
            ca, der, responder, self.validity, echo_nonce=echo, known=known
        )
        try:
            answer = await self.workers.run(name, job)
        except KvpkiError as error:
            refusal = HttpRefusal.from_error(error, self.retry_after, f"OCSP for CA {name}")
            return text_response(refusal.status, refusal.reason, refusal.headers)
        if answer.status is not None:  # a signed answer: now known who signs for this issuer
            self._signers[issuer] = (responder, answer.delegated)
        if cached is not None and answer.body is cached.answer.body:
            self.cache.confirm(key, cached, answer.revocations)
            return self._cached_response(cached, get)
        if answer.cacheable:
            return self._cached_response(self.cache.put(key, answer), get)
        return web.Response(body=answer.body, headers={"Content-Type": OCSP_RESPONSE, "Cache-Control": "no-cache"})

    def _delegated(self, issuer: tuple[str, str, bytes, bytes], responder: Responder | None) -> bool:
        """Whether a delegated responder (a local key) is known to sign ``issuer``'s answers.

        Unknown (no answer yet, or the responder changed since) counts as the CA key: an earlier
        key generation's certificates are answered by that generation's CA key even with a responder.
        """
        if responder is None:
            return False
        learned = self._signers.get(issuer)
        return learned is not None and learned[0] is responder and learned[1]

    @staticmethod
    def _cached_response(cached: Cached, get: web.Request | None) -> web.Response:
        if get is None:
            return web.Response(body=cached.answer.body, headers={"Content-Type": OCSP_RESPONSE})
        headers = cached.headers()
        if get.headers.get("If-None-Match") == cached.etag:
            del headers["Content-Type"]
            return web.Response(status=304, headers=headers)
        return web.Response(body=cached.answer.body, headers=headers)

    async def _current_count(self, name: str) -> int | None:
        """The CA's revocation count read after this request arrived; None when the check is slow or fails."""
        job = self._counts.get(name)
        if job is None:
            job = self._counts[name] = FreshJob(
                lambda: self.workers.run(name, lambda ca: ca.inventory.revocation_count(ca.name))
            )
        try:
            return await within(job.result())
        except (TimeoutError, KvpkiError):
            return None
