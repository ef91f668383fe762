"""Issuance policy: turn (CSR, profile, operator overrides, issuer) into an approved template.

Everything a CA must refuse is refused here, before any key is touched, so a
refusal changes nothing.  Pure logic; the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from kvpki_cli.durations import MAX_DURATION
from kvpki_cli.errors import PolicyViolation, UsageError
from kvpki_cli.pki.csr import check_key_policy
from kvpki_cli.pki.names import check_sans, check_subject
from kvpki_cli.pki.profiles import Profile, name_constraints

MAX_PATH_LENGTH = 255  # far beyond any real hierarchy; keeps the value inside what X.509 libraries encode


def check_path_length(value: int | None) -> None:
    """A pathLenConstraint given by an operator: 0..MAX_PATH_LENGTH."""
    if value is not None and not 0 <= value <= MAX_PATH_LENGTH:
        raise UsageError(f"--path-length must be between 0 and {MAX_PATH_LENGTH}")


class Template(NamedTuple):
    """An approved certificate, minus serial and signature."""

    subject: x509.Name
    public_key: CertificatePublicKeyTypes
    sans: tuple[x509.GeneralName, ...]
    not_before: datetime
    not_after: datetime
    profile: Profile
    path_length: int | None
    notes: tuple[str, ...] = ()
    name_constraints: x509.NameConstraints | None = None  # CA profiles only, emitted critical


def requested_sans(csr: x509.CertificateSigningRequest) -> tuple[x509.GeneralName, ...]:
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(ext.value)


def certificate_sans(certificate: x509.Certificate) -> tuple[x509.GeneralName, ...]:
    try:
        return tuple(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return ()


def certificate_name_constraints(certificate: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def requests_ca(csr: x509.CertificateSigningRequest) -> bool:
    try:
        return bool(csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def issuer_path_length(issuer: x509.Certificate) -> int | None:
    """The issuer's pathLenConstraint, or refuse if it cannot issue certificates at all."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise PolicyViolation("issuer certificate is not a CA (no basicConstraints)") from None
    if not constraints.ca:
        raise PolicyViolation("issuer certificate is not a CA")
    return constraints.path_length


def child_path_length(profile: Profile, issuer: x509.Certificate, requested: int | None) -> int | None:
    """pathLenConstraint for a CA certificate, which must fit under the issuer's."""
    check_path_length(requested)
    limit = issuer_path_length(issuer)
    if limit is not None and limit <= 0:
        raise PolicyViolation("issuer's path length constraint (0) forbids issuing CA certificates")
    wanted = profile.path_length if profile.path_length is not None else requested
    if requested is not None and profile.path_length is not None and requested != profile.path_length:
        raise PolicyViolation(f"profile {profile.name!r} fixes the path length at {profile.path_length}")
    if wanted is None:
        return None if limit is None else limit - 1
    if wanted < 0:
        raise PolicyViolation("path length must not be negative")
    if limit is not None and wanted > limit - 1:
        raise PolicyViolation(f"path length {wanted} exceeds what the issuer allows ({limit - 1})")
    return wanted


def validity_window(
    issuer: x509.Certificate, now: datetime, validity: timedelta, backdate: timedelta
) -> tuple[datetime, datetime]:
    """notBefore (backdated for skewed device clocks) and notAfter, both inside the issuer's validity."""
    if not timedelta(0) <= backdate <= MAX_DURATION or not timedelta(0) < validity <= MAX_DURATION:
        raise UsageError("validity and backdate must be positive and at most 100 years")
    not_after_issuer = issuer.not_valid_after_utc
    if not_after_issuer <= now:
        raise PolicyViolation("the CA certificate has expired")
    not_before = max(now - backdate, issuer.not_valid_before_utc).replace(microsecond=0)
    not_after = min(now + validity, not_after_issuer).replace(microsecond=0)
    return not_before, not_after


def approve(
    csr: x509.CertificateSigningRequest,
    profile: Profile,
    issuer: x509.Certificate,
    *,
    now: datetime,
    backdate: timedelta,
    validity: timedelta | None = None,
    subject: x509.Name | None = None,
    sans: Sequence[x509.GeneralName] | None = None,
    path_length: int | None = None,
    identity_cn: str | None = None,
    constraints: x509.NameConstraints | None = None,
) -> Template:
    """Apply every rule of ``profile``; return the template or raise ``PolicyViolation``.

    ``identity_cn`` fills ``{cn}`` in the profile's name constraints (default: the subject's
    CN); ``constraints`` (a renewed certificate's) replaces them.
    """
    notes: list[str] = []
    if requests_ca(csr) and not profile.is_ca:
        raise PolicyViolation(
            f"CSR asks for a CA certificate (CA:TRUE) but profile {profile.name!r} is not a CA profile"
        )
    public_key = csr.public_key()
    check_key_policy(public_key)
    final_subject = subject if subject is not None else csr.subject
    check_subject(final_subject, profile)
    final_sans = tuple(sans) if sans else requested_sans(csr)
    check_sans(final_sans, profile)
    if profile.require_san and not final_sans:
        raise PolicyViolation(f"profile {profile.name!r} requires at least one subjectAltName")
    if not list(final_subject) and not final_sans:
        raise PolicyViolation("certificate would have neither a subject nor a subjectAltName")
    chosen_path_length = child_path_length(profile, issuer, path_length) if profile.is_ca else None
    if profile.is_ca and constraints is None:
        constraints = name_constraints(profile, identity_cn or subject_cn(final_subject))
    wanted = validity or profile.default_validity
    if wanted > profile.max_validity:
        notes.append(f"validity capped at the {profile.name} profile maximum of {profile.max_validity.days} days")
        wanted = profile.max_validity
    not_before, not_after = validity_window(issuer, now, wanted, backdate)
    if not_after < (now + wanted).replace(microsecond=0):
        notes.append("validity capped at the CA certificate's notAfter")
    return Template(
        subject=final_subject,
        public_key=public_key,
        sans=final_sans,
        not_before=not_before,
        not_after=not_after,
        profile=profile,
        path_length=chosen_path_length,
        notes=tuple(notes),
        name_constraints=constraints if profile.is_ca else None,
    )


def subject_cn(subject: x509.Name) -> str | None:
    """The single CN of ``subject`` as text, or None."""
    cns = subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if len(cns) == 1 else None
