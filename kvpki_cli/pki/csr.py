"""Reading and checking certificate signing requests: the untrusted input of a CA.

Accepts PEM (text around the block is ignored, as openssl ignores it), DER or bare
base64 (with or without line breaks, as EST bodies arrive), verifies proof of
possession and the key policy.  ``parse_csr`` is the one validation boundary: it
touches every part of the request the core will read (public key, subject,
extensions, attributes) and turns whatever the parser raises into ``InvalidInput``
or ``PolicyViolation``, so nothing behind it meets a malformed value.  Pure functions, no I/O.
"""

from __future__ import annotations

import warnings

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvpki_cli.errors import InvalidInput, PolicyViolation
from kvpki_cli.pki.pem import b64decode, pem_or_der

MAX_CSR_BYTES = 64 * 1024
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
CSR_PEM_LABELS = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")

# What cryptography raises for structures it parses lazily (on first access) or cannot represent.
_MALFORMED = (
    ValueError,
    TypeError,
    OverflowError,
    UnicodeError,
    UserWarning,
    x509.DuplicateExtension,
    x509.InvalidVersion,
)
_KEY_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm)


def decode_csr_bytes(data: bytes) -> bytes:
    """Return DER from PEM, DER or base64 input, or raise ``InvalidInput``."""
    if len(data) > MAX_CSR_BYTES:
        raise InvalidInput(f"CSR input is too large ({len(data)} bytes; limit {MAX_CSR_BYTES})")
    if not data.strip():
        raise InvalidInput("CSR input is empty")
    der = pem_or_der(data, CSR_PEM_LABELS, "CSR input")
    return der if der is not None else b64decode(data, "CSR input")


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse and verify a CSR: structure, proof of possession, key policy, every field readable."""
    der = decode_csr_bytes(data)
    try:
        csr = x509.load_der_x509_csr(der)
    except _MALFORMED:
        raise InvalidInput("CSR is malformed (not a valid PKCS#10 structure)") from None
    try:
        public_key = csr.public_key()
    except _KEY_ERRORS as exc:
        raise PolicyViolation(f"CSR key type is not supported ({exc}); use RSA >= 2048 or EC P-256/P-384") from None
    check_key_policy(public_key)
    if not _signature_valid(csr):
        raise InvalidInput("CSR signature does not verify (no proof of possession of the private key)")
    _read_every_field(csr)
    return csr


def _signature_valid(csr: x509.CertificateSigningRequest) -> bool:
    try:
        return bool(csr.is_signature_valid)
    except Exception:  # unsupported or malformed signature algorithms raise assorted errors
        return False


def _read_every_field(csr: x509.CertificateSigningRequest) -> None:
    """Parse everything the core reads later, and re-encode what it copies into the certificate."""
    with warnings.catch_warnings():
        # cryptography only warns about subject attributes outside their X.520 size bounds
        warnings.simplefilter("error", UserWarning)
        try:
            subject = csr.subject
            for attribute in subject:
                _ = (attribute.oid.dotted_string, attribute.value)
            subject.rfc4514_string()
            subject.public_bytes()
            for extension in csr.extensions:
                value = extension.value
                if isinstance(value, x509.SubjectAlternativeName):
                    _ = [str(getattr(name, "value", name)) for name in value]
                    value.public_bytes()
            for attribute in csr.attributes:
                _ = (attribute.oid.dotted_string, attribute.value)
        except x509.UnsupportedGeneralNameType:
            raise PolicyViolation("CSR asks for a SAN type that is not allowed (x400Address, EDIPartyName)") from None
        except x509.DuplicateExtension as exc:
            raise InvalidInput(f"CSR has more than one {exc.oid.dotted_string} extension (RFC 5280 4.2)") from None
        except _MALFORMED as exc:
            raise InvalidInput(f"CSR contains a malformed subject, extension or attribute: {exc}") from None


def check_key_policy(public_key: object) -> None:
    """RSA 2048..8192 with e=65537, or EC P-256/P-384; anything else is refused."""
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if bits < MIN_RSA_BITS:
            raise PolicyViolation(f"RSA key of {bits} bits is too weak (minimum {MIN_RSA_BITS})")
        if bits > MAX_RSA_BITS:
            raise PolicyViolation(f"RSA key of {bits} bits is larger than the maximum {MAX_RSA_BITS}")
        exponent = public_key.public_numbers().e
        if exponent != 65537:
            raise PolicyViolation(f"RSA public exponent {exponent} is not allowed (only 65537)")
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise PolicyViolation(f"EC curve {public_key.curve.name} is not allowed (use P-256 or P-384)")
        return
    kind = type(public_key).__name__.replace("PublicKey", "").lstrip("_") or "unknown"
    raise PolicyViolation(f"{kind} keys are not allowed (use RSA >= 2048 or EC P-256/P-384)")
