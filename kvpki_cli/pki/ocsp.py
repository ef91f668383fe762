"""Building OCSP (RFC 6960) responses and delegated responder certificates; ``serve/`` only publishes them.

A delegated responder (RFC 6960 4.2.2.2) is an end-entity certificate issued
directly by the CA with EKU id-kp-OCSPSigning and id-pkix-ocsp-nocheck: its key
signs the responses, so answering OCSP costs no CA-key (Key Vault) signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvpki_cli.errors import UsageError
from kvpki_cli.pki.certificates import authority_key_identifier, key_usage
from kvpki_cli.pki.crl import REASONS
from kvpki_cli.pki.keys import CAPrivateKey, Encoding, PublicFormat, signing_hash

RESPONDER_PROFILE = "ocsp-responder"  # the profile name recorded in the CA's inventory


@dataclass(frozen=True)
class Responder:
    """Who signs responses: the CA itself (``certificate`` is the CA's) or a delegated responder."""

    certificate: x509.Certificate
    key: CAPrivateKey
    delegated: bool = True


@dataclass(frozen=True)
class OcspQuery:
    """What a single-certificate OCSP request asks: the certificate ID and an optional nonce."""

    algorithm: hashes.HashAlgorithm
    name_hash: bytes
    key_hash: bytes
    serial: int
    nonce: x509.OCSPNonce | None

    @property
    def cert_id(self) -> tuple[str, bytes, bytes, int]:
        return (self.algorithm.name, self.name_hash, self.key_hash, self.serial)


def parse_request(der: bytes) -> OcspQuery | None:
    """The request's certificate ID and nonce; None when it is malformed or unsupported."""
    try:
        request = ocsp.load_der_ocsp_request(der)
        nonce = None
        for extension in request.extensions:
            if isinstance(extension.value, x509.OCSPNonce):
                nonce = extension.value
        return OcspQuery(
            request.hash_algorithm, request.issuer_name_hash, request.issuer_key_hash, request.serial_number, nonce
        )
    except (ValueError, NotImplementedError, UnsupportedAlgorithm, x509.UnsupportedGeneralNameType):
        return None


def _key_bits(certificate: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents, which issuerKeyHash hashes."""
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(Encoding.DER, PublicFormat.PKCS1)
    raise UsageError("unsupported CA key type for OCSP")


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def issued_by(query: OcspQuery, issuer: x509.Certificate) -> bool:
    """True when the request's issuer name and key hashes are those of ``issuer``."""
    return (query.name_hash, query.key_hash) == (
        _digest(query.algorithm, issuer.subject.public_bytes()),
        _digest(query.algorithm, _key_bits(issuer)),
    )


@dataclass(frozen=True)
class CertStatus:
    """A certificate's status as the inventory says (``status`` is good, revoked or unknown)."""

    status: ocsp.OCSPCertStatus
    revoked_at: datetime | None = None
    reason: str | None = None


def build_response(
    query: OcspQuery,
    status: CertStatus,
    responder: Responder,
    this_update: datetime,
    next_update: datetime,
    *,
    echo_nonce: bool,
) -> bytes:
    """A signed, successful OCSPResponse (DER); the responder certificate is included when delegated."""
    reason = REASONS[status.reason] if status.reason and status.reason != "unspecified" else None
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            query.name_hash,
            query.key_hash,
            query.serial,
            query.algorithm,
            status.status,
            this_update,
            next_update,
            status.revoked_at if status.status == ocsp.OCSPCertStatus.REVOKED else None,
            reason if status.status == ocsp.OCSPCertStatus.REVOKED else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder.certificate)
    )
    if responder.delegated:
        builder = builder.certificates([responder.certificate])
    if echo_nonce and query.nonce is not None:
        builder = builder.add_extension(query.nonce, critical=False)
    return builder.sign(responder.key, signing_hash(responder.key)).public_bytes(Encoding.DER)


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(Encoding.DER)


def responder_subject(ca_subject: x509.Name) -> x509.Name:
    """The CA's subject with its CN replaced by "<CA CN> OCSP Responder" (at most 64 characters)."""
    cns = ca_subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    base = str(cns[0].value) if cns else "CA"
    cn = x509.NameAttribute(NameOID.COMMON_NAME, f"{base[: 64 - 15]} OCSP Responder")
    rdns = [rdn for rdn in ca_subject.rdns if not any(a.oid == NameOID.COMMON_NAME for a in rdn)]
    return x509.Name([*rdns, x509.RelativeDistinguishedName([cn])])


def responder_certificate(
    ca_certificate: x509.Certificate,
    ca_signer: CAPrivateKey,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A delegated OCSP responder certificate (RFC 6960 4.2.2.2), signed by the CA key.

    EKU id-kp-OCSPSigning only, KU digitalSignature, id-pkix-ocsp-nocheck (clients do not
    check the responder's own revocation, so its lifetime is kept short), no CA flag.
    """
    return (
        x509.CertificateBuilder()
        .subject_name(responder_subject(ca_certificate.subject))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before.replace(microsecond=0))
        .not_valid_after(not_after.replace(microsecond=0))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(frozenset({"digital_signature"})), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(ca_certificate), critical=False)
        .sign(ca_signer, signing_hash(ca_signer))
    )
