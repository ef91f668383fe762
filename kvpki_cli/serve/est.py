"""EST (RFC 7030) endpoints: cacerts, simpleenroll, simplereenroll, csrattrs, per label.

Checks run cheapest first (label, size, content type, credentials) so a hostile
request costs little and never reaches the key; the certificate is returned
only after the core committed its inventory row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvpki_cli.authority import CertificateAuthority, SigningRequest, check_renewal_time, recorded, utcnow
from kvpki_cli.errors import InvalidInput, KvpkiError, NotFound, PolicyViolation
from kvpki_cli.inventory.base import CertificateRecord
from kvpki_cli.pki.csr import decode_csr_bytes, parse_csr
from kvpki_cli.pki.policy import certificate_name_constraints, certificate_sans, requested_sans, subject_cn
from kvpki_cli.serve.auth import Authenticator, Identity, currently_valid, describe_subject, directly_issued
from kvpki_cli.serve.config import DEFAULT_LABEL, IDENTITY_CN_PLACEHOLDER, LabelConfig, ServeConfig
from kvpki_cli.serve.logsafe import server_log
from kvpki_cli.serve.ratelimit import RateLimited, RateLimiter
from kvpki_cli.serve.wire import PKCS10, HttpRefusal, certs_only_body, media_type, pkcs7_response, text_response
from kvpki_cli.serve.workers import CaWorkers
from kvpki_cli.textsafe import requester_text

if TYPE_CHECKING:
    from kvpki_cli.serve.metrics import ServeMetrics

log = server_log()  # every line escaped: subjects, user names and paths are attacker controlled


@dataclass(frozen=True)
class EstLabel:
    config: LabelConfig
    cacerts_body: bytes  # precomputed: the issuing chain, never a leaf


def good_record(ca: CertificateAuthority, cert: x509.Certificate, what: str) -> CertificateRecord:
    """The core's one "issued by this CA, same DER, not revoked" check; a failed check is a 403.

    Backend failures (inventory, key store) keep their generic 5xx answer.
    """
    try:
        return ca.issued_record(cert, what)
    except (InvalidInput, NotFound, PolicyViolation) as error:
        raise HttpRefusal(403, str(error)) from None
    except KvpkiError as error:
        raise HttpRefusal.from_error(error, 1, f"checking {what}") from None


def check_renewal(
    ca: CertificateAuthority,
    old: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    profile: str,
    window: timedelta | None = None,
) -> None:
    """Renewal keeps subject, SANs and profile, and the old certificate must be ours, unrevoked, and
    valid now or expired by at most the label's ``renew_after_expiry`` ``window``."""
    record = good_record(ca, old, "the client certificate")
    try:
        check_renewal_time(old, utcnow(), window)
    except PolicyViolation as refusal:
        raise HttpRefusal(403, str(refusal)) from None
    if record.profile != profile:
        raise HttpRefusal(403, f"a {record.profile} certificate cannot renew into profile {profile!r}")
    if csr.subject != old.subject:
        raise HttpRefusal(403, "re-enrollment must keep the subject of the certificate being renewed")
    if set(requested_sans(csr)) != set(certificate_sans(old)):
        raise HttpRefusal(403, "re-enrollment must keep the subjectAltNames of the certificate being renewed")


def _is_client_auth_end_entity(cert: x509.Certificate) -> bool:
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False  # no EKU means "any purpose": an identity must say clientAuth explicitly
    return ExtendedKeyUsageOID.CLIENT_AUTH in usages


def renews_own_profile(ca: CertificateAuthority, cert: x509.Certificate, profile: str) -> bool:
    """Whether ``cert`` is this CA's certificate of ``profile`` (then it renews, not acts as authority)."""
    record = recorded(ca.inventory, ca.name, cert)
    return record is not None and record.profile == profile


