"""EST wire format: base64 certs-only PKCS#7 out, base64 PKCS#10 in (RFC 7030, RFC 8951).

The choices here are what both IoT Edge and strongSwan 5.9.8 accept: exact
``application/pkcs7-mime; smime-type=certs-only``, a Content-Length (aiohttp sets
it for a bytes body), and base64 without line breaks unless configured (libest
wants 64-character lines).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from aiohttp import web
from cryptography import x509

from kvpki_cli.errors import KvpkiError
from kvpki_cli.pki.encoding import pkcs7_certs_only

PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PKCS10 = "application/pkcs10"


class HttpRefusal(Exception):
    """A request refused with an HTTP status and a plain-text reason (never a certificate)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}

    @classmethod
    def from_error(cls, error: KvpkiError, retry_after: int) -> HttpRefusal:
        status = error.http_status if 400 <= error.http_status < 600 else 500
        headers: dict[str, str] = {}
        if status == 503:
            wait = getattr(error, "retry_after", None)
            headers["Retry-After"] = str(max(1, round(wait)) if wait else retry_after)
        return cls(status, str(error), headers)


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
