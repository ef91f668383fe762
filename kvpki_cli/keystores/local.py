"""The embedded local key store: the CA key as a 0600 PKCS#8 file under KVPKI_HOME.

It is the default so kvpki works on a fresh machine without a cloud account.
With a passphrase the key is encrypted PKCS#8 (PBES2, PBKDF2-HMAC-SHA256 at
600,000 iterations, AES-256-CBC; see ``pkcs8``), which OpenSSL reads too; keys
written by older versions (2,048 iterations) still load.  A key file readable by
group or others, or a key directory others can write, is refused.

Passphrase rule, the same for ``KVPKI_LOCAL_PASSPHRASE`` and the passphrase
file: surrounding whitespace (spaces, tabs, newlines) is stripped; what remains
must not be empty.  An empty ``KVPKI_LOCAL_PASSPHRASE`` counts as unset.
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
from kvpki_cli.safepaths import check_trusted, check_trusted_path, make_private_dir

PASSPHRASE_ENV = "KVPKI_LOCAL_PASSPHRASE"
PASSPHRASE_FILE_ENV = "KVPKI_LOCAL_PASSPHRASE_FILE"
MAX_PASSPHRASE_FILE = 64 * 1024


def normalize_passphrase(raw: bytes, source: str) -> bytes:
    """The one whitespace rule for every passphrase source: strip both ends, refuse empty."""
    value = raw.strip()
    if not value:
        raise UsageError(f"{source} is empty")
    return value


def _passphrases(settings: Mapping[str, Any]) -> list[bytes]:
    """The passphrase to use (first), then any older reading of it that existing keys may need.

    kvpki 0.1.0 used ``KVPKI_LOCAL_PASSPHRASE`` verbatim; a key encrypted
    then with surrounding whitespace still decrypts (tried only after the first fails).
    """
    environb = getattr(os, "environb", None)
    raw = environb.get(PASSPHRASE_ENV.encode()) if environb is not None else None
    if raw is None and PASSPHRASE_ENV in os.environ:
        raw = os.environ[PASSPHRASE_ENV].encode(errors="surrogateescape")
    if raw:
        value = normalize_passphrase(raw, PASSPHRASE_ENV)
        return [value] if value == raw else [value, raw]
    path = os.environ.get(PASSPHRASE_FILE_ENV) or settings.get("passphrase_file")
    if path:
        from kvpki_cli.fileutil import read_secret_file

        try:  # a regular file or a pipe (process substitution); a FIFO without writer times out
            data = read_secret_file(Path(path).expanduser(), MAX_PASSPHRASE_FILE)
        except OSError as exc:
            raise UsageError(f"cannot read passphrase file {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_PASSPHRASE_FILE:
            raise UsageError(f"passphrase file {path} is larger than {MAX_PASSPHRASE_FILE} bytes")
        return [normalize_passphrase(data, f"passphrase file {path}")]
    return []


def _read_passphrase(settings: Mapping[str, Any]) -> bytes | None:
    """The passphrase from the environment, a passphrase file, or none."""
    candidates = _passphrases(settings)
    return candidates[0] if candidates else None


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
        """init-ca asks only when ca.json is absent: files here are what an interrupted init-ca left."""
        leftovers = [path.name for path in (self.key_path, self.chain_path) if path.exists()]
        if leftovers:
            raise AlreadyExists(
                f"CA {self.ca_name!r} was not completely created: {self.directory} holds {' and '.join(leftovers)} "
                "but the CA has no ca.json (an earlier init-ca was interrupted; nothing was issued under it): "
                "move that directory away and run init-ca again"
            )
        return False

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
        if passphrase:
            from kvpki_cli.keystores.pkcs8 import encrypt_pkcs8_pem

            der = key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            pem = encrypt_pkcs8_pem(der, passphrase)
        else:
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            warn(f"CA key {self.key_path} is stored unencrypted (set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV})")
        make_private_dir(self.directory, "CA key directory")
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
            st = os.fstat(handle.fileno())
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise BackendError(
                    f"refusing to use CA key {self.key_path}: readable by group or others (chmod 600 it)"
                )
            check_trusted(self.key_path, st, "CA key")
            check_trusted_path(self.directory, "CA key directory")
            pem = handle.read()
        key = self._decrypt(pem, _passphrases(self._settings))
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise BackendError(f"CA key {self.key_path} is neither RSA nor EC")
        self._key = key
        return key

    def _decrypt(self, pem: bytes, passphrases: list[bytes]) -> Any:
        """Load the key with the first passphrase that opens it (ValueError means wrong or corrupt)."""
        candidates: list[bytes | None] = [*passphrases] or [None]
        for passphrase in candidates:
            try:
                return load_pem_private_key(pem, passphrase)
            except TypeError:
                if passphrase:
                    raise BackendError(f"CA key {self.key_path} is not encrypted but a passphrase was given") from None
                raise BackendError(
                    f"CA key {self.key_path} is encrypted: set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV}"
                ) from None
            except ValueError:
                continue
        raise BackendError(f"cannot decrypt CA key {self.key_path}: wrong passphrase or corrupt file")

    def store_chain(self, chain: Sequence[x509.Certificate]) -> None:
        pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in chain)
        make_private_dir(self.directory, "CA key directory")
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

    def reachable(self) -> bool:
        """The key file can be opened for reading (no decryption: that stays in the signing path)."""
        try:
            os.close(os.open(self.key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)))
        except OSError:
            return False
        return True
