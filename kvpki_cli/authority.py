"""The issuance core: one CA's key store, certificate chain, policy and inventory working together.

Used in-process by both the CLI and the EST server.  It never imports click,
rich, aiohttp or the Azure SDK; it only talks to the ``KeyStore`` and
``Inventory`` interfaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtensionOID

from kvpki_cli.config import CaConfig, Settings, check_ca_name
from kvpki_cli.errors import AlreadyExists, BackendError, InvalidInput, NotFound, PolicyViolation, UsageError
from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import CertificateRecord, Inventory, SerialCollision
from kvpki_cli.keystores import open_keystore
from kvpki_cli.keystores.base import KeyStore
from kvpki_cli.pki.certificates import (
    PublicationUrls,
    issue_certificate,
    new_serial_number,
    self_signed_certificate,
    serial_hex,
)
from kvpki_cli.pki.keys import CAPrivateKey, Encoding, KeyType
from kvpki_cli.pki.policy import (
    Template,
    approve,
    certificate_sans,
    check_path_length,
    child_path_length,
    validity_window,
)
from kvpki_cli.textsafe import requester_text

ROOT_DEFAULT_VALIDITY = timedelta(days=3650)
SUB_CA_DEFAULT_VALIDITY = timedelta(days=5 * 365)
MAX_SERIAL_ATTEMPTS = 3
# What a renewal must carry over unchanged: everything that limits what the certificate may do.
CONSTRAINTS = {
    ExtensionOID.BASIC_CONSTRAINTS: "basicConstraints",
    ExtensionOID.KEY_USAGE: "keyUsage",
    ExtensionOID.EXTENDED_KEY_USAGE: "extendedKeyUsage",
    ExtensionOID.NAME_CONSTRAINTS: "nameConstraints",
    ExtensionOID.POLICY_CONSTRAINTS: "policyConstraints",
    ExtensionOID.INHIBIT_ANY_POLICY: "inhibitAnyPolicy",
    ExtensionOID.CERTIFICATE_POLICIES: "certificatePolicies",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class SigningRequest(NamedTuple):
    """One CSR to sign, with the operator's overrides and the requester identity."""

    csr_der: bytes
    csr: x509.CertificateSigningRequest
    profile: str = "device"
    requester: str = "cli"
    validity: timedelta | None = None
    subject: x509.Name | None = None
    sans: Sequence[x509.GeneralName] | None = None
    path_length: int | None = None
    renews: x509.Certificate | None = None  # the new certificate must keep every constraint of this one
    identity_cn: str | None = None  # fills {cn} in a CA profile's name constraints (EST identity's CN)
    name_constraints: x509.NameConstraints | None = None  # kept from a renewed CA certificate


class Issued(NamedTuple):
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    record: CertificateRecord
    notes: tuple[str, ...]


def new_record(
    ca_name: str,
    template: Template,
    certificate: x509.Certificate,
    requester: str,
    csr_der: bytes | None,
    generation: int = 0,
) -> CertificateRecord:
    """The inventory row for a certificate just signed from ``template`` (no CSR for CA certificates kvpki builds)."""
    return CertificateRecord(
        ca=ca_name,
        serial=serial_hex(certificate.serial_number),
        subject=template.subject.rfc4514_string(),
        sans=tuple(str(getattr(n, "value", n)) for n in template.sans),
        profile=template.profile.name,
        requester=requester_text(requester),  # from a client certificate, --requester or $KVPKI_REQUESTER
        not_before=template.not_before,
        not_after=template.not_after,
        csr_sha256=hashlib.sha256(csr_der).hexdigest() if csr_der is not None else "",
        der=certificate.public_bytes(Encoding.DER),
        issuer_generation=generation,
    )


def crl_scope(ca_name: str, generation: int) -> str:
    """The key under which the inventory stores CRLs of one key generation ("<ca>", then "<ca>#<k>")."""
    return ca_name if generation == 0 else f"{ca_name}#{generation}"


