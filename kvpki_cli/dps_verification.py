"""Proof-of-possession certificates for Azure IoT Hub / DPS (``kvpki dps-verification``).

When a CA certificate is uploaded to DPS or IoT Hub, the service issues a
verification code; the owner proves it holds the CA key by signing a
certificate whose subject CN is that code.  The key in it is a throwaway: it is
generated in memory and dropped, because only the CA's signature matters.  Every
CA signature is accounted for, so the certificate is recorded in the inventory
under the profile ``dps-verification`` before it is printed.
"""

from __future__ import annotations

import re
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvpki_cli.authority import CertificateAuthority, utcnow
from kvpki_cli.errors import PolicyViolation, UsageError
from kvpki_cli.inventory.base import CertificateRecord
from kvpki_cli.pki.certificates import authority_key_identifier, key_usage, new_serial_number, serial_hex
from kvpki_cli.pki.keys import Encoding, signing_hash
from kvpki_cli.textsafe import requester_text

PROFILE = "dps-verification"
DEFAULT_VALIDITY = timedelta(days=1)
MAX_VALIDITY = timedelta(days=30)
# Printable ASCII, no leading/trailing space, at most 64 characters (RFC 5280 ub-common-name).
# Azure's codes are hex strings; anything stranger is more likely a paste accident than a code.
CODE = re.compile(r"[!-~](?:[ -~]{0,62}[!-~])?", re.ASCII)


def check_code(code: str) -> str:
    if not CODE.fullmatch(code):
        shown = repr(code[:80])
        raise UsageError(
            f"invalid verification code {shown} (printable ASCII, 1-64 characters, no leading or trailing space)"
        )
    return code


def issue_verification(ca: CertificateAuthority, code: str, validity: timedelta, requester: str) -> x509.Certificate:
    """Sign an end-entity certificate with CN = ``code`` for a throwaway key; record it; return it."""
    check_code(code)
    if validity > MAX_VALIDITY:
        raise UsageError("--validity of a verification certificate must be at most 30d (it is used once)")
    ca.check_not_revoked()
    issuer = ca.certificate
    now = utcnow()
    not_before = max(now - ca.config.backdate, issuer.not_valid_before_utc).replace(microsecond=0)
    not_after = min(now + validity, issuer.not_valid_after_utc).replace(microsecond=0)
    if not_after <= now:
        raise PolicyViolation(f"CA {ca.name!r} has expired: it cannot prove possession of its key to DPS")
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()  # the private half is never kept
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)])
    signer = ca.keystore.signer()
    serial = new_serial_number()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(frozenset({"digital_signature"})), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(issuer), critical=False)
        .sign(signer, signing_hash(signer))
    )
    ca.inventory.record_issued(
        [
            CertificateRecord(
                ca=ca.name,
                serial=serial_hex(serial),
                subject=subject.rfc4514_string(),
                sans=(),
                profile=PROFILE,
                requester=requester_text(requester),
                not_before=not_before,
                not_after=not_after,
                csr_sha256="",
                der=certificate.public_bytes(Encoding.DER),
            )
        ]
    )
    return certificate
