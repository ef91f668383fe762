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
    """CA key and chain in ``$KVPKI_HOME/cas/<name>/`` (key.pem, chain.pem; key.<k>.pem, chain.<k>.pem
    for the generations ``kvpki rollover`` adds)."""

    def __init__(self, ca_name: str, settings: Mapping[str, Any], home: Path) -> None:
        self.ca_name = ca_name
        self._settings = settings
        directory = settings.get("directory")
        self.directory = Path(directory).expanduser() if directory else home / "cas" / ca_name
        self.key_path = self.directory / "key.pem"
        self.chain_path = self.directory / "chain.pem"
        self._key: CAPrivateKey | None = None
        self._generation_keys: dict[int, CAPrivateKey] = {}

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
        return self._create_key_file(self.key_path, key_type)

    def _create_key_file(self, path: Path, key_type: KeyType) -> CAPublicKey:
        if path.exists():
            raise AlreadyExists(f"CA {self.ca_name!r} already has a key at {path}")
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
            warn(f"CA key {path} is stored unencrypted (set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV})")
        make_private_dir(self.directory, "CA key directory")
        write_file_atomic(path, pem, mode=0o600, overwrite=False)
        if path == self.key_path:
            self._key = key
        return key.public_key()

    # --- generations: 0 is key.pem + chain.pem (as before any rollover); k >= 1 is key.k.pem + chain.k.pem.
    # chain.k.pem is written last: its presence makes generation k current.

    def _paths(self, generation: int) -> tuple[Path, Path]:
        if generation == 0:
            return self.key_path, self.chain_path
        return self.directory / f"key.{generation}.pem", self.directory / f"chain.{generation}.pem"

    def generations(self) -> list[int]:
        found = [0]
        while self._paths(found[-1] + 1)[1].exists():
            found.append(found[-1] + 1)
        return found

    def current_generation(self) -> int:
        return self.generations()[-1]

    def signer_for(self, generation: int) -> CAPrivateKey:
        if generation == 0:
            if self._key is None:
                self._key = self._load_key(self.key_path)
            return self._key
        key = self._generation_keys.get(generation)
        if key is None:
            key = self._generation_keys[generation] = self._load_key(self._paths(generation)[0])
        return key

    def signer(self) -> CAPrivateKey:
        """The current generation's key (the one matching ``load_chain()[0]``)."""
        return self.signer_for(self.current_generation())

    def chain_for(self, generation: int) -> list[x509.Certificate]:
        return self._read_chain(self._paths(generation)[1])

    def load_chain(self) -> list[x509.Certificate]:
        return self.chain_for(self.current_generation())

    def create_next_key(self, key_type: KeyType) -> tuple[int, CAPublicKey]:
        generation = self.current_generation() + 1
        key_path = self._paths(generation)[0]
        key_path.unlink(missing_ok=True)  # a key left by a rollover that failed before its chain was stored
        return generation, self._create_key_file(key_path, key_type)

    def store_generation_chain(self, generation: int, chain: Sequence[x509.Certificate]) -> None:
        pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in chain)
        write_file_atomic(self._paths(generation)[1], pem, mode=0o644, overwrite=False)

    def discard_generation(self, generation: int) -> None:
        if generation > 0:
            for path in self._paths(generation):
                path.unlink(missing_ok=True)

    def _load_key(self, key_path: Path) -> CAPrivateKey:
        try:
            fd = os.open(key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise NotFound(f"CA {self.ca_name!r} has no key at {key_path}") from None
        except OSError as exc:
            raise BackendError(f"cannot open CA key {key_path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise BackendError(f"refusing to use CA key {key_path}: readable by group or others (chmod 600 it)")
            check_trusted(key_path, st, "CA key")
            check_trusted_path(self.directory, "CA key directory")
            pem = handle.read()
        key = self._decrypt(pem, _passphrases(self._settings), key_path)
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise BackendError(f"CA key {key_path} is neither RSA nor EC")
        return key

    def _decrypt(self, pem: bytes, passphrases: list[bytes], key_path: Path | None = None) -> Any:
        """Load the key with the first passphrase that opens it (ValueError means wrong or corrupt)."""
        key_path = key_path or self.key_path
        candidates: list[bytes | None] = [*passphrases] or [None]
        for passphrase in candidates:
            try:
                return load_pem_private_key(pem, passphrase)
            except TypeError:
                if passphrase:
                    raise BackendError(f"CA key {key_path} is not encrypted but a passphrase was given") from None
                raise BackendError(
                    f"CA key {key_path} is encrypted: set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV}"
                ) from None
            except ValueError:
                continue
        raise BackendError(f"cannot decrypt CA key {key_path}: wrong passphrase or corrupt file")

    def store_chain(self, chain: Sequence[x509.Certificate]) -> None:
        pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in chain)
        make_private_dir(self.directory, "CA key directory")
        write_file_atomic(self.chain_path, pem, mode=0o644, overwrite=True)

    def _read_chain(self, chain_path: Path) -> list[x509.Certificate]:
        try:
            pem = chain_path.read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"CA {self.ca_name!r} has no certificate (run 'kvpki init-ca --name {self.ca_name}')"
            ) from None
        except OSError as exc:
            raise BackendError(f"cannot read {chain_path}: {exc.strerror}") from None
        return x509.load_pem_x509_certificates(pem)

    def discard(self) -> None:
        for path in (self.key_path, self.chain_path):  # init-ca only: no later generations exist yet
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
