"""Reading and checking certificate signing requests: the untrusted input of a CA.

Accepts PEM, DER or bare base64 (with or without line breaks, as EST bodies
arrive), verifies proof of possession and the key policy.  Pure functions, no I/O.
"""

from __future__ import annotations

import binascii
import re
import warnings

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvpki_cli.errors import InvalidInput, PolicyViolation

MAX_CSR_BYTES = 64 * 1024
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

_PEM_CSR_BLOCK = re.compile(
    rb"-----BEGIN (NEW )?CERTIFICATE REQUEST-----\r?\n(.*?)-----END (?:NEW )?CERTIFICATE REQUEST-----", re.S
)
_PEM_ANY = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_WHITESPACE = re.compile(rb"\s+")


def decode_csr_bytes(data: bytes) -> bytes:
    """Return DER from PEM, DER or base64 input, or raise ``InvalidInput``."""
    if len(data) > MAX_CSR_BYTES:
        raise InvalidInput(f"CSR input is too large ({len(data)} bytes; limit {MAX_CSR_BYTES})")
    if data[:1] == b"\x30":
        return data
    stripped = data.strip()
    if not stripped:
        raise InvalidInput("CSR input is empty")
    if stripped.startswith(b"-----BEGIN"):
        match = _PEM_CSR_BLOCK.match(stripped)
        if match is None:
            label = _PEM_ANY.match(stripped)
            name = label.group(1).decode() if label else "unknown"
            raise InvalidInput(f"expected a PEM 'CERTIFICATE REQUEST' block, got '{name}'")
        return _b64decode(match.group(2))
    return _b64decode(stripped)


def _b64decode(text: bytes) -> bytes:
    compact = _WHITESPACE.sub(b"", text)
    try:
        return binascii.a2b_base64(compact, strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("CSR input is neither PEM, DER nor valid base64") from None


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse and verify a CSR: structure, proof of possession and key policy."""
    der = decode_csr_bytes(data)
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        raise InvalidInput("CSR is malformed (not a valid PKCS#10 structure)") from None
    try:
        public_key = csr.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise PolicyViolation(f"CSR public key is not supported: {exc}") from None
    check_key_policy(public_key)
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, x509.UnsupportedGeneralNameType):
        signature_ok = False
    except Exception:  # unsupported signature algorithm raises assorted errors
        signature_ok = False
    if not signature_ok:
        raise InvalidInput("CSR signature does not verify (no proof of possession of the private key)")
    with warnings.catch_warnings():
        # cryptography only warns about subject attributes outside their X.520 size bounds
        warnings.simplefilter("error", UserWarning)
        try:
            _ = (csr.subject, csr.extensions)
        except (ValueError, UserWarning) as exc:
            raise InvalidInput(f"CSR contains a malformed subject or extension: {exc}") from None
    return csr


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
