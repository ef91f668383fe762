"""An RFC 6960 OCSP responder at ``/ocsp/<ca>`` answering from the inventory.

Status comes straight from the inventory row, so a ``kvpki revoke`` in another
process is visible on the next request.  Answers without a nonce for known
certificates are cached and served from memory while the CA's revocation count
is unchanged (checked per request on the publishing pool, never a signing
worker; a slow check serves the cached answer, see ``fresh.py``).  Responses are signed by the CA key
(its certificate has digitalSignature) or by a configured delegated responder
certificate, which is then included in the response.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp

from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.errors import KvpkiError, UsageError
from kvpki_cli.pki.crl import REASONS
from kvpki_cli.pki.keys import CAPrivateKey, signing_hash
from kvpki_cli.serve.config import OcspSignerConfig
from kvpki_cli.serve.fresh import FreshJob, within
from kvpki_cli.serve.wire import HttpRefusal, media_type, text_response
from kvpki_cli.serve.workers import CaWorkers

OCSP_REQUEST = "application/ocsp-request"
OCSP_RESPONSE = "application/ocsp-response"
MAX_REQUEST_BYTES = 8 * 1024
CACHE_ENTRIES = 10_000
log = logging.getLogger("kvpki.serve")


@dataclass(frozen=True)
class Delegate:
    """A delegated OCSP signing certificate and its private key."""

    certificate: x509.Certificate
    key: CAPrivateKey


def load_delegate(config: OcspSignerConfig, ca_certificate: x509.Certificate) -> Delegate:
    """Load and check a delegated responder: issued by the CA, with EKU id-kp-OCSPSigning."""
    try:
        cert = x509.load_pem_x509_certificate(config.cert.read_bytes())
        key = serialization.load_pem_private_key(config.key.read_bytes(), password=None)
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
    return Delegate(cert, key)


def _key_bits(certificate: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents, which issuerKeyHash hashes."""
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    raise UsageError("unsupported CA key type for OCSP")


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


@dataclass(frozen=True)
class OcspAnswer:
    body: bytes
    cacheable: bool  # no nonce, and the certificate is known (good or revoked)
    revocations: int  # the CA's revocation count, read before the certificate's status


def build_response(
    ca: CertificateAuthority, request_der: bytes, delegate: Delegate | None, validity: timedelta
) -> bytes:
    """Worker thread: a signed OCSPResponse (or an unsuccessful one) in DER."""
    return build_answer(ca, request_der, delegate, validity).body


def build_answer(
    ca: CertificateAuthority, request_der: bytes, delegate: Delegate | None, validity: timedelta
) -> OcspAnswer:
    """Worker thread: the response and whether it may be cached (see ``OcspAnswer``)."""
    revocations = ca.inventory.revocation_count(ca.name)
    try:
        request = ocsp.load_der_ocsp_request(request_der)
        algorithm = request.hash_algorithm
        serial, name_hash, key_hash = request.serial_number, request.issuer_name_hash, request.issuer_key_hash
    except (ValueError, NotImplementedError, UnsupportedAlgorithm, x509.UnsupportedGeneralNameType):
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, revocations)
    issuer = ca.certificate
    if (name_hash, key_hash) != (
        _digest(algorithm, issuer.subject.public_bytes()),
        _digest(algorithm, _key_bits(issuer)),
    ):
        return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED, revocations)
    record = ca.inventory.get(ca.name, format(serial, "x"))
    now = datetime.now(UTC).replace(microsecond=0)
    if record is None:
        status, revoked_at, reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
    elif record.status == "revoked":
        status, revoked_at = ocsp.OCSPCertStatus.REVOKED, record.revoked_at or now
        reason = REASONS[record.reason] if record.reason and record.reason != "unspecified" else None
    else:
        status, revoked_at, reason = ocsp.OCSPCertStatus.GOOD, None, None
    responder = delegate.certificate if delegate else issuer
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(name_hash, key_hash, serial, algorithm, status, now, now + validity, revoked_at, reason)
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
    )
    if delegate:
        builder = builder.certificates([delegate.certificate])
    try:
        nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value
        builder = builder.add_extension(nonce, critical=False)
    except x509.ExtensionNotFound:
        nonce = None
    signer = delegate.key if delegate else ca.keystore.signer()
    body = builder.sign(signer, signing_hash(signer)).public_bytes(serialization.Encoding.DER)
    return OcspAnswer(body, nonce is None and status != ocsp.OCSPCertStatus.UNKNOWN, revocations)


