"""init-ca in a vault as a resumable state machine: read the certificate's state, take one step, repeat.

Creating and merging certificate versions are POSTs that Key Vault does not make
idempotent, and a 5xx or a lost reply leaves their outcome unknown.  So every step
is followed by reading the vault's state again instead of repeating the POST
blindly, and nothing is ever deleted: a half-built CA (temporary Self-issued
version, pending issuer-Unknown version) stays in the vault, tagged with its CA
name, and the same ``init-ca`` run again continues from it.  That includes a CA
certificate merged by an init-ca of this KVPKI_HOME that failed afterwards (tag
``kvpki-home``): a new version with the same key gets a new certificate and the
orphaned one is disabled.  A state kvpki cannot continue from (another CA's
certificate, one merged by another installation, a soft-deleted name) is refused
with one line that says what the vault holds.

Imports the SDK (through ``sdk``): init-ca only, never the signing fast path.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import NamedTuple

from azure.keyvault.certificates import CertificateOperation, KeyVaultCertificate
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kvpki_cli.errors import AlreadyExists, BackendError, KvpkiError, UsageError
from kvpki_cli.keystores.azure.retry import RetriesExhausted
from kvpki_cli.keystores.azure.sdk import DeletedButRecoverable, OutcomeUnknown, VaultCertificates
from kvpki_cli.keystores.base import CAPublicKey, KeyType
from kvpki_cli.messages import warn
from kvpki_cli.pki.lean import Encoding, PublicFormat

TAG_CA = "kvpki-ca"  # the CA name a version belongs to
TAG_ROLE = "kvpki-role"  # "temporary" (Self-issued, gives the key) or "ca" (the merged CA certificate)
TAG_HOME = "kvpki-home"  # the install id of the KVPKI_HOME whose init-ca made the version
POLL_INTERVAL = 1.0
RESUME = "nothing was deleted: run the same init-ca again to continue"


def spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def key_type_of(public: object) -> str:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(public.curve.name, public.curve.name)
    if isinstance(public, rsa.RSAPublicKey):
        return f"rsa-{public.key_size}"
    return type(public).__name__


def _when(value: datetime.datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value is not None else "unknown date"


class Ready(NamedTuple):
    """A pending issuer-Unknown version waits for the CA certificate; ``kid`` (same key) can sign it."""

    kid: str
    public_key: CAPublicKey


class InitCA:
    """Drives one CA's certificate object in the vault from nothing (or a half-built state) to merged."""

    def __init__(
        self,
        certs: VaultCertificates,
        ca_name: str,
        cert_name: str,
        deadline: float,
        create_timeout: float,
        home_id: str,
    ) -> None:
        self.certs = certs
        self.home_id = home_id
        self.ca_name = ca_name
        self.name = cert_name
        self.vault = certs.vault_url
        self.deadline = deadline
        self.create_timeout = create_timeout
        self._fresh: tuple[KeyVaultCertificate | None, CertificateOperation | None] | None = None

    # ----------------------------------------------------------- reading
    def _where(self) -> str:
        return f"certificate {self.name!r} in {self.vault}"

    def _tags(self, role: str) -> dict[str, str]:
        return {TAG_CA: self.ca_name, TAG_ROLE: role, TAG_HOME: self.home_id}

    def _read(self) -> tuple[KeyVaultCertificate | None, CertificateOperation | None]:
        return self.certs.get(self.name), self.certs.operation(self.name)

    def _owned(self, tags: dict[str, str] | None) -> bool:
        return (tags or {}).get(TAG_CA) == self.ca_name

    def check_absent_or_resumable(self) -> bool:
        """False for an empty name or our own half-built CA; raises ``AlreadyExists`` for anything else."""
        cert, op = self._read()
        self._fresh = (cert, op)  # the first step need not read it again
        if cert is None and op is None:
            return False
        self._refuse_foreign(cert, op)
        return False

    def _refuse_foreign(self, cert: object, op: object) -> None:
        """Raise unless the state is one this CA's init-ca left behind and can continue from."""
        where = self._where()
        op_status = str(getattr(op, "status", "") or "")
        op_issuer = str(getattr(op, "issuer_name", "") or "")
        if cert is None:
            if op_issuer == "Self" and op_status == "inProgress":
                return  # the temporary version is still being issued: wait for it
            state = f"issuer {op_issuer or 'unknown'}, {op_status or 'no status'}"
            raise AlreadyExists(
                f"{where} has a pending certificate operation ({state}) "
                "that kvpki did not start; cancel it (az keyvault certificate pending delete) or use another --key-name"
            )
        props = getattr(cert, "properties", None)
        tags = getattr(props, "tags", None) or {}
        if not self._owned(tags):
            owner = tags.get(TAG_CA)
            who = f"CA {owner!r}" if owner else "something other than kvpki init-ca"
            raise AlreadyExists(
                f"{where} already exists and belongs to {who}; kvpki never overwrites it (use another --key-name)"
            )
        if tags.get(TAG_ROLE) == "ca" and tags.get(TAG_HOME) != self.home_id:
            der = bytes(getattr(cert, "cer", b"") or b"")
            detail = ""
            if der:
                parsed = x509.load_der_x509_certificate(der)
                detail = f" ({parsed.subject.rfc4514_string()}, serial {parsed.serial_number:x})"
            raise AlreadyExists(
                f"{where} is an already merged CA certificate{detail} of CA {self.ca_name!r}, but this KVPKI_HOME "
                "has no metadata for it: another kvpki installation (KVPKI_HOME) merged it; kvpki never replaces "
                "a CA certificate merged elsewhere (use another --key-name)"
            )
        if props is not None and getattr(props, "enabled", True) is False:
            raise AlreadyExists(f"{where}: the temporary version of half-built CA {self.ca_name!r} is disabled")

    def _deleted_message(self) -> str:
        deleted = self.certs.deleted(self.name)
        where = self._where()
        if deleted is None:
            return (
                f"{where} is deleted but recoverable: recover it (az keyvault certificate recover) and run the "
                "same init-ca again to continue, or use another --key-name"
            )
        tags = (getattr(deleted.properties, "tags", None) or {}) if deleted.properties else {}
        whose = f" (half-built CA {self.ca_name!r})" if self._owned(tags) else ""
        return (
            f"{where}{whose} is deleted but recoverable (deleted {_when(deleted.deleted_on)}, purge scheduled "
            f"{_when(deleted.scheduled_purge_date)}; with purge protection it cannot be purged earlier): "
            f"recover it (az keyvault certificate recover --id {deleted.recovery_id}) and run the same init-ca "
            "again to continue, or use another --key-name"
        )

    # ----------------------------------------------------------- stepping
    def run(self, key_type: KeyType, hsm: bool) -> Ready:
        """Take steps until a pending issuer-Unknown version with the temporary version's key exists.

        Waiting for the vault to issue the temporary version is bounded by ``create_timeout``;
        a run of transient failures by the retry ``deadline``.
        """
        start = time.monotonic()
        failing_since: float | None = None
        failures = 0
        writes = 0
        subject = f"CN={self.name}"
        while True:
            try:
                step = self._step(key_type, hsm, subject, start)
            except RetriesExhausted as exc:
                raise BackendError(f"{exc}; {self._where()}: {RESUME}") from None
            except OutcomeUnknown as exc:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                failures += 1
                delay = min(0.25 * 2**failures, 4.0)
                if now + delay - failing_since > self.deadline:
                    raise BackendError(
                        f"{exc} (retry deadline {self.deadline:g}s); {self._where()}: {RESUME}"
                    ) from None
                time.sleep(delay)
                continue
            except DeletedButRecoverable:
                raise AlreadyExists(self._deleted_message()) from None
            failing_since, failures = None, 0
            if isinstance(step, Ready):
                return step
            if step == "wait":
                time.sleep(POLL_INTERVAL)
            else:
                writes += 1
                if writes > 4:  # two creates make a CA; more means the vault does not keep what it accepted
                    raise BackendError(f"{self._where()} does not reach a mergeable state; {RESUME}")

    def _step(self, key_type: KeyType, hsm: bool, subject: str, start: float) -> Ready | str:
        """One read of the state and at most one write: Ready, "again" (re-read now) or "wait" (poll)."""
        cert, op = self._fresh or self._read()
        self._fresh = None
        if cert is not None or op is not None:
            self._refuse_foreign(cert, op)
        op_status = str(getattr(op, "status", "") or "")
        op_issuer = str(getattr(op, "issuer_name", "") or "")
        if cert is None:
            if op is None:
                policy = self.certs.policy("Self", subject, key_type, hsm)
                self.certs.start_create(self.name, policy, self._tags("temporary"))
                return "again"
            if time.monotonic() - start > self.create_timeout:
                raise BackendError(
                    f"Key Vault did not issue the temporary certificate {self.name} within "
                    f"{self.create_timeout:g}s ({op_status}); {RESUME}"
                )
            return "wait"  # the vault is issuing the temporary version
        if not cert.cer or not cert.key_id:
            raise BackendError(f"Key Vault returned an incomplete certificate for {self.name}")
        public = x509.load_der_x509_certificate(bytes(cert.cer)).public_key()
        if not isinstance(public, CAPublicKey):
            raise BackendError(f"Key Vault created an unexpected key type for {self.name}")
        if key_type_of(public) != key_type.value:
            raise UsageError(
                f"{self._where()} holds half-built CA {self.ca_name!r} with an {key_type_of(public)} key; "
                f"run init-ca with --key-type {key_type_of(public)} to continue, or use another --key-name"
            )
        if op is not None and op_issuer == "Unknown" and op_status == "inProgress":
            csr_der = bytes(getattr(op, "csr", b"") or b"")
            if not csr_der or spki(x509.load_der_x509_csr(csr_der).public_key()) != spki(public):
                raise AlreadyExists(
                    f"{self._where()} has a pending certificate operation whose key is not the key of half-built "
                    f"CA {self.ca_name!r}; cancel it (az keyvault certificate pending delete) or use another --key-name"
                )
            return Ready(cert.key_id, public)
        if op is not None and op_status == "inProgress":
            return "wait"  # another version is being issued
        policy = self.certs.policy("Unknown", subject, key_type, hsm)
        self.certs.start_create(self.name, policy, self._tags("ca"))
        return "again"

    # ------------------------------------------------------------ merging
    def merge(self, chain: Sequence[x509.Certificate]) -> tuple[str, str]:
        """Merge ``chain``; after an unknown outcome read the state (merged with ours = success). (version, kid)."""
        try:
            return self._merge(chain)
        except RetriesExhausted as exc:
            raise BackendError(
                f"{exc}; {self._where()}: the merge may or may not have been applied, {RESUME}"
            ) from None

    def _merge(self, chain: Sequence[x509.Certificate]) -> tuple[str, str]:
        der = [cert.public_bytes(Encoding.DER) for cert in chain]
        tags = self._tags("ca")
        start = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                merged = self.certs.merge(self.name, der, tags)
                version = merged.properties.version if merged.properties is not None else None
                if merged.key_id and version:
                    return version, merged.key_id
                reason = "incomplete reply"
            except OutcomeUnknown as exc:
                reason = str(exc)
            except KvpkiError as exc:
                done = self._merged(der[0])
                if done is not None:
                    return done  # an earlier attempt was applied and its reply lost
                if self._pending_exists():
                    raise BackendError(f"{exc}; {self._where()} keeps its pending version, {RESUME}") from None
                raise BackendError(f"Key Vault merge of {self.name} failed: {self._no_pending()}") from None
            done = self._merged(der[0])
            if done is not None:
                return done
            if not self._pending_exists():
                raise BackendError(f"Key Vault merge of {self.name} failed ({reason}): {self._no_pending()}")
            if time.monotonic() - start + min(0.25 * 2**attempts, 4.0) > self.deadline:
                raise BackendError(
                    f"Key Vault merge certificate {self.name} failed after {attempts} attempts ({reason}); "
                    f"{self._where()} keeps its pending version, {RESUME}"
                )
            time.sleep(min(0.25 * 2**attempts, 4.0))

    def _merged(self, our_der: bytes) -> tuple[str, str] | None:
        cert = self.certs.get(self.name)
        if cert is None or not cert.cer or bytes(cert.cer) != our_der or not cert.key_id:
            return None
        version = cert.properties.version if cert.properties is not None else None
        return (version, cert.key_id) if version else None

    def _pending_exists(self) -> bool:
        op = self.certs.operation(self.name)
        return op is not None and str(getattr(op, "status", "")) == "inProgress"

    def _no_pending(self) -> str:
        return (
            f"{self._where()} has no pending version any more (cancelled, or merged with another certificate "
            "by a concurrent init-ca)"
        )

    def disable_others(self, keep_version: str) -> None:
        """Disable this CA's other enabled versions (the temporary one); a failure only warns."""
        try:
            for props in self.certs.versions(self.name):
                if props.version != keep_version and props.enabled and self._owned(props.tags):
                    self.certs.disable(self.name, str(props.version))
        except KvpkiError as exc:
            warn(f"could not disable the temporary version of {self._where()}: {exc}")