class Generation(NamedTuple):
    """One key generation of a CA: its number and chain (its CA certificate first); the key store's
    ``signer_for(number)`` signs with its key."""

    number: int
    chain: list[x509.Certificate]


def generation_urls(urls: PublicationUrls, generation: int) -> PublicationUrls:
    """Where certificates of key generation ``generation`` find their CRL and issuer certificate.

    Generation 0 keeps the URLs certificates carried before any rollover (``/crl/<ca>.crl``); generation
    k uses ``/crl/<ca>.<k>.crl`` and ``/ca/<ca>.<k>.crt``, so every certificate names the CRL signed by
    the very key that signed it ('.' never occurs in a CA name, so these never clash with one).
    """
    if generation == 0:
        return urls

    def versioned(url: str | None, suffix: str) -> str | None:
        if url is None:
            return None
        return f"{url.removesuffix(suffix)}.{generation}{suffix}" if url.endswith(suffix) else url

    return urls._replace(crl=versioned(urls.crl, ".crl"), ca_issuers=versioned(urls.ca_issuers, ".crt"))


def parse_serial(text: str) -> str:
    """Accept hex with optional ``0x`` and ``:`` separators; return canonical lowercase hex."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise InvalidInput(f"invalid serial number {text!r} (expected hexadecimal)") from None
    if value <= 0 or value.bit_length() > 160:
        raise InvalidInput(f"invalid serial number {text!r} (must be positive, at most 20 octets)")
    return serial_hex(value)


def recorded(inventory: Inventory, ca_name: str, certificate: x509.Certificate) -> CertificateRecord | None:
    """The row of exactly ``certificate`` (same serial and same DER) in CA ``ca_name``'s inventory, or None."""
    record = inventory.get(ca_name, serial_hex(certificate.serial_number))
    if record is None or record.der != certificate.public_bytes(Encoding.DER):
        return None
    return record