def _unsuccessful(status: ocsp.OCSPResponseStatus, revocations: int) -> OcspAnswer:
    body = ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
    return OcspAnswer(body, False, revocations)


@dataclass(frozen=True)
class _Cached:
    answer: OcspAnswer
    created: float  # time.monotonic()


CacheKey = tuple[str, str, bytes, bytes, int]


def cache_key(ca_name: str, request_der: bytes) -> CacheKey | None:
    """(CA, hash, issuer name hash, issuer key hash, serial): all a nonce-less answer depends on.

    None for requests that cannot be cached (with a nonce) or parsed (the worker answers those).
    """
    try:
        request = ocsp.load_der_ocsp_request(request_der)
        if any(isinstance(ext.value, x509.OCSPNonce) for ext in request.extensions):
            return None
        algorithm = request.hash_algorithm.name
        return (ca_name, algorithm, request.issuer_name_hash, request.issuer_key_hash, request.serial_number)
    except (ValueError, NotImplementedError, UnsupportedAlgorithm, x509.UnsupportedGeneralNameType):
        return None


class OcspCache:
    """Cacheable answers by certificate ID (``cache_key``): a bounded LRU, fresh for half their validity."""

    def __init__(self, validity: timedelta) -> None:
        self.max_age = validity.total_seconds() / 2
        self._entries: OrderedDict[CacheKey, _Cached] = OrderedDict()

    def get(self, key: CacheKey) -> OcspAnswer | None:
        cached = self._entries.get(key)
        if cached is None or time.monotonic() - cached.created > self.max_age:
            return None
        self._entries.move_to_end(key)
        return cached.answer

    def put(self, key: CacheKey, answer: OcspAnswer) -> None:
        self._entries[key] = _Cached(answer, time.monotonic())
        self._entries.move_to_end(key)
        while len(self._entries) > CACHE_ENTRIES:
            self._entries.popitem(last=False)


class OcspResponder:
    """POST ``/ocsp/<ca>`` and GET ``/ocsp/<ca>/<base64 request>`` (RFC 6960 appendix A)."""

    def __init__(
        self, ca_names: set[str], workers: CaWorkers, delegates: dict[str, Delegate], validity: timedelta, retry: int
    ) -> None:
        self.ca_names = ca_names
        self.workers = workers
        self.delegates = delegates
        self.validity = validity
        self.retry_after = retry
        self.cache = OcspCache(validity)
        self._counts: dict[str, FreshJob[int]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/ocsp/{ca}", self.post), web.get("/ocsp/{ca}/{request:.+}", self.get)]

    async def post(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            return text_response(413, "OCSP request too large")
        if media_type(request.headers.get("Content-Type")) != OCSP_REQUEST:
            return text_response(415, f"Content-Type must be {OCSP_REQUEST}")
        return await self._answer(request.match_info["ca"], await request.read())

    async def get(self, request: web.Request) -> web.Response:
        prefix = f"/ocsp/{request.match_info['ca']}/"
        encoded = unquote(request.raw_path.split("?", 1)[0].removeprefix(prefix))
        try:
            der = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return text_response(400, "the OCSP request in the URL is not valid base64")
        return await self._answer(request.match_info["ca"], der)

    async def _answer(self, name: str, der: bytes) -> web.Response:
        if name not in self.ca_names:
            return text_response(404, "unknown CA")
        if len(der) > MAX_REQUEST_BYTES:
            return text_response(413, "OCSP request too large")
        key = cache_key(name, der)
        cached = self.cache.get(key) if key is not None else None
        if cached is not None and await self._still_current(name, cached):
            return web.Response(body=cached.body, headers={"Content-Type": OCSP_RESPONSE})
        try:
            answer = await self.workers.run(
                name, lambda ca: build_answer(ca, der, self.delegates.get(name), self.validity)
            )
        except KvpkiError as error:
            refusal = HttpRefusal.from_error(error, self.retry_after, f"OCSP for CA {name}")
            return text_response(refusal.status, refusal.reason, refusal.headers)
        if answer.cacheable and key is not None:
            self.cache.put(key, answer)
        return web.Response(body=answer.body, headers={"Content-Type": OCSP_RESPONSE})

    async def _still_current(self, name: str, cached: OcspAnswer) -> bool:
        """No revocation since the cached answer was built; a slow or failing check keeps the cache."""
        job = self._counts.get(name)
        if job is None:
            job = self._counts[name] = FreshJob(
                lambda: self.workers.run(name, lambda ca: ca.inventory.revocation_count(ca.name))
            )
        try:
            return await within(job.result()) == cached.revocations
        except (TimeoutError, KvpkiError):
            return True
