"""EST wire format: base64 certs-only PKCS#7 out, base64 PKCS#10 in (RFC 7030, RFC 8951).

The choices here are what both IoT Edge and strongSwan 5.9.8 accept: exact
``application/pkcs7-mime; smime-type=certs-only``, a Content-Length (aiohttp sets
it for a bytes body), and base64 without line breaks unless configured (libest
wants 64-character lines).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence

from aiohttp import web
from cryptography import x509

from kvpki_cli.errors import BackendError, InvalidInput, KvpkiError, PolicyViolation
from kvpki_cli.pki.encoding import pkcs7_certs_only

PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PKCS10 = "application/pkcs10"
# Errors about what the client sent: their message explains the refusal to the client.
CLIENT_ERRORS = (InvalidInput, PolicyViolation)
GENERIC_UNAVAILABLE = "service temporarily unavailable, try again later"
GENERIC_INTERNAL = "internal server error"
log = logging.getLogger("kvpki.serve")


class HttpRefusal(Exception):
    """A request refused with an HTTP status and a plain-text reason (never a certificate)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}

    @classmethod
    def from_error(cls, error: KvpkiError, retry_after: int, context: str = "request") -> HttpRefusal:
        """The public answer to a core error: specific for client mistakes, generic otherwise.

        Errors of the server's own side (key store, inventory, configuration) may name
        files, vaults or databases: their text goes to the server log, never to the client.
        """
        if isinstance(error, CLIENT_ERRORS) and 400 <= error.http_status < 500:
            return cls(error.http_status, str(error))
        log.error("%s failed: %s: %r", context, type(error).__name__, str(error))  # repr: one escaped line
        # Every other core error is the server's own state (a key store, inventory or CA file missing or
        # unreachable): the service is unavailable until the operator fixes it, which is 503, not a bug's 500.
        wait = error.retry_after if isinstance(error, BackendError) else None
        seconds = max(1, round(wait)) if wait and 0 < wait < 86400 else retry_after
        return cls(503, GENERIC_UNAVAILABLE, {"Retry-After": str(seconds)})


def b64(data: bytes, line_length: int) -> bytes:
    """Base64 on one line, or in lines of ``line_length`` ending in LF."""
    encoded = base64.b64encode(data)
    if not line_length:
        return encoded
    return b"".join(encoded[i : i + line_length] + b"\n" for i in range(0, len(encoded), line_length))


def certs_only_body(certs: Sequence[x509.Certificate], line_length: int) -> bytes:
    if not certs:  # an empty certs-only structure crashes clients (iot-identity-service #567)
        raise ValueError("refusing to send an empty certs-only PKCS#7")
    return b64(pkcs7_certs_only(certs), line_length)


def pkcs7_response(body: bytes) -> web.Response:
    return web.Response(
        body=body,
        headers={"Content-Type": PKCS7_CERTS_ONLY, "Content-Transfer-Encoding": "base64"},
    )


def text_response(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=reason.rstrip("\n") + "\n", headers=headers)


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()
