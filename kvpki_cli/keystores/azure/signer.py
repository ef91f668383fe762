"""Private-key objects whose ``sign()`` asks Azure Key Vault to sign a locally computed digest.

They subclass ``cryptography``'s RSA/EC private key ABCs, so certificate, CRL and
OCSP builders call our Python ``sign()`` and need no vault-specific code.  The
key material never leaves the vault: export and decryption/exchange raise.

Every signature the vault returns is verified locally with the public key kvpki
put into the issuer certificate (~0.1 ms): if a cached chain ever names a key that
is not the vault key, nothing signed with the mismatch leaves kvpki.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from kvpki_cli.errors import BackendError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import serialization

# (JWS algorithm, digest) -> raw signature bytes from the vault
SignDigest = Callable[[str, bytes], bytes]

_HASH_SUFFIX = {"sha256": "256", "sha384": "384", "sha512": "512"}


def _digest(data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed) -> tuple[bytes, hashes.HashAlgorithm]:
    """Hash locally (the vault signs digests); pass pre-hashed input through."""
    if isinstance(algorithm, utils.Prehashed):
        hash_alg = algorithm._algorithm
        if len(data) != hash_alg.digest_size:
            raise ValueError("prehashed data does not match the digest size")
        return data, hash_alg
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize(), algorithm


def _suffix(hash_alg: hashes.HashAlgorithm) -> str:
    suffix = _HASH_SUFFIX.get(hash_alg.name)
    if suffix is None:
        raise BackendError(f"Azure Key Vault cannot sign with {hash_alg.name} (use SHA-256, SHA-384 or SHA-512)")
    return suffix


def _mismatch(on_mismatch: Callable[[], None]) -> NoReturn:
    on_mismatch()
    raise BackendError(
        "the signature made by the Key Vault key does not verify with the CA certificate's public key "
        "(cached CA data cleared; run the command again)"
    )


def _not_exportable(what: str) -> NoReturn:
    raise BackendError(f"cannot {what}: the CA key is non-exportable and held in Azure Key Vault")


class VaultECPrivateKey(ec.EllipticCurvePrivateKey):
    """An EC key in Key Vault; ``sign()`` returns DER ECDSA (the vault answers raw r||s)."""

    def __init__(
        self, public: ec.EllipticCurvePublicKey, sign_digest: SignDigest, on_mismatch: Callable[[], None]
    ) -> None:
        self._public = public
        self._sign_digest = sign_digest
        self._on_mismatch = on_mismatch

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(
        self, data: bytes | bytearray | memoryview, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise BackendError("Azure Key Vault EC keys sign with ECDSA only")
        digest, hash_alg = _digest(bytes(data), signature_algorithm.algorithm)
        raw = self._sign_digest(f"ES{_suffix(hash_alg)}", digest)
        size = (self.curve.key_size + 7) // 8
        if len(raw) != 2 * size:
            raise BackendError(f"Key Vault returned a {len(raw)}-byte ECDSA signature, expected {2 * size}")
        der = utils.encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
        try:
            self._public.verify(der, digest, ec.ECDSA(utils.Prehashed(hash_alg)))
        except InvalidSignature:
            _mismatch(self._on_mismatch)
        return der

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _not_exportable("do ECDH")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _not_exportable("export private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _not_exportable("serialize the private key")

    def __copy__(self) -> VaultECPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> VaultECPrivateKey:
        return self


class VaultRSAPrivateKey(rsa.RSAPrivateKey):
    """An RSA key in Key Vault: PKCS#1 v1.5 -> RS*, PSS (salt = digest length) -> PS*."""

    def __init__(self, public: rsa.RSAPublicKey, sign_digest: SignDigest, on_mismatch: Callable[[], None]) -> None:
        self._public = public
        self._sign_digest = sign_digest
        self._on_mismatch = on_mismatch

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: bytes,
        padding_: AsymmetricPadding,
        algorithm: utils.Prehashed | hashes.HashAlgorithm | utils.NoDigestInfo,
    ) -> bytes:
        if isinstance(algorithm, utils.NoDigestInfo):
            raise BackendError("Azure Key Vault signs digests only (NoDigestInfo is not supported)")
        digest, hash_alg = _digest(bytes(data), algorithm)
        suffix = _suffix(hash_alg)
        if isinstance(padding_, padding.PKCS1v15):
            return self._verified(self._sign_digest(f"RS{suffix}", digest), digest, padding_, hash_alg)
        if isinstance(padding_, padding.PSS):
            salt = padding_._salt_length
            mgf_hash = getattr(padding_._mgf, "_algorithm", None)
            if not (salt is padding.PSS.DIGEST_LENGTH or salt == hash_alg.digest_size):
                raise BackendError("Azure Key Vault PSS signatures use salt length = digest length")
            if mgf_hash is not None and mgf_hash.name != hash_alg.name:
                raise BackendError("Azure Key Vault PSS signatures use MGF1 with the signing hash")
            pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
            return self._verified(self._sign_digest(f"PS{suffix}", digest), digest, pss, hash_alg)
        raise BackendError(f"Azure Key Vault RSA keys cannot sign with {padding_.name} padding")

    def _verified(
        self, signature: bytes, digest: bytes, padding_: AsymmetricPadding, hash_alg: hashes.HashAlgorithm
    ) -> bytes:
        try:
            self._public.verify(signature, digest, padding_, utils.Prehashed(hash_alg))
        except InvalidSignature:
            _mismatch(self._on_mismatch)
        return signature

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        _not_exportable("decrypt locally")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _not_exportable("export private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _not_exportable("serialize the private key")

    def __copy__(self) -> VaultRSAPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> VaultRSAPrivateKey:
        return self


def vault_private_key(
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    sign_digest: SignDigest,
    on_mismatch: Callable[[], None] = lambda: None,
) -> VaultRSAPrivateKey | VaultECPrivateKey:
    """The signer object matching ``public``'s algorithm; ``on_mismatch`` runs when a signature does not verify."""
    if isinstance(public, rsa.RSAPublicKey):
        return VaultRSAPrivateKey(public, sign_digest, on_mismatch)
    return VaultECPrivateKey(public, sign_digest, on_mismatch)
