"""The vault side of ``kvpki rollover``: the next key generation as new versions of the same certificate.

The same proven steps as init-ca (``initca``), starting from the merged CA certificate:
a Self-issued version with a NEW key (``reuse_key: false``; tag ``kvpki-generation: K``,
role ``temporary``) gives a completed, signing-capable key version; a version with issuer
Unknown and ``reuse_key: true`` keeps that key pending until kvpki merges the new CA
certificate (a root's self-signed by that key, a sub-CA's signed by its parent); then the
temporary version is disabled.  The earlier versions stay enabled: their keys keep signing
CRLs and OCSP answers for what they issued.

Each step reads the vault first, so a rerun after any failure continues where the last one
stopped; nothing is ever deleted.  A state kvpki cannot continue from is refused with one
line naming it.  Imports the SDK: rollover only.
"""

from __future__ import annotations

from cryptography import x509

from kvpki_cli.errors import AlreadyExists, BackendError, UsageError
from kvpki_cli.keystores.azure.initca import TAG_CA, TAG_ROLE, InitCA, Ready, key_type_of, spki
from kvpki_cli.keystores.base import CAPublicKey, KeyType

TAG_GENERATION = "kvpki-generation"
RESUME = "nothing was deleted: run the same 'kvpki rollover' again to continue"


class NextKey(InitCA):
    """Drives one CA's certificate object from its merged generation ``K-1`` to a pending generation ``K``."""

    generation = 0

    def _tags(self, role: str) -> dict[str, str]:
        return {**super()._tags(role), TAG_GENERATION: str(self.generation)}

    def start(self, generation: int, key_type: KeyType, hsm: bool) -> Ready:
        """Take steps until generation ``generation``'s new key waits, pending, for its CA certificate."""
        self.generation = generation
        self._fresh = None
        return self.run(key_type, hsm)

    def _step(self, key_type: KeyType, hsm: bool, subject: str, start: float) -> Ready | str:
        import time

        cert, op = self._read()
        where = self._where()
        if cert is None or cert.properties is None or not cert.cer or not cert.key_id:
            raise BackendError(f"{where} has no CA certificate: 'kvpki rollover' needs the CA made by init-ca")
        tags = cert.properties.tags or {}
        if tags.get(TAG_CA) != self.ca_name:
            raise AlreadyExists(f"{where} does not belong to CA {self.ca_name!r}; {RESUME}")
        role = tags.get(TAG_ROLE)
        try:
            generation = int(tags.get(TAG_GENERATION, "0"))
        except ValueError:
            generation = -1
        op_status = str(getattr(op, "status", "") or "")
        op_issuer = str(getattr(op, "issuer_name", "") or "")
        busy = op is not None and op_status == "inProgress"
        if role == "ca" and generation == self.generation - 1:
            if not busy:
                policy = self.certs.policy("Self", subject, key_type, hsm, reuse_key=False)
                self.certs.start_create(self.name, policy, self._tags("temporary"))
                return "again"
            if op_issuer == "Self":
                if time.monotonic() - start > self.create_timeout:
                    raise BackendError(
                        f"Key Vault did not issue the temporary certificate {self.name} within "
                        f"{self.create_timeout:g}s; {RESUME}"
                    )
                return "wait"
            raise AlreadyExists(
                f"{where} has a pending certificate operation (issuer {op_issuer or 'unknown'}) that this rollover "
                "did not start; cancel it (az keyvault certificate pending delete) and run 'kvpki rollover' again"
            )
        if role == "temporary" and generation == self.generation:
            public = x509.load_der_x509_certificate(bytes(cert.cer)).public_key()
            if not isinstance(public, CAPublicKey):
                raise BackendError(f"Key Vault created an unexpected key type for {self.name}")
            if key_type_of(public) != key_type.value:
                raise UsageError(
                    f"{where} holds the half-made generation {self.generation} of CA {self.ca_name!r} with an "
                    f"{key_type_of(public)} key; run 'kvpki rollover --key-type {key_type_of(public)}' to continue"
                )
            if busy and op_issuer == "Unknown":
                csr_der = bytes(getattr(op, "csr", b"") or b"")
                if not csr_der or spki(x509.load_der_x509_csr(csr_der).public_key()) != spki(public):
                    raise AlreadyExists(
                        f"{where} has a pending operation whose key is not generation {self.generation}'s; cancel "
                        "it (az keyvault certificate pending delete) and run 'kvpki rollover' again"
                    )
                return Ready(cert.key_id, public)
            if busy:
                return "wait"
            policy = self.certs.policy("Unknown", subject, key_type, hsm)
            self.certs.start_create(self.name, policy, self._tags("ca"))
            return "again"
        version = cert.properties.version
        if role == "ca" and generation == self.generation:
            raise BackendError(
                f"{where}: generation {self.generation} of CA {self.ca_name!r} is already merged (version "
                f"{version}) but this KVPKI_HOME has no record of it (another installation's rollover, or lost "
                f"local state: cas/{self.ca_name}/generations.json); nothing was changed"
            )
        raise BackendError(
            f"{where}: its latest version {version} is a {role or 'foreign'} version of generation {generation}, "
            f"not what generation {self.generation} of CA {self.ca_name!r} continues from; nothing was changed"
        )

    def disable_temporary(self) -> None:
        """Disable this generation's temporary (Self-issued) version; a failure leaves it enabled, harmlessly."""
        from kvpki_cli.errors import KvpkiError
        from kvpki_cli.messages import warn

        try:
            for props in self.certs.versions(self.name):
                tags = props.tags or {}
                if (
                    props.enabled
                    and tags.get(TAG_CA) == self.ca_name
                    and tags.get(TAG_ROLE) == "temporary"
                    and tags.get(TAG_GENERATION) == str(self.generation)
                ):
                    self.certs.disable(self.name, str(props.version))
        except KvpkiError as exc:
            warn(f"could not disable the temporary version of {self._where()}: {exc}")