def check_identity(
    identity_ca: CertificateAuthority, cert: x509.Certificate, csr: x509.CertificateSigningRequest, label: LabelConfig
) -> None:
    """An identity certificate may enroll only names tied to it, and only while it is good.

    Good: valid now, an end entity with EKU clientAuth, signed by ``identity_ca``, present and
    unrevoked in that CA's inventory, of an allowed profile.  Tied: the CSR has one CN, equal to
    one of the label's ``identity_cn`` templates with ``{cn}`` replaced by the identity's CN,
    and any other subject attributes and subjectAltNames are ones the identity itself carries.
    """
    if not currently_valid(cert):
        raise HttpRefusal(403, "the identity certificate is not currently valid")
    if not _is_client_auth_end_entity(cert):
        raise HttpRefusal(403, "the identity certificate must be an end-entity certificate with EKU clientAuth")
    if not any(directly_issued(cert, g.chain[0]) for g in identity_ca.generations()):  # any key generation
        raise HttpRefusal(403, f"the identity certificate was not issued by CA {identity_ca.name!r}")
    record = good_record(identity_ca, cert, "the identity certificate")
    if label.identity_profiles and record.profile not in label.identity_profiles:
        raise HttpRefusal(403, f"a {record.profile} certificate is not an enrollment identity on this label")
    identity_cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    requested_cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(identity_cns) != 1 or len(requested_cns) != 1:
        raise HttpRefusal(403, "identity enrollment needs exactly one CN in the identity certificate and the CSR")
    allowed = {t.replace(IDENTITY_CN_PLACEHOLDER, str(identity_cns[0].value), 1) for t in label.identity_cn}
    if requested_cns[0].value not in allowed:
        raise HttpRefusal(403, "the CSR's CN is not tied to the identity certificate's CN")
    identity_attributes = {(a.oid, a.value) for a in cert.subject if a.oid != NameOID.COMMON_NAME}
    if any((a.oid, a.value) not in identity_attributes for a in csr.subject if a.oid != NameOID.COMMON_NAME):
        raise HttpRefusal(403, "the CSR's subject has attributes the identity certificate does not have")
    if not set(requested_sans(csr)) <= set(certificate_sans(cert)):
        raise HttpRefusal(403, "the CSR asks for subjectAltNames the identity certificate does not have")