def _extension(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


def kept_path_length(certificate: x509.Certificate) -> int | None:
    """The pathLenConstraint a renewal of ``certificate`` must keep (None: unlimited, or not a CA)."""
    found = _extension(certificate, ExtensionOID.BASIC_CONSTRAINTS)
    value = found.value if found is not None else None
    return value.path_length if isinstance(value, x509.BasicConstraints) and value.ca else None


def check_same_constraints(old: x509.Certificate, new: x509.Certificate) -> None:
    """A renewal may change key, serial and validity, never what the certificate is allowed to do."""
    for oid, label in CONSTRAINTS.items():
        if _extension(old, oid) != _extension(new, oid):
            raise PolicyViolation(
                f"renewing certificate {serial_hex(old.serial_number)} would change its {label}"
                " (the profile or the issuer changed since it was issued): refusing"
            )


def check_renewal_time(old: x509.Certificate, now: datetime, window: timedelta | None) -> None:
    """A renewal needs a certificate that is valid now, or expired by at most ``window`` (the
    offline-device safety net); beyond it the device must re-enroll with its bootstrap credential."""
    serial = serial_hex(old.serial_number)
    if now < old.not_valid_before_utc:
        raise PolicyViolation(f"certificate {serial} is not valid before {old.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}")
    if now < old.not_valid_after_utc:
        return
    expired = f"certificate {serial} expired on {old.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
    if window is None:
        raise PolicyViolation(
            f"{expired} and renewal after expiry is off (renew_after_expiry): re-enroll with the bootstrap credential"
        )
    if now - old.not_valid_after_utc > window:
        raise PolicyViolation(
            f"{expired}, longer ago than renew_after_expiry ({format_window(window)}) allows:"
            " re-enroll with the bootstrap credential"
        )


def format_window(window: timedelta) -> str:
    """A window as the duration syntax it was written in, for messages (``180d``, ``12h``)."""
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class CertificateAuthority:
    """A named CA ready to issue, revoke and publish."""

    def __init__(self, settings: Settings, config: CaConfig, keystore: KeyStore, inventory: Inventory | None = None):
        self.settings = settings
        self.config = config
        self.keystore = keystore
        self._inventory = inventory
        self._chain: list[x509.Certificate] | None = None
        self._generation: int | None = None

    @classmethod
    def open(cls, settings: Settings, name: str, inventory: Inventory | None = None) -> CertificateAuthority:
        config = settings.ca(name)
        keystore = open_keystore(config.store, name, config.store_settings, settings.home)
        return cls(settings, config, keystore, inventory)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = open_inventory(self.settings.inventory_url, self.settings.home)
        return self._inventory

    @property
    def chain(self) -> list[x509.Certificate]:
        """The current generation's CA certificate first, then its issuers up to the root."""
        return self.current().chain

    def current(self) -> Generation:
        """The current key generation (re-checked at each call, so a ``kvpki rollover`` in another process
        switches a running server's issuance at once)."""
        number = self.keystore.current_generation()
        if self._chain is None or self._generation != number:
            chain = self.keystore.chain_for(number)
            if not chain:
                raise NotFound(f"CA {self.name!r} has no certificate")
            self._chain, self._generation = chain, number
        return Generation(number, self._chain)

    def generation(self, number: int) -> Generation:
        """A key generation by number (NotFound if this CA has no such generation)."""
        if number not in self.keystore.generations():
            raise NotFound(f"CA {self.name!r} has no key generation {number} (see 'kvpki rollover')")
        if number == self.keystore.current_generation():
            return self.current()
        return Generation(number, self.keystore.chain_for(number))

    def generations(self) -> list[Generation]:
        """Every key generation, current first (then newest to oldest)."""
        return [self.generation(number) for number in reversed(self.keystore.generations())]

    def generation_of(self, certificate: x509.Certificate) -> Generation:
        """The generation whose key signed ``certificate`` (InvalidInput if none of them did)."""
        if certificate.issuer == self.certificate.subject:
            for generation in self.generations():
                try:
                    certificate.verify_directly_issued_by(generation.chain[0])
                    return generation
                except (ValueError, TypeError, InvalidSignature):
                    continue
            raise InvalidInput(f"certificate signature does not verify against CA {self.name!r}")
        raise InvalidInput(f"certificate was not issued by CA {self.name!r}")

    def crl_scope(self, generation: int) -> str:
        return crl_scope(self.name, generation)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    def approve(self, request: SigningRequest, now: datetime) -> Template:
        path_length = request.path_length
        if path_length is None and request.renews is not None:
            path_length = kept_path_length(request.renews)
        return approve(
            request.csr,
            self.settings.profile(request.profile),
            self.certificate,
            now=now,
            backdate=self.config.backdate,
            validity=request.validity,
            subject=request.subject,
            sans=request.sans,
            path_length=path_length,
            identity_cn=request.identity_cn,
            constraints=request.name_constraints,
        )

    def issue(self, request: SigningRequest) -> Issued:
        return self.issue_many([request])[0]

    def issue_many(
        self,
        requests: Sequence[SigningRequest],
        before_commit: Callable[[list[Issued]], None] | None = None,
        jobs: int | None = None,
    ) -> list[Issued]:
        """Approve every request first (a refusal issues nothing), sign, then commit all rows at once.

        The rows are committed before any certificate is returned, so nothing
        leaves kvpki without an inventory record.  ``before_commit`` sees each
        signed batch before its commit (to stage output files); raising there
        commits nothing.  ``jobs`` signatures are made at once (default: what the
        key store asks for; a vault's governor keeps them within its budget).
        """
        self.check_not_revoked()
        now = utcnow()
        generation = self.current()  # one generation for the whole batch, even if a rollover happens meanwhile
        templates = [self.approve(request, now) for request in requests]
        signer = self.keystore.signer_for(generation.number)
        if jobs is None:
            jobs = self.keystore.signing_jobs() if len(requests) > 1 else 1
        partitions = self._crl_partitions(templates)
        for _attempt in range(MAX_SERIAL_ATTEMPTS):
            issued = self._sign_all(requests, templates, partitions, generation, signer, jobs)
            if before_commit is not None:
                before_commit(issued)
            try:
                self.inventory.record_issued([item.record for item in issued])
            except SerialCollision:
                continue
            return issued
        raise BackendError("could not allocate a unique serial number")

    def _crl_partitions(self, templates: Sequence[Template]) -> list[int | None]:
        """The CRL partition of each certificate about to be signed (RFC 5280 5.2.5), when the CA's CRLs
        are partitioned: end-entity certificates only; CA certificates stay on the full CRL."""
        size = self.config.crl_partition_size
        leaves = [i for i, template in enumerate(templates) if not template.profile.is_ca]
        partitions: list[int | None] = [None] * len(templates)
        if size is None or not self.config.urls.crl or not leaves:
            return partitions
        reserved = self.inventory.reserve_crl_partitions(self.name, len(leaves), size)
        for index, partition in zip(leaves, reserved, strict=True):
            partitions[index] = partition
        return partitions

    def _sign_all(
        self,
        requests: Sequence[SigningRequest],
        templates: Sequence[Template],
        partitions: Sequence[int | None],
        generation: Generation,
        signer: CAPrivateKey,
        jobs: int,
    ) -> list[Issued]:
        """Sign each (request, template), in order; with ``jobs`` > 1 on a thread pool, stopping at the first error."""
        work = [
            (request, template, new_serial_number(), partition)
            for request, template, partition in zip(requests, templates, partitions, strict=True)
        ]
        if jobs <= 1 or len(work) <= 1:
            return [self._sign(*item, generation, signer) for item in work]
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=min(jobs, len(work)), thread_name_prefix="kvpki-sign")
        try:
            futures = [pool.submit(self._sign, *item, generation, signer) for item in work]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _sign(
        self,
        request: SigningRequest,
        template: Template,
        serial: int,
        partition: int | None,
        generation: Generation,
        signer: CAPrivateKey,
    ) -> Issued:
        urls = generation_urls(self.config.urls, generation.number)
        if partition is not None:
            urls = urls._replace(crl=self.crl_url(partition))
        certificate = issue_certificate(template, serial, generation.chain[0], signer, urls)
        if request.renews is not None:  # signed but not recorded: a refusal here still leaves no trace
            check_same_constraints(request.renews, certificate)
        record = new_record(self.name, template, certificate, request.requester, request.csr_der, generation.number)
        record = record._replace(crl_partition=partition)
        if request.renews is not None:  # the inventory links each renewal to what it replaces
            record = record._replace(replaces=serial_hex(request.renews.serial_number))
        return Issued(certificate, generation.chain, record, template.notes)

    def check_not_revoked(self) -> None:
        """Refuse to sign while this CA's certificate, or any above it that a CA of this installation
        issued, is revoked in that CA's inventory.

        One primary-key lookup per known issuer, at every call, so a ``kvpki revoke`` in another
        process takes effect at once.  CRL and OCSP do not call this: a revoked CA keeps publishing.
        """
        subject, issuer = self.name, self.config.parent
        for certificate in self.chain:
            if issuer is None:
                return
            record = recorded(self.inventory, issuer, certificate)
            if record is not None and record.status == "revoked":
                whose = "its certificate" if subject == self.name else f"the certificate of its issuer CA {subject!r}"
                raise PolicyViolation(
                    f"CA {self.name!r} must not issue: {whose} ({record.serial}) was revoked by CA {issuer!r}"
                    f" ({record.reason or 'unspecified'})"
                )
            try:
                subject, issuer = issuer, self.settings.ca(issuer).parent
            except NotFound:
                return

    def revoke(self, serial: str, reason: str, when: datetime | None = None) -> CertificateRecord:
        return self.inventory.revoke(self.name, parse_serial(serial), when or utcnow(), reason)

    def serial_of(self, certificate: x509.Certificate) -> str:
        """The serial of a certificate this CA issued (refuses certificates from other issuers)."""
        self.generation_of(certificate)  # any key generation of this CA (kvpki rollover)
        return serial_hex(certificate.serial_number)

    def issued_record(self, certificate: x509.Certificate, what: str = "certificate") -> CertificateRecord:
        """The row of a certificate this CA signed (signature checked), recorded with the same DER, not revoked,
        while this CA itself is not revoked (a revoked CA's certificates vouch for nothing).

        The one check behind renewal (CLI and EST) and EST identity certificates.
        """
        self.check_not_revoked()
        serial = self.serial_of(certificate)
        record = recorded(self.inventory, self.name, certificate)
        if record is None:
            raise NotFound(f"{what} {serial} is not in the inventory of CA {self.name!r}")
        if record.status == "revoked":
            raise PolicyViolation(f"{what} {serial} has been revoked")
        return record

    def renewal_request(
        self,
        old: x509.Certificate,
        csr_der: bytes,
        csr: x509.CertificateSigningRequest,
        requester: str,
        renew_after_expiry: timedelta | None = None,
    ) -> SigningRequest:
        """Same subject, SANs, profile and constraints as ``old``; the key comes from the CSR (rotated or not).

        ``old`` must be valid now, or expired for at most ``renew_after_expiry`` (default: the CA's
        ``renew_after_expiry`` setting; unset: no renewal after expiry).
        """
        from kvpki_cli.pki.policy import certificate_name_constraints

        record = self.issued_record(old)
        window = renew_after_expiry if renew_after_expiry is not None else self.config.renew_after_expiry
        check_renewal_time(old, utcnow(), window)
        return SigningRequest(
            csr_der=csr_der,
            csr=csr,
            profile=record.profile,
            requester=requester,
            subject=old.subject,
            sans=certificate_sans(old) or None,
            renews=old,
            name_constraints=certificate_name_constraints(old),
        )

    def crl_url(self, partition: int | None = None) -> str | None:
        """The CRL DP of the full CRL, or of partition ``partition``: "<base>/crl/<ca>.crl" becomes
        "<base>/crl/<ca>/<k>.crl" (a configured ``crl_url`` without ".crl" gains "/<k>.crl")."""
        url = self.config.urls.crl
        if partition is None or url is None:
            return url
        return f"{url.removesuffix('.crl')}/{partition}.crl"

    def check_crl_partition(self, partition: int) -> None:
        """Refuse a partition this CA never assigned (partitioning off, or a number not reached yet)."""
        if self.config.crl_partition_size is None or not self.config.urls.crl:
            raise UsageError(f"CA {self.name!r} has no partitioned CRLs (set crl_partition_size and a CRL URL)")
        last = self.inventory.last_crl_partition(self.name)
        if partition < 0 or last is None or partition > last:
            raise NotFound(f"CA {self.name!r} has no CRL partition {partition}")

    def crl(
        self, next_update: timedelta, partition: int | None = None, generation: int | None = None
    ) -> x509.CertificateRevocationList:
        return x509.load_der_x509_crl(self.crl_der(next_update, partition, generation))

    def crl_der(self, next_update: timedelta, partition: int | None = None, generation: int | None = None) -> bytes:
        """A new CRL, DER-encoded (what `kvpki crl` prints; no re-encoding of a million entries).

        ``partition``: the CRL of that partition alone, with an issuingDistributionPoint naming its URL.
        ``generation``: the CRL of that key generation (default: the current one; ``kvpki rollover``),
        signed by its key and listing what that key signed, so each generation's CRL stays complete for
        its own certificates.  (A CA with partitioned CRLs has one generation: rollover refuses it.)
        """
        from kvpki_cli.pki.crl import build_crl_der, gc_paused

        if partition is not None:
            self.check_crl_partition(partition)
        chosen = self.current() if generation is None else self.generation(generation)
        signer = self.keystore.signer_for(chosen.number)  # before taking a number: a failing key store burns none
        # Filter by generation only once there are several (the number is shared by the generations, so it
        # also increases along each generation's CRLs).
        only = chosen.number if self.keystore.generations() != [0] else None
        with gc_paused():  # a million row tuples would set off full collections that free nothing
            # Number, thisUpdate and revoked set from one transaction: a higher number never lists less.
            snapshot = self.inventory.crl_snapshot(self.name, utcnow, partition, generation=only)
            return build_crl_der(
                chosen.chain[0],
                signer,
                snapshot.revoked,  # serial, time and reason as stored: encoded without conversion
                crl_number=snapshot.number,
                this_update=snapshot.this_update,
                next_update=snapshot.this_update + next_update,
                distribution_point=None if partition is None else self.crl_url(partition),
            )


