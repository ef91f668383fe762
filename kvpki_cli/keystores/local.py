"""The embedded local key store: the CA key as a 0600 PKCS#8 file under KVPKI_HOME.

It is the default so kvpki works on a fresh machine without a cloud account.
The key is encrypted with the best available PKCS#8 encryption when a
passphrase is configured; a key file readable by group or others is refused.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvpki_cli.errors import AlreadyExists, BackendError, NotFound, UsageError
from kvpki_cli.fileutil import write_file_atomic
from kvpki_cli.keystores.base import KeyStore
from kvpki_cli.messages import warn
from kvpki_cli.pki.keys import CAPrivateKey, CAPublicKey, Encoding, KeyType, load_pem_private_key

PASSPHRASE_ENV = "KVPKI_LOCAL_PASSPHRASE"
PASSPHRASE_FILE_ENV = "KVPKI_LOCAL_PASSPHRASE_FILE"


def _read_passphrase(settings: Mapping[str, Any]) -> bytes | None:
    """The passphrase from the environment, a passphrase file, or none."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value.encode()
    path = os.environ.get(PASSPHRASE_FILE_ENV) or settings.get("passphrase_file")
    if path:
        try:
            data = Path(path).expanduser().read_bytes().strip()
        except OSError as exc:
            raise UsageError(f"cannot read passphrase file {path}: {exc.strerror}") from None
        if not data:
            raise UsageError(f"passphrase file {path} is empty")
        return data
    return None


class LocalKeyStore(KeyStore):
    """CA key and chain in ``$KVPKI_HOME/cas/<name>/`` (key.pem, chain.pem)."""

    def __init__(self, ca_name: str, settings: Mapping[str, Any], home: Path) -> None:
        self.ca_name = ca_name
        self._settings = settings
        directory = settings.get("directory")
        self.directory = Path(directory).expanduser() if directory else home / "cas" / ca_name
        self.key_path = self.directory / "key.pem"
        self.chain_path = self.directory / "chain.pem"
        self._key: CAPrivateKey | None = None

    def exists(self) -> bool:
        return self.key_path.exists() or self.chain_path.exists()

    def create_key(self, key_type: KeyType) -> CAPublicKey:
        if self.key_path.exists():
            raise AlreadyExists(f"CA {self.ca_name!r} already has a key at {self.key_path}")
        key: CAPrivateKey
        if key_type.is_ec:
            key = ec.generate_private_key(key_type.curve)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=key_type.rsa_bits)
        from cryptography.hazmat.primitives import serialization  # only when creating a key

        passphrase = _read_passphrase(self._settings)
        encryption: serialization.KeySerializationEncryption
        if passphrase:
            encryption = serialization.BestAvailableEncryption(passphrase)
        else:
            encryption = serialization.NoEncryption()
            warn(f"CA key {self.key_path} is stored unencrypted (set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV})")
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file_atomic(self.key_path, pem, mode=0o600, overwrite=False)
        self._key = key
        return key.public_key()

    def signer(self) -> CAPrivateKey:
        if self._key is not None:
            return self._key
        try:
            fd = os.open(self.key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise NotFound(f"CA {self.ca_name!r} has no key at {self.key_path}") from None
        except OSError as exc:
            raise BackendError(f"cannot open CA key {self.key_path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & 0o077:
                raise BackendError(
                    f"refusing to use CA key {self.key_path}: readable by group or others (chmod 600 it)"
                )
            pem = handle.read()
        passphrase = _read_passphrase(self._settings)
        try:
            key = load_pem_private_key(pem, passphrase)
        except TypeError:
            if passphrase:
                raise BackendError(f"CA key {self.key_path} is not encrypted but a passphrase was given") from None
            raise BackendError(
                f"CA key {self.key_path} is encrypted: set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV}"
            ) from None
        except ValueError:
            raise BackendError(f"cannot decrypt CA key {self.key_path}: wrong passphrase or corrupt file") from None
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise BackendError(f"CA key {self.key_path} is neither RSA nor EC")
        self._key = key
        return key

    def store_chain(self, chain: Sequence[x509.Certificate]) -> None:
        pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in chain)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file_atomic(self.chain_path, pem, mode=0o644, overwrite=True)

    def load_chain(self) -> list[x509.Certificate]:
        try:
            pem = self.chain_path.read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"CA {self.ca_name!r} has no certificate (run 'kvpki init-ca --name {self.ca_name}')"
            ) from None
        except OSError as exc:
            raise BackendError(f"cannot read {self.chain_path}: {exc.strerror}") from None
        return x509.load_pem_x509_certificates(pem)

    def discard(self) -> None:
        for path in (self.key_path, self.chain_path):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()
