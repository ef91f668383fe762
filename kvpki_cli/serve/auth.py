"""Who is asking: HTTP Basic users, bootstrap client certificates, certificates being renewed,
identity certificates acting as enrollment authority.

TLS already verified any client certificate against the union of all trusted
CAs (``ssl.CERT_OPTIONAL``); here we decide what it authorises on one label.
Checks that need the inventory run later, in the worker thread (``est.py``).

When a label has ``renew_after_expiry``, TLS verifies chains without checking
time (OpenSSL's X509_V_FLAG_NO_CHECK_TIME, see app.py): then every path here
checks validity time itself, for the client certificate and for the CA
certificates above it, and only renewal within the label's window accepts an
expired client certificate.
"""

from __future__ import annotations

import asyncio
import binascii
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web
from cryptography import x509

from kvpki_cli.serve.config import LabelConfig
from kvpki_cli.serve.passwd import UserDirectory
from kvpki_cli.serve.wire import HttpRefusal
from kvpki_cli.textsafe import escape


@dataclass(frozen=True)
class Identity:
    """An authenticated caller.

    ``renewing`` limits it to re-enrolling that certificate's names; ``authority`` is a
    certificate from one of the label's ``identity_cas`` (named ``authority_ca``) that may
    enroll names tied to its CN.  When both are set (the label's CA is also an identity
    CA) the certificate's recorded profile decides which rule applies.
    """

    requester: str
    renewing: x509.Certificate | None = None
    authority: x509.Certificate | None = None
    authority_ca: str | None = None


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The TLS client certificate (already chain-verified by the TLS layer), if one was sent."""
    transport = request.transport
    ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object") if transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    try:  # OpenSSL accepted it; cryptography may still refuse parts of it (duplicate extensions, ...)
        cert = x509.load_der_x509_certificate(der)
        _ = (cert.subject, list(cert.extensions))
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise HttpRefusal(403, "the client certificate cannot be parsed") from None
    return cert


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic`` header; None when absent."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = binascii.a2b_base64(value.strip().encode(), strict_mode=True).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise HttpRefusal(400, "malformed Authorization header") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise HttpRefusal(400, "malformed Authorization header")
    return user, password


def directly_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # wrong key type, bad signature: cryptography raises several types
        return False
    return True


def currently_valid(cert: x509.Certificate) -> bool:
    now = datetime.now(UTC)
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def within_renewal_window(cert: x509.Certificate, window: timedelta | None) -> bool:
    """Valid now, or (with a window) expired at most ``window`` ago: what may renew itself."""
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        return False
    return now < cert.not_valid_after_utc or (window is not None and now - cert.not_valid_after_utc <= window)


MAX_CHAIN = 8


def issuers_currently_valid(cert: x509.Certificate, trusted: Sequence[x509.Certificate]) -> bool:
    """Whether ``cert`` chains, through currently valid trusted CA certificates, to a self-signed one.

    The time check OpenSSL skips when renewal after expiry is on: an expired CA certificate
    (a bootstrap CA, an intermediate, a root) must still make every client certificate fail.
    """
    current = cert
    for _ in range(MAX_CHAIN):
        issuer = next((ca for ca in trusted if currently_valid(ca) and directly_issued(current, ca)), None)
        if issuer is None:
            return False
        if issuer.subject == issuer.issuer:
            return True
        current = issuer
    return False


def describe_subject(cert: x509.Certificate) -> str:
    """The subject for logs and the inventory's requester, escaped: a client certificate's subject
    may hold newlines or terminal escapes (its CA need not be kvpki)."""
    try:
        text = cert.subject.rfc4514_string()
    except ValueError:  # a subject cryptography cannot represent as text
        return "(unreadable subject)"
    return escape(text) or "(empty subject)"


class Authenticator:
    """Turns a request on a label into an ``Identity`` or an ``HttpRefusal`` (401/403)."""

    def __init__(
        self,
        users: UserDirectory,
        realm: str,
        ca_certs: dict[str, x509.Certificate],
        client_cas: dict[str, list[x509.Certificate]],
        identity_cas: dict[str, x509.Certificate] | None = None,
        windows: dict[str, timedelta] | None = None,
        trusted: Sequence[x509.Certificate] = (),
        earlier_ca_certs: dict[str, list[x509.Certificate]] | None = None,
        earlier_identity_cas: dict[str, list[x509.Certificate]] | None = None,
    ) -> None:
        self.users = users
        self.challenge = {"WWW-Authenticate": f'Basic realm="{realm}"'}
        self.ca_certs = ca_certs  # label -> issuing CA certificate
        self.client_cas = client_cas  # label -> trusted bootstrap CA certificates
        self.identity_cas = identity_cas or {}  # CA name -> certificate, for labels' identity_cas
        self.earlier_ca_certs = earlier_ca_certs or {}  # label -> CA certificates of earlier key generations
        self.earlier_identity_cas = earlier_identity_cas or {}  # CA name -> the same, for identity CAs
        # label -> renew_after_expiry; when any is set, TLS no longer checks time and we check chains here
        self.windows = {name: window for name, window in (windows or {}).items() if window is not None}
        self.trusted = tuple(trusted)

    @property
    def time_relaxed(self) -> bool:
        """Whether TLS accepts expired client certificates (app.tls_context sets NO_CHECK_TIME)."""
        return bool(self.windows)

    def unauthorised(self, reason: str) -> HttpRefusal:
        return HttpRefusal(401, reason, self.challenge)

    async def _check_user(self, user: str, password: str) -> bool:
        known = self.users.cached(user, password)
        if known is not None:
            return known
        return await asyncio.get_running_loop().run_in_executor(None, self.users.verify, user, password)

    async def identify(self, request: web.Request, label: LabelConfig, reenroll: bool) -> Identity:
        cert = peer_certificate(request)
        if cert is not None and self.time_relaxed and not issuers_currently_valid(cert, self.trusted):
            raise HttpRefusal(403, "a CA certificate above the client certificate is not currently valid")
        credentials = basic_credentials(request.headers.get("Authorization"))
        renewable = cert is not None and label.renewal and self._issued_here(cert, label)
        if reenroll:
            if cert is None and credentials is None:
                raise self.unauthorised("authentication required")
            if not renewable:
                reason = "simplereenroll needs the certificate being renewed as TLS client certificate"
                raise HttpRefusal(403, self._expired_here(cert, label) or reason)
            assert cert is not None
            return Identity(f"est-cert:{describe_subject(cert)}", renewing=cert)
        if credentials is not None and (label.users or cert is None):
            # A label without Basic users ignores a password sent alongside a certificate (IoT
            # Edge sends its password up front on every request, also where its identity counts).
            user, password = credentials
            if not await self._check_user(user, password):
                raise self.unauthorised("invalid user name or password")
            if not label.allows_user(user):
                raise HttpRefusal(403, f"user {user!r} may not enroll on EST label {label.name!r}")
            return Identity(f"est-basic:{user}")
        if cert is not None:
            authority_ca = self._identity_ca(cert, label)
            if renewable or authority_ca is not None:
                return Identity(
                    f"est-cert:{describe_subject(cert)}",
                    renewing=cert if renewable else None,
                    authority=cert if authority_ca is not None else None,
                    authority_ca=authority_ca,
                )
            if currently_valid(cert) and any(directly_issued(cert, ca) for ca in self.client_cas.get(label.name, [])):
                return Identity(f"est-cert:{describe_subject(cert)}")
            reason = f"client certificate is not trusted for EST label {label.name!r}"
            raise HttpRefusal(403, self._expired_here(cert, label) or reason)
        raise self.unauthorised("authentication required")

    def _issued_here(self, cert: x509.Certificate, label: LabelConfig) -> bool:
        """A certificate of this label's CA that may renew itself now (est.check_renewal re-checks time)."""
        ca = self.ca_certs.get(label.name)
        window = self.windows.get(label.name)
        if ca is None or not within_renewal_window(cert, window):
            return False
        return self._signed_here(cert, label, ca)

    def _signed_here(self, cert: x509.Certificate, label: LabelConfig, ca: x509.Certificate) -> bool:
        """Signed by the label CA's current key or, after 'kvpki rollover', an earlier one (which renews
        into the current one)."""
        return any(directly_issued(cert, issuer) for issuer in (ca, *self.earlier_ca_certs.get(label.name, ())))

    def _expired_here(self, cert: x509.Certificate | None, label: LabelConfig) -> str | None:
        """Why this label's own certificate cannot renew any more (expired beyond the window), if it is that."""
        from kvpki_cli.authority import check_renewal_time
        from kvpki_cli.errors import PolicyViolation

        ca = self.ca_certs.get(label.name)
        if cert is None or ca is None or not label.renewal or not self._signed_here(cert, label, ca):
            return None
        try:
            check_renewal_time(cert, datetime.now(UTC), self.windows.get(label.name))
        except PolicyViolation as refusal:
            return f"the client {refusal}"
        return None

    def _identity_ca(self, cert: x509.Certificate, label: LabelConfig) -> str | None:
        """The label's identity CA whose key signed ``cert`` (signature checked, not just the issuer name)."""
        for name in label.identity_cas:
            ca = self.identity_cas.get(name)
            earlier = self.earlier_identity_cas.get(name, ())
            if ca is not None and any(directly_issued(cert, issuer) for issuer in (ca, *earlier)):
                return name
        return None
