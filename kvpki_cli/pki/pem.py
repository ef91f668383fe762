"""Finding DER in what users hand kvpki: PEM (with any text around the block, as openssl writes and
reads it), DER, or bare base64.  Pure functions; every failure is ``InvalidInput``.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence

from cryptography import x509

from kvpki_cli.errors import InvalidInput

# A PEM block starts at the beginning of a line; text before it (``openssl pkcs7 -print_certs``
# writes "subject=..." and "issuer=..." lines) and after it is ignored, as openssl ignores it.
_PEM_BLOCK = re.compile(
    rb"^[ \t]*-----BEGIN ([A-Z0-9 ]{1,64})-----[ \t]*\r?$(.*?)^[ \t]*-----END \1-----", re.S | re.M
)
_PEM_HEADER = re.compile(rb"^[ \t]*-----BEGIN ", re.M)
_WHITESPACE = re.compile(rb"\s+")


def b64decode(text: bytes, what: str) -> bytes:
    """Strict base64, line breaks and other whitespace allowed."""
    try:
        return binascii.a2b_base64(_WHITESPACE.sub(b"", text), strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is neither PEM, DER nor valid base64") from None


def pem_or_der(data: bytes, labels: Sequence[str], what: str) -> bytes | None:
    """DER from the first PEM block labelled one of ``labels``, or ``data`` itself if it is DER.

    None when ``data`` holds neither (the caller may accept bare base64); ``InvalidInput``
    when it holds PEM of another kind only.
    """
    looks_der = data[:1] == b"\x30"
    if _PEM_HEADER.search(data):
        found = []
        for match in _PEM_BLOCK.finditer(data):
            label = match.group(1).decode()
            if label in labels:
                return b64decode(match.group(2), f"the PEM {label} block")
            found.append(label)
        if not looks_der:  # DER may contain "-----BEGIN" inside a string value
            got = f"got {', '.join(repr(label) for label in found)}" if found else "found no complete block"
            raise InvalidInput(f"expected a PEM {labels[0]!r} block in the {what}, {got}")
    return data if looks_der else None


def load_certificate(data: bytes, what: str = "certificate file") -> x509.Certificate:
    """An X.509 certificate from PEM (first CERTIFICATE block, text around it ignored) or DER.

    Its extensions are parsed here so a malformed certificate fails now, as invalid input,
    not later inside the core.
    """
    der = pem_or_der(data, ("CERTIFICATE", "X509 CERTIFICATE"), what)
    if der is None:
        raise InvalidInput(f"the {what} is not a PEM or DER X.509 certificate")
    try:
        certificate = x509.load_der_x509_certificate(der)
        _ = (certificate.subject.rfc4514_string(), certificate.issuer, list(certificate.extensions))
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise InvalidInput(f"the {what} is not a valid X.509 certificate ({type(exc).__name__})") from None
    return certificate