class EstService:
    """Holds the per-label state and serves the EST routes."""

    def __init__(
        self,
        config: ServeConfig,
        labels: dict[str, EstLabel],
        auth: Authenticator,
        workers: CaWorkers,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.config = config
        self.labels = labels
        self.auth = auth
        self.workers = workers
        self.retry_after = config.retry_after
        self.metrics = metrics
        self.limiter = RateLimiter()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/.well-known/est/{op}", self.dispatch),
            web.post("/.well-known/est/{op}", self.dispatch),
            web.get("/.well-known/est/{label}/{op}", self.dispatch),
            web.post("/.well-known/est/{label}/{op}", self.dispatch),
        ]

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        op = request.match_info["op"]
        label = self.labels.get(request.match_info.get("label", DEFAULT_LABEL))
        try:
            if label is None:
                raise HttpRefusal(404, "unknown EST label")
            if op == "cacerts" and request.method == "GET":
                return pkcs7_response(label.cacerts_body)
            if op == "csrattrs" and request.method == "GET":
                return web.Response(status=204)
            if op in ("simpleenroll", "simplereenroll") and request.method == "POST":
                return await self.enroll(request, label, reenroll=op == "simplereenroll")
            if op in ("cacerts", "csrattrs", "simpleenroll", "simplereenroll"):
                raise HttpRefusal(405, f"method {request.method} is not allowed for {op}", {"Allow": "GET, POST"})
            raise HttpRefusal(404, f"unknown EST operation {op!r}")
        except (HttpRefusal, KvpkiError) as caught:  # every expected failure has its status; only a bug is a 500
            refusal = caught if isinstance(caught, HttpRefusal) else HttpRefusal.from_error(caught, self.retry_after)
            name = label.config.name if label else request.match_info.get("label", "?")
            if label is not None and self.metrics is not None and op in ("simpleenroll", "simplereenroll"):
                self.metrics.enrollment(name, str(refusal.status))
            if isinstance(refusal, RateLimited):  # the limiter logs once per window, not per request
                return text_response(refusal.status, refusal.reason, refusal.headers)
            fields = {"event": "refused", "status": refusal.status, "op": op, "label": name, "peer": request.remote}
            log.info(
                "refused %s %s label=%s peer=%s: %s", refusal.status, op, name, request.remote, refusal.reason,
                extra={"fields": fields},
            )  # fmt: skip
            return text_response(refusal.status, refusal.reason, refusal.headers)
        except web.HTTPException:
            raise
        except Exception:  # a bug: the details (escaped) go to the log, the client learns nothing
            log.exception("internal error in %s %s from %s", request.method, request.path, request.remote)
            return text_response(500, "internal error")

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise HttpRefusal(413, f"request body is larger than {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpRefusal(413, f"request body is larger than {limit} bytes") from None

    async def enroll(self, request: web.Request, label: EstLabel, *, reenroll: bool) -> web.Response:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise HttpRefusal(413, f"request body is larger than {limit} bytes")
        if media_type(request.headers.get("Content-Type")) != PKCS10:
            raise HttpRefusal(415, f"Content-Type must be {PKCS10}")
        identity = await self.auth.identify(request, label.config, reenroll)
        body = await self._read_body(request)
        try:
            certificate = await self.workers.run(label.config.ca, lambda ca: self._issue(ca, body, label, identity))
        except HttpRefusal as refusal:
            refusal.reason = f"{refusal.reason} (requester {requester_text(identity.requester)})"
            raise
        log.info(
            "issued %s label=%s ca=%s serial=%x subject=%s requester=%s",
            "simplereenroll" if reenroll else "simpleenroll",
            label.config.name,
            label.config.ca,
            certificate.serial_number,
            describe_subject(certificate),
            requester_text(identity.requester),
            extra={"fields": {
                "event": "issued", "label": label.config.name, "ca": label.config.ca,
                "serial": f"{certificate.serial_number:x}", "subject": describe_subject(certificate),
                "requester": requester_text(identity.requester), "peer": request.remote,
            }},
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.enrollment(label.config.name, "issued")
        return pkcs7_response(certs_only_body([certificate], label.config.base64_line_length))

    def _issue(self, ca: CertificateAuthority, body: bytes, label: EstLabel, identity: Identity) -> x509.Certificate:
        """Worker thread: parse and verify the CSR, apply the label's policy, issue and record."""
        config = label.config
        if config.rate_limit is not None or config.label_rate_limit is not None:  # before any CSR work
            limits = (config.rate_limit, config.label_rate_limit)
            self.limiter.check(ca.inventory, config.name, identity.requester, *limits)
        try:
            csr_der = decode_csr_bytes(body)  # RFC 8951: base64 whatever Content-Transfer-Encoding says
            csr = parse_csr(csr_der)
            profile = label.config.profile
            renewing, authority = identity.renewing, identity.authority
            identity_cn, constraints, renews = None, None, None
            if renewing is not None and (authority is None or renews_own_profile(ca, renewing, profile)):
                check_renewal(ca, renewing, csr, profile, label.config.renew_after_expiry)
                constraints = certificate_name_constraints(renewing)  # a renewed CA keeps its name constraints
                renews = renewing
            elif authority is not None:
                if identity.authority_ca is None:  # fail closed: an authority always names its CA
                    raise HttpRefusal(403, "identity certificate without a configured identity CA")
                check_identity(self.workers.authority(identity.authority_ca), authority, csr, label.config)
                identity_cn = subject_cn(authority.subject)  # {cn} in a CA profile's name constraints
            request = SigningRequest(
                csr_der, csr, profile=profile, requester=identity.requester,
                identity_cn=identity_cn, name_constraints=constraints, renews=renews,
            )  # fmt: skip
            started = time.monotonic()
            certificate = ca.issue(request).certificate
            if self.metrics is not None:
                self.metrics.signed(ca.name, time.monotonic() - started)
            return certificate
        except KvpkiError as error:
            context = f"enrollment on label {label.config.name}"
            raise HttpRefusal.from_error(error, self.config.retry_after, context) from None
