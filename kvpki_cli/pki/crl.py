"""Building CRLs (RFC 5280 section 5) signed by the CA key, wherever it lives."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from cryptography import x509

from kvpki_cli.errors import UsageError
from kvpki_cli.pki.certificates import authority_key_identifier
from kvpki_cli.pki.keys import CAPrivateKey, signing_hash

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}


def parse_reason(name: str) -> str:
    """Canonical RFC 5280 reason name, matched case-insensitively."""
    for canonical in REASONS:
        if canonical.lower() == name.lower():
            return canonical
    raise UsageError(f"unknown revocation reason {name!r} (one of: {', '.join(REASONS)})")


class RevokedEntry(NamedTuple):
    serial: int
    revoked_at: datetime
    reason: str


def build_crl(
    issuer: x509.Certificate,
    signer: CAPrivateKey,
    revoked: Iterable[RevokedEntry],
    *,
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A complete CRL; ``unspecified`` reasons are omitted as RFC 5280 recommends."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update.replace(microsecond=0))
        .next_update(next_update.replace(microsecond=0))
        .add_extension(authority_key_identifier(issuer), critical=False)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
    )
    for entry in revoked:
        revoked_builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at.replace(microsecond=0))
        )
        if entry.reason != "unspecified":
            revoked_builder = revoked_builder.add_extension(x509.CRLReason(REASONS[entry.reason]), critical=False)
        builder = builder.add_revoked_certificate(revoked_builder.build())
    return builder.sign(signer, signing_hash(signer))
