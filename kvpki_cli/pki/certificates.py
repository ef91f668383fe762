"""Building and signing X.509 certificates from approved templates (leaf and CA alike).

The signer is any ``cryptography`` private key: a local key or a vault-backed one.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID

from kvpki_cli.pki.keys import CAPrivateKey, signing_hash
from kvpki_cli.pki.policy import Template, subject_cn
from kvpki_cli.pki.profiles import Profile, name_constraints


class PublicationUrls(NamedTuple):
    """Where relying parties find revocation data and the issuer certificate (all optional)."""

    crl: str | None = None
    ocsp: str | None = None
    ca_issuers: str | None = None


def new_serial_number() -> int:
    """20 octets, positive, 158 random bits from the OS CSPRNG (RFC 5280 4.1.2.2)."""
    return int.from_bytes(os.urandom(20), "big") >> 2 | (1 << 158)


def key_usage(names: frozenset[str]) -> x509.KeyUsage:
    """keyUsage with exactly the named bits set (e.g. ``frozenset({"digital_signature"})``)."""
    flags = {
        flag: flag in names
        for flag in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
    }
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def _publication_extensions(builder: x509.CertificateBuilder, urls: PublicationUrls) -> x509.CertificateBuilder:
    if urls.crl:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(urls.crl)], None, None, None)
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    access = []
    if urls.ocsp:
        access.append(
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(urls.ocsp))
        )
    if urls.ca_issuers:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(urls.ca_issuers)
            )
        )
    if access:
        builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
    return builder


def _base_builder(
    template: Template, serial: int, issuer_name: x509.Name, aki: x509.AuthorityKeyIdentifier
) -> x509.CertificateBuilder:
    profile: Profile = template.profile
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(issuer_name)
        .public_key(template.public_key)
        .serial_number(serial)
        .not_valid_before(template.not_before)
        .not_valid_after(template.not_after)
        .add_extension(x509.BasicConstraints(ca=profile.is_ca, path_length=template.path_length), critical=True)
        .add_extension(key_usage(profile.key_usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(template.public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    if profile.extended_key_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(profile.extended_key_usage)), critical=False)
    if template.name_constraints is not None:
        # RFC 5280 4.2.1.10: conforming CAs MUST mark this extension critical.
        builder = builder.add_extension(template.name_constraints, critical=True)
    if template.sans:
        # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(template.sans)), critical=not list(template.subject)
        )
    return builder


def issue_certificate(
    template: Template,
    serial: int,
    issuer: x509.Certificate,
    signer: CAPrivateKey,
    urls: PublicationUrls | None = None,
) -> x509.Certificate:
    """Sign ``template`` with the issuing CA's key."""
    if template.name_constraints is None and template.profile.constrains_names:  # e.g. init-ca --parent
        template = template._replace(name_constraints=name_constraints(template.profile, subject_cn(template.subject)))
    builder = _base_builder(template, serial, issuer.subject, authority_key_identifier(issuer))
    builder = _publication_extensions(builder, urls or PublicationUrls())
    return builder.sign(signer, signing_hash(signer))


def self_signed_certificate(template: Template, serial: int, signer: CAPrivateKey) -> x509.Certificate:
    """A root CA certificate: issuer = subject, AKI = SKI, signed with its own key."""
    ski = x509.SubjectKeyIdentifier.from_public_key(template.public_key)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    return _base_builder(template, serial, template.subject, aki).sign(signer, signing_hash(signer))


def serial_hex(serial: int) -> str:
    """A serial number as the inventory keys it and every message shows it: lowercase hex, no prefix."""
    return format(serial, "x")


def describe(cert: x509.Certificate) -> dict[str, object]:
    """The facts scripts ask about a certificate, as JSON-ready values."""
    try:
        sans = [
            str(getattr(n, "value", n))
            for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "serial": serial_hex(cert.serial_number),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
    }


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")