def init_ca(
    settings: Settings,
    name: str,
    subject: x509.Name,
    key_type: KeyType,
    *,
    validity: timedelta | None = None,
    parent: str | None = None,
    path_length: int | None = None,
    store: str | None = None,
    store_settings: dict[str, object] | None = None,
) -> list[x509.Certificate]:
    """Create a root (or, with ``parent``, a subordinate) CA; never overwrites an existing one."""
    check_ca_name(name)
    if (settings.ca_directory(name) / "ca.json").exists():
        raise AlreadyExists(f"CA {name!r} already exists")
    if path_length is not None and path_length < 0:
        raise UsageError("--path-length must not be negative")
    check_path_length(path_length)
    config = settings.ca(
        name,
        must_exist=False,
        overrides={
            "store": store,
            "store_settings": store_settings or {},
            "key_type": key_type.value,
            "parent": parent,
        },
    )
    parent_ca = CertificateAuthority.open(settings, parent) if parent else None
    if parent_ca is not None:
        parent_ca.check_not_revoked()
    keystore = open_keystore(config.store, name, config.store_settings, settings.home)
    if keystore.exists():
        raise AlreadyExists(f"CA {name!r} already has a key or certificate in its {config.store} key store")

    now = utcnow()
    sub_ca = settings.profiles["sub-ca"]
    if parent_ca is not None:
        chosen_path_length = child_path_length(sub_ca, parent_ca.certificate, path_length)
        window = validity_window(parent_ca.certificate, now, validity or SUB_CA_DEFAULT_VALIDITY, config.backdate)
    else:
        chosen_path_length = path_length
        window = (now - config.backdate, now + (validity or ROOT_DEFAULT_VALIDITY))

    from kvpki_cli.outdir import crash_point  # test hook (kill -9 at a named step)

    settings.make_ca_directory(name)  # KVPKI_HOME, cas/ and cas/<name> 0700 whatever the umask
    public_key = keystore.create_key(key_type)
    crash_point("init-ca:key")
    try:
        template = Template(
            subject=subject,
            public_key=public_key,
            sans=(),
            not_before=window[0].replace(microsecond=0),
            not_after=window[1].replace(microsecond=0),
            profile=sub_ca._replace(name="root" if parent_ca is None else "sub-ca"),
            path_length=chosen_path_length,
        )
        serial = new_serial_number()
        if parent_ca is None:
            certificate = self_signed_certificate(template, serial, keystore.signer())
            chain = [certificate]
        else:
            certificate = issue_certificate(
                template, serial, parent_ca.certificate, parent_ca.keystore.signer(), parent_ca.config.urls
            )
            chain = [certificate, *parent_ca.chain]
        keystore.store_chain(chain)
        crash_point("init-ca:chain")
        if parent_ca is not None:
            # Recorded once stored (an unmerged vault attempt is no certificate) but before ca.json makes
            # the CA usable: a kill in between never leaves a working sub-CA its parent cannot list or revoke.
            parent_ca.inventory.record_issued([new_record(parent_ca.name, template, certificate, "init-ca", None)])
            crash_point("init-ca:recorded")
        settings.save_ca_metadata(config)
    except BaseException:
        (settings.ca_directory(name) / "ca.json").unlink(missing_ok=True)
        keystore.discard()
        raise
    return chain
