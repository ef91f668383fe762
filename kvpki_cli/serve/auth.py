"""Who is asking: HTTP Basic users, bootstrap client certificates, certificates being renewed,
identity certificates acting as enrollment authority.

TLS already verified any client certificate against the union of all trusted
CAs (``ssl.CERT_OPTIONAL``); here we decide what it authorises on one label.
Checks that need the inventory run later, in the worker thread (``est.py``).
"""

from __future__ import annotations

import asyncio
import binascii
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

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

    def unauthorised(self, reason: str) -> HttpRefusal:
        return HttpRefusal(401, reason, self.challenge)

    async def _check_user(self, user: str, password: str) -> bool:
        known = self.users.cached(user, password)
        if known is not None:
            return known
        return await asyncio.get_running_loop().run_in_executor(None, self.users.verify, user, password)

    async def identify(self, request: web.Request, label: LabelConfig, reenroll: bool) -> Identity:
        cert = peer_certificate(request)
        credentials = basic_credentials(request.headers.get("Authorization"))
        renewable = cert is not None and label.renewal and self._issued_here(cert, label)
        if reenroll:
            if cert is None and credentials is None:
                raise self.unauthorised("authentication required")
            if not renewable:
                raise HttpRefusal(403, "simplereenroll needs the certificate being renewed as TLS client certificate")
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
            raise HttpRefusal(403, f"client certificate is not trusted for EST label {label.name!r}")
        raise self.unauthorised("authentication required")

    def _issued_here(self, cert: x509.Certificate, label: LabelConfig) -> bool:
        ca = self.ca_certs.get(label.name)
        if ca is None or not currently_valid(cert):
            return False
        # After 'kvpki rollover' a certificate of an earlier key generation renews into the current one.
        return any(directly_issued(cert, issuer) for issuer in (ca, *self.earlier_ca_certs.get(label.name, ())))

    def _identity_ca(self, cert: x509.Certificate, label: LabelConfig) -> str | None:
        """The label's identity CA whose key signed ``cert`` (signature checked, not just the issuer name)."""
        for name in label.identity_cas:
            ca = self.identity_cas.get(name)
            earlier = self.earlier_identity_cas.get(name, ())
            if ca is not None and any(directly_issued(cert, issuer) for issuer in (ca, *earlier)):
                return name
        return None
