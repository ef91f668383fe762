"""The delegated OCSP responder's life: issue (`kvpki init-ocsp-responder`), find, renew.

Each responder lives in ``$KVPKI_HOME/cas/<ca>/ocsp-responder/<serial>/`` as
``key.pem`` (0600, encrypted like local CA keys when a local passphrase is set)
and ``cert.pem``; the directory tree is 0700.  A renewal writes a new directory,
so a reader never sees half a responder, and the current responder is simply
the valid one that expires last.  Issuing costs one CA signature (a vault sign on
Key Vault); every OCSP response after that is signed with the responder's local
key.  Renewals by several ``serve`` processes sharing a home are serialised by a
lock file, so they issue one new responder, not one each.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from kvpki_cli.authority import CertificateAuthority, utcnow
from kvpki_cli.errors import BackendError, KvpkiError, UsageError
from kvpki_cli.fileutil import write_file_atomic
from kvpki_cli.inventory.base import CertificateRecord
from kvpki_cli.pki.certificates import new_serial_number
from kvpki_cli.pki.keys import Encoding, load_pem_private_key
from kvpki_cli.pki.ocsp import RESPONDER_PROFILE, Responder, responder_certificate
from kvpki_cli.safepaths import make_private_dir
from kvpki_cli.textsafe import requester_text

DIRECTORY = "ocsp-responder"
DEFAULT_VALIDITY = timedelta(days=7)
RENEW_FRACTION = 1 / 3  # renew when less than this share of the lifetime is left
log = logging.getLogger("kvpki.serve")


def responder_root(ca: CertificateAuthority) -> Path:
    return ca.settings.ca_directory(ca.name) / DIRECTORY


def _passphrase() -> bytes | None:
    from kvpki_cli.keystores.local import _read_passphrase

    return _read_passphrase({})


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    passphrase = _passphrase()
    if passphrase:
        from kvpki_cli.keystores.pkcs8 import encrypt_pkcs8_pem

        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return encrypt_pkcs8_pem(der, passphrase)
    plain = serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, plain)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    make_private_dir(root, "OCSP responder directory")
    with os.fdopen(os.open(root / ".lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def issue_responder(ca: CertificateAuthority, validity: timedelta, requester: str) -> x509.Certificate:
    """Create a key, have the CA sign a responder certificate for it, record it, store both."""
    if validity < timedelta(hours=1):
        raise UsageError("--validity of an OCSP responder must be at least 1h")
    with _locked(responder_root(ca)):
        return _issue(ca, validity, requester)


def _issue(ca: CertificateAuthority, validity: timedelta, requester: str) -> x509.Certificate:
    issuer = ca.certificate
    ca_key = issuer.public_key()
    p384 = isinstance(ca_key, ec.EllipticCurvePublicKey) and ca_key.curve.key_size >= 384
    key = ec.generate_private_key(ec.SECP384R1() if p384 else ec.SECP256R1())
    now = utcnow()
    not_before = max(now - ca.config.backdate, issuer.not_valid_before_utc)
    not_after = min(now + validity, issuer.not_valid_after_utc)
    serial = new_serial_number()
    certificate = responder_certificate(issuer, ca.keystore.signer(), key.public_key(), serial, not_before, not_after)
    directory = responder_root(ca) / format(serial, "x")
    make_private_dir(directory, "OCSP responder directory")
    try:
        _store(ca, directory, key, certificate, requester)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)  # nothing changed on failure
        raise
    return certificate


def _store(
    ca: CertificateAuthority,
    directory: Path,
    key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    requester: str,
) -> None:
    """Key, inventory row, then certificate: a directory without cert.pem is never used (see _candidates)."""
    write_file_atomic(directory / "key.pem", _key_pem(key), mode=0o600, overwrite=False)
    der = certificate.public_bytes(Encoding.DER)
    serial = certificate.serial_number
    ca.inventory.record_issued(
        [
            CertificateRecord(
                ca=ca.name,
                serial=format(serial, "x"),
                subject=certificate.subject.rfc4514_string(),
                sans=(),
                profile=RESPONDER_PROFILE,
                requester=requester_text(requester),
                not_before=certificate.not_valid_before_utc,
                not_after=certificate.not_valid_after_utc,
                csr_sha256="",  # no CSR: kvpki made the key (as init-ca records sub-CAs)
                der=der,
            )
        ]
    )
    write_file_atomic(directory / "cert.pem", certificate.public_bytes(Encoding.PEM), mode=0o644, overwrite=False)


def _candidates(ca: CertificateAuthority, now: datetime) -> list[tuple[Path, x509.Certificate]]:
    """Stored responder certificates of this CA that are valid now, latest expiry first."""
    root = responder_root(ca)
    if not root.is_dir():
        return []
    found = []
    for directory in root.iterdir():
        try:
            certificate = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
            certificate.verify_directly_issued_by(ca.certificate)
        except (OSError, ValueError, TypeError, InvalidSignature):
            continue  # half-written, foreign or from a replaced CA: never used
        if certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            found.append((directory, certificate))
    return sorted(found, key=lambda item: item[1].not_valid_after_utc, reverse=True)


_loaded: dict[tuple[Path, int], ec.EllipticCurvePrivateKey] = {}  # decrypting may take 0.3 s: once per file


def load_key(directory: Path) -> ec.EllipticCurvePrivateKey:
    path = directory / "key.pem"
    try:
        st = path.stat()
        if st.st_mode & 0o077:
            raise BackendError(f"refusing OCSP responder key {path}: readable by group or others (chmod 600 it)")
        cached = _loaded.get((path, st.st_mtime_ns))
        if cached is not None:
            return cached
        key = load_pem_private_key(path.read_bytes(), _passphrase())
    except OSError as exc:
        raise BackendError(f"cannot read OCSP responder key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise BackendError(f"cannot load OCSP responder key {path}: wrong passphrase or corrupt file") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BackendError(f"OCSP responder key {path} is not an EC key")
    _loaded[(path, st.st_mtime_ns)] = key
    return key


def current_responder(ca: CertificateAuthority, now: datetime | None = None) -> Responder | None:
    """The valid stored responder that expires last, or None (then the CA key signs)."""
    for directory, certificate in _candidates(ca, now or utcnow()):
        key = load_key(directory)
        if key.public_key() == certificate.public_key():
            return Responder(certificate, key, delegated=True)
    return None


def needs_renewal(certificate: x509.Certificate, now: datetime) -> bool:
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    return certificate.not_valid_after_utc - now < lifetime * RENEW_FRACTION


def refresh(ca: CertificateAuthority, requester: str = "serve:ocsp-renewal") -> Responder | None:
    """The current responder, renewed first (same lifetime, new key) when less than a third is left.

    With no responder at all this returns None: responders are created only by
    ``kvpki init-ocsp-responder``.  Expired responder directories are removed.
    """
    now = utcnow()
    current = current_responder(ca, now)
    if current is None and not _stored(ca):
        return None
    if current is not None and not needs_renewal(current.certificate, now):
        return current
    with _locked(responder_root(ca)):
        current = current_responder(ca, now) or current  # another process may have renewed meanwhile
        if current is None or needs_renewal(current.certificate, now):
            if current is None:  # all expired (the server was down): start again with the default lifetime
                lifetime = DEFAULT_VALIDITY
            else:
                old = current.certificate
                lifetime = old.not_valid_after_utc - old.not_valid_before_utc - ca.config.backdate
            try:
                new = _issue(ca, max(lifetime, timedelta(hours=1)), requester)
            except KvpkiError as error:
                if current is None:
                    raise
                log.error("OCSP responder of CA %s not renewed (retried later): %s", ca.name, error)
                return current
            log.info("OCSP responder of CA %s renewed: serial %x valid until %s", ca.name, new.serial_number,
                     new.not_valid_after_utc.isoformat())  # fmt: skip
            _prune(ca, now)
    return current_responder(ca, now)


def _stored(ca: CertificateAuthority) -> bool:
    """True when this CA has (or had) a responder: only then does ``serve`` keep one alive."""
    root = responder_root(ca)
    return root.is_dir() and any((directory / "cert.pem").exists() for directory in root.iterdir())


def _prune(ca: CertificateAuthority, now: datetime) -> None:
    for directory in responder_root(ca).iterdir():
        try:
            certificate = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
        except (OSError, ValueError):
            continue
        if certificate.not_valid_after_utc <= now:
            shutil.rmtree(directory, ignore_errors=True)
