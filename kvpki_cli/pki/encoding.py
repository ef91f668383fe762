"""Output encodings for certificates and chains: PEM, DER, PKCS#7 certs-only, JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence

from cryptography import x509

from kvpki_cli.errors import UsageError
from kvpki_cli.pki.keys import Encoding

CERT_FORMATS = ("pem", "der", "pkcs7", "json")


def pkcs7_certs_only(certs: Sequence[x509.Certificate], encoding: Encoding = Encoding.DER) -> bytes:
    """A degenerate (certs-only) PKCS#7 SignedData, as EST and Windows tools expect."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    return pkcs7.serialize_certificates(list(certs), encoding)


def encode_certificates(certs: Sequence[x509.Certificate], fmt: str, extra: dict[str, object] | None = None) -> bytes:
    """Encode ``certs`` (leaf or CA first) in one of ``CERT_FORMATS``."""
    if fmt == "pem":
        return b"".join(c.public_bytes(Encoding.PEM) for c in certs)
    if fmt == "der":
        if len(certs) != 1:
            raise UsageError("DER output holds one certificate; use --format pem or pkcs7 for a chain")
        return certs[0].public_bytes(Encoding.DER)
    if fmt == "pkcs7":
        return pkcs7_certs_only(certs, Encoding.PEM)
    if fmt == "json":
        from kvpki_cli.pki.certificates import describe

        document: dict[str, object] = dict(describe(certs[0]))
        document.update(extra or {})
        document["certificate"] = certs[0].public_bytes(Encoding.PEM).decode()
        document["chain"] = [c.public_bytes(Encoding.PEM).decode() for c in certs[1:]]
        return (json.dumps(document, indent=2) + "\n").encode()
    raise UsageError(f"unknown format {fmt!r} (one of: {', '.join(CERT_FORMATS)})")
