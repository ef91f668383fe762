"""CA key types, the key aliases every layer signs with, the signing hash, and lean key loading.

This is the bottom of the import graph for keys: ``pki/`` and ``keystores/``
both import from here and ``pki/`` never imports ``keystores/``.

cryptography's public ``serialization`` package pulls in its SSH support
(dataclasses, inspect, ciphers, bcrypt): about 10 ms, a sixth of a `sign-csr`
process.  ``Encoding``, ``PublicFormat`` and ``load_pem_private_key`` are thin
aliases of what that package re-exports; if a cryptography release moves them,
the public package is used instead (slower, same result).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

try:
    from cryptography.hazmat.primitives._serialization import Encoding, PublicFormat
except ImportError:  # pragma: no cover - depends on the cryptography release
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

__all__ = [
    "CAPrivateKey",
    "CAPublicKey",
    "Encoding",
    "KeyType",
    "PublicFormat",
    "load_pem_private_key",
    "signing_hash",
]

CAPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
CAPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class KeyType(enum.StrEnum):
    """CA key algorithms kvpki can create (the names are the CLI contract)."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @property
    def is_ec(self) -> bool:
        return self.value.startswith("ec-")

    @property
    def rsa_bits(self) -> int:
        return int(self.value.split("-")[1])

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP384R1() if self is KeyType.EC_P384 else ec.SECP256R1()


def signing_hash(key: CAPrivateKey | CertificatePublicKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384 keys, SHA-256 otherwise."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _pem_private_key_loader() -> Callable[..., Any]:
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        return rust_openssl.keys.load_pem_private_key
    except (ImportError, AttributeError):  # pragma: no cover - depends on the cryptography release
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        return load_pem_private_key


def load_pem_private_key(data: bytes, password: bytes | None) -> Any:
    """Same contract as ``serialization.load_pem_private_key`` (ValueError/TypeError on failure)."""
    return _pem_private_key_loader()(data, password)
