"""CA key rollover without downtime (``kvpki rollover``).

A rollover adds the CA's next key generation: a new key and a CA certificate
with the same subject, constraints and profile and a new subject key
identifier.  A subordinate CA's new certificate is signed by its parent's
current key and recorded in the parent's inventory; a root's is self-signed,
and two cross-certificates (RFC 4210 4.4) link the old and new keys both ways:
NewWithOld (new public key, signed by the old key) lets a device that trusts
only the old root validate the new chain, OldWithNew (old public key, signed by
the new key) the reverse.

The new generation's chain is stored last: that write is the switch, after
which every issuance (also in a running ``kvpki serve``, whose ``/cacerts`` and
client trust follow within seconds, see ``serve/generations.py``) uses the new key.  The
previous generations stay: their keys keep signing the CRLs (``kvpki crl
--generation K``, ``/crl/<ca>.<K>.crl``) and OCSP answers for what they issued,
and their certificates stay published (``get-ca --chain``, EST ``/cacerts``)
while they are valid.  Nothing is changed when a step fails.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvpki_cli.authority import (
    CertificateAuthority,
    Generation,
    check_same_constraints,
    generation_urls,
    kept_path_length,
    new_record,
    utcnow,
)
from kvpki_cli.config import Settings
from kvpki_cli.errors import UsageError
from kvpki_cli.fileutil import write_file_atomic
from kvpki_cli.pki.certificates import issue_certificate, new_serial_number, self_signed_certificate
from kvpki_cli.pki.keys import CAPublicKey, Encoding, KeyType
from kvpki_cli.pki.policy import Template, certificate_name_constraints, validity_window

CROSS_FILE = "cross.{generation}.pem"  # NewWithOld then OldWithNew, beside ca.json


class Rollover(NamedTuple):
    """What a rollover made: the new generation, its chain, and (roots only) the cross-certificates."""

    generation: int
    chain: list[x509.Certificate]
    new_with_old: x509.Certificate | None = None
    old_with_new: x509.Certificate | None = None


def cross_path(settings: Settings, ca_name: str, generation: int) -> Path:
    return settings.ca_directory(ca_name) / CROSS_FILE.format(generation=generation)


def cross_certificates(ca: CertificateAuthority, generation: int) -> list[x509.Certificate]:
    """The cross-certificates made when root ``ca`` rolled over to ``generation`` (none for a sub-CA)."""
    try:
        return x509.load_pem_x509_certificates(cross_path(ca.settings, ca.name, generation).read_bytes())
    except (FileNotFoundError, ValueError):
        return []


def published_certificates(ca: CertificateAuthority) -> list[x509.Certificate]:
    """What ``get-ca --chain`` and EST ``/cacerts`` publish: the current chain, then the CA certificate of
    every earlier generation still valid (with its issuers), then the cross-certificates still valid."""
    now = utcnow()
    generations = ca.generations()
    found: list[x509.Certificate] = list(generations[0].chain)
    for generation in generations[1:]:
        if generation.chain[0].not_valid_after_utc > now:
            found.extend(generation.chain)
    for generation in generations:
        found.extend(c for c in cross_certificates(ca, generation.number) if c.not_valid_after_utc > now)
    unique: dict[bytes, x509.Certificate] = {}
    for certificate in found:
        unique.setdefault(certificate.public_bytes(Encoding.DER), certificate)
    return list(unique.values())


def _lifetime(certificate: x509.Certificate) -> timedelta:
    return certificate.not_valid_after_utc - certificate.not_valid_before_utc


def _template(
    ca: CertificateAuthority, old: x509.Certificate, public_key: CAPublicKey, window: tuple[datetime, datetime]
) -> Template:
    """``old``'s subject, path length and name constraints for ``public_key``: only the key changes."""
    profile = ca.settings.profiles["sub-ca"]
    root = ca.config.parent is None
    return Template(
        subject=old.subject,
        public_key=public_key,
        sans=(),
        not_before=window[0],
        not_after=window[1],
        profile=profile._replace(name="root" if root else "sub-ca"),
        path_length=kept_path_length(old),
        name_constraints=certificate_name_constraints(old),
    )


def rollover(
    settings: Settings, name: str, key_type: KeyType | None = None, validity: timedelta | None = None
) -> Rollover:
    """Add CA ``name``'s next key generation and switch issuance to it (see the module docstring)."""
    ca = CertificateAuthority.open(settings, name)
    if ca.config.crl_partition_size is not None:
        raise UsageError(
            f"CA {name!r} has partitioned CRLs (crl_partition_size): 'kvpki rollover' does not support them yet"
        )
    ca.check_not_revoked()
    old: Generation = ca.current()
    old_certificate = old.chain[0]
    parent = CertificateAuthority.open(settings, ca.config.parent, ca.inventory) if ca.config.parent else None
    if parent is not None:
        parent.check_not_revoked()
    chosen_type = key_type or KeyType(ca.config.key_type or "ec-p256")
    now = utcnow()
    lifetime = validity or _lifetime(old_certificate) - ca.config.backdate
    if parent is not None:
        window = validity_window(parent.certificate, now, lifetime, ca.config.backdate)
    else:
        window = ((now - ca.config.backdate).replace(microsecond=0), (now + lifetime).replace(microsecond=0))
    number, public_key = ca.keystore.create_next_key(chosen_type)
    written: list[Path] = []
    try:
        template = _template(ca, old_certificate, public_key, window)
        new_signer = ca.keystore.signer_for(number)
        records = []
        new_with_old = old_with_new = None
        if parent is None:
            certificate = self_signed_certificate(template, new_serial_number(), new_signer)
            chain = [certificate]
            # NewWithOld: the new key under the old one, for devices that trust only the old root.
            cross_window = (template.not_before, min(template.not_after, old_certificate.not_valid_after_utc))
            new_with_old = issue_certificate(
                template._replace(not_after=cross_window[1]), new_serial_number(), old_certificate,
                ca.keystore.signer_for(old.number),
            )  # fmt: skip
            # OldWithNew: the old key under the new one, for devices that already trust only the new root.
            old_key = old_certificate.public_key()
            assert isinstance(old_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
            old_template = _template(ca, old_certificate, old_key, cross_window)
            old_with_new = issue_certificate(old_template, new_serial_number(), certificate, new_signer)
            records = [
                new_record(ca.name, template, new_with_old, "rollover", None, old.number),
                new_record(ca.name, old_template, old_with_new, "rollover", None, number),
            ]
            path = cross_path(settings, name, number)
            pem = b"".join(c.public_bytes(Encoding.PEM) for c in (new_with_old, old_with_new))
            write_file_atomic(path, pem, mode=0o644, overwrite=True)
            written.append(path)
        else:
            issuer = parent.current()
            certificate = issue_certificate(
                template, new_serial_number(), issuer.chain[0], parent.keystore.signer_for(issuer.number),
                generation_urls(parent.config.urls, issuer.number),
            )  # fmt: skip
            chain = [certificate, *issuer.chain]
            records = [new_record(parent.name, template, certificate, "rollover", None, issuer.number)]
        check_same_constraints(old_certificate, certificate)  # a rollover changes the key, nothing else
        # The inventory rows first, then the switch: a failure leaves the old generation current.
        ca.inventory.record_issued(records)
        ca.keystore.store_generation_chain(number, chain)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        ca.keystore.discard_generation(number)
        raise
    return Rollover(number, chain, new_with_old, old_with_new)

