"""Encrypted PKCS#8 with a strong KDF: PBES2, PBKDF2-HMAC-SHA256 at 600,000 iterations, AES-256-CBC.

cryptography's ``BestAvailableEncryption`` uses 2,048 PBKDF2 iterations for
PKCS#8, which is weak for a long-lived CA key, and cryptography 50 has no PKCS#8
encryption builder to raise it.  The structure (RFC 8018) is small enough to
write here; OpenSSL (``openssl pkey -passin ...``), cryptography and every other
PKCS#8 reader decrypt it, so the key file stays portable.  Reading needs nothing
from this module: cryptography's loader handles any PBES2 parameters.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

# OWASP's 2023 figure for PBKDF2-HMAC-SHA256; about 0.1-0.4 s per decryption depending on the CPU.
PBKDF2_ITERATIONS = 600_000

_PBES2 = "1.2.840.113549.1.5.13"
_PBKDF2 = "1.2.840.113549.1.5.12"
_HMAC_SHA256 = "1.2.840.113549.2.9"
_AES256_CBC = "2.16.840.1.101.3.4.1.42"


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _sequence(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _octets(data: bytes) -> bytes:
    return _tlv(0x04, data)


def _integer(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    body = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


def encrypt_pkcs8_der(private_key_info: bytes, passphrase: bytes, iterations: int = PBKDF2_ITERATIONS) -> bytes:
    """EncryptedPrivateKeyInfo (DER) of an unencrypted PKCS#8 PrivateKeyInfo."""
    salt, iv = os.urandom(16), os.urandom(16)
    key = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    plaintext = padder.update(private_key_info) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    prf = _sequence(_oid(_HMAC_SHA256), b"\x05\x00")
    kdf = _sequence(_oid(_PBKDF2), _sequence(_octets(salt), _integer(iterations), prf))
    scheme = _sequence(_oid(_AES256_CBC), _octets(iv))
    algorithm = _sequence(_oid(_PBES2), _sequence(kdf, scheme))
    return _sequence(algorithm, _octets(ciphertext))


def encrypt_pkcs8_pem(private_key_info: bytes, passphrase: bytes, iterations: int = PBKDF2_ITERATIONS) -> bytes:
    """The same as PEM ("ENCRYPTED PRIVATE KEY"), 64-column base64 as OpenSSL writes it."""
    body = base64.b64encode(encrypt_pkcs8_der(private_key_info, passphrase, iterations))
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + lines + b"\n-----END ENCRYPTED PRIVATE KEY-----\n"
