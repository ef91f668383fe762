"""The inventory interface and its record type, shared by the SQLite and PostgreSQL backends."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import NamedTuple

from kvpki_cli.errors import UsageError

STATUSES = ("valid", "revoked", "expired")


def to_text(value: datetime) -> str:
    """UTC timestamps as sortable ISO 8601 text."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_text(value: str) -> datetime:
    """The inverse of ``to_text``; strict about the shape, and ~20x faster than ``strptime``."""
    if len(value) != 20 or value[10] != "T" or value[19] != "Z":
        raise ValueError(f"not a UTC timestamp: {value!r}")
    return datetime.fromisoformat(value)  # "Z": tzinfo is datetime.UTC


class CertificateRecord(NamedTuple):
    """One issued certificate as the inventory keeps it (serial as lowercase hex)."""

    ca: str
    serial: str
    subject: str
    sans: tuple[str, ...]
    profile: str
    requester: str
    not_before: datetime
    not_after: datetime
    csr_sha256: str
    der: bytes
    status: str = "valid"
    revoked_at: datetime | None = None
    reason: str | None = None
    replaces: str | None = None  # serial of the certificate this one renewed (kvpki renew, EST re-enrollment)
    crl_partition: int | None = None  # the partition CRL listing it (its CRL DP); None: the full CRL only
    issuer_generation: int = 0  # which key generation of the CA signed it (kvpki rollover); 0 before any

    def effective_status(self, now: datetime) -> str:
        """``revoked`` wins over ``expired``; ``expired`` is derived from notAfter."""
        if self.status == "revoked":
            return "revoked"
        return "expired" if self.not_after <= now else "valid"

    def as_json(self, now: datetime) -> dict[str, object]:
        return {
            "ca": self.ca,
            "serial": self.serial,
            "subject": self.subject,
            "sans": list(self.sans),
            "profile": self.profile,
            "requester": self.requester,
            "not_before": to_text(self.not_before),
            "not_after": to_text(self.not_after),
            "status": self.effective_status(now),
            "revoked_at": to_text(self.revoked_at) if self.revoked_at else None,
            "reason": self.reason,
            "csr_sha256": self.csr_sha256,
            "replaces": self.replaces,
            "issuer_generation": self.issuer_generation,
        }


def status_condition(status: str | None, placeholder: str) -> tuple[str, bool]:
    """SQL filter for an effective status (``expired`` is derived from not_after), and whether it binds ``now``."""
    if status is None:
        return "", False
    if status == "revoked":
        return " AND status = 'revoked'", False
    if status == "valid":
        return f" AND status = 'valid' AND not_after > {placeholder}", True
    if status == "expired":
        return f" AND status = 'valid' AND not_after <= {placeholder}", True
    raise UsageError(f"unknown status {status!r} (one of: {', '.join(STATUSES)})")


class RevokedRow(NamedTuple):
    """What a CRL entry needs, as stored: no certificate, no parsing (a CRL may list a million)."""

    serial: str  # lowercase hex
    revoked_at: str | None  # UTC text as ``to_text`` writes it
    reason: str | None  # RFC 5280 reason name; None for unspecified


# A database row (serial, revoked_at, reason) as a RevokedRow, in C: no Python call per row.
revoked_row = functools.partial(tuple.__new__, RevokedRow)


class LifecycleCounts(NamedTuple):
    """One row of ``kvpki report``: certificates of one CA and profile by where they are in their life."""

    ca: str
    profile: str
    valid: int  # unrevoked, notAfter in the future
    due: int  # valid and in the last RENEW_FRACTION of their lifetime
    expired: int  # unrevoked, notAfter passed
    expired_without_successor: int  # expired, and no valid certificate of the same CA has the same subject
    revoked: int


RENEW_FRACTION = 0.2  # "due for renewal": the last 20% of the lifetime (aziot-certd renews at 80%)


def lifecycle_counts_of(records: Sequence[CertificateRecord], now: datetime) -> list[LifecycleCounts]:
    """The report computed in Python: the reference the SQL of each backend must agree with."""
    live = {(r.ca, r.subject) for r in records if r.effective_status(now) == "valid"}
    table: dict[tuple[str, str], list[int]] = {}
    for r in records:
        counts = table.setdefault((r.ca, r.profile), [0, 0, 0, 0, 0])
        state = r.effective_status(now)
        if state == "valid":
            counts[0] += 1
            # now >= notAfter - 20% of the lifetime, in whole seconds as both backends compute it
            if 5 * int(now.timestamp()) >= 4 * int(r.not_after.timestamp()) + int(r.not_before.timestamp()):
                counts[1] += 1
        elif state == "expired":
            counts[2] += 1
            counts[3] += (r.ca, r.subject) not in live
        else:
            counts[4] += 1
    return [LifecycleCounts(ca, profile, *counts) for (ca, profile), counts in sorted(table.items())]


class CrlSnapshot(NamedTuple):
    """What one CRL says, read atomically: its number, its thisUpdate and the revoked set at that time."""

    number: int
    this_update: datetime
    revoked: list[RevokedRow]


class StoredCrl(NamedTuple):
    """A signed CRL kept in the inventory, so every ``serve`` instance publishes the same bytes.

    ``revocations`` is the CA's revocation count read before the CRL's snapshot was taken: while the
    count is still the same, no certificate was revoked since and the CRL is complete.
    """

    number: int
    this_update: datetime
    next_update: datetime
    revocations: int
    der: bytes


class CrlState(NamedTuple):
    """One cheap read per request: the CA's revocation count and the number of its latest stored CRL."""

    revocations: int
    latest: int | None


def crl_key(ca: str, partition: int | None) -> str:
    """Under which name stored CRLs and their lock are kept: the CA's, or "<ca>/<k>" for partition k
    (CA names hold no "/"); each partition CRL is a CRL scope of its own (RFC 5280 5.2.5)."""
    return ca if partition is None else f"{ca}/{partition}"


def fill_partitions(partition: int, filled: int, count: int, size: int) -> tuple[list[int], int, int]:
    """Assign ``count`` certificates from (current ``partition``, ``filled`` in it): their partitions
    and the new (partition, filled).  Each partition gets at most ``size`` (``size`` may change)."""
    assigned = []
    for _ in range(count):
        if filled >= size:
            partition, filled = partition + 1, 0
        assigned.append(partition)
        filled += 1
    return assigned, partition, filled


CRLS_KEPT = 100  # stored CRLs per CA (the latest ones): history for audits, bounded in size


class SerialCollision(Exception):
    """A serial number already exists for this CA (the caller draws a new one)."""


class Inventory(ABC):
    """Issued and revoked certificates per CA; writes are atomic."""

    @abstractmethod
    def record_issued(self, records: Sequence[CertificateRecord]) -> None:
        """Commit all records in one transaction, or none (raises ``SerialCollision`` on a duplicate)."""

    @abstractmethod
    def get(self, ca: str, serial: str) -> CertificateRecord | None:
        """The record for one serial, or None."""

    @abstractmethod
    def revoke(self, ca: str, serial: str, when: datetime, reason: str) -> CertificateRecord:
        """Mark a certificate revoked; NotFound if unknown, AlreadyExists if already revoked."""

    @abstractmethod
    def list_certificates(
        self, ca: str, status: str | None, now: datetime, *, with_der: bool = True
    ) -> list[CertificateRecord]:
        """Records of one CA, optionally filtered by effective status, oldest first.

        ``with_der=False`` leaves ``der`` empty: a listing need not read every certificate.
        """

    def iter_certificates(
        self, ca: str, status: str | None, now: datetime, *, with_der: bool = True
    ) -> Iterator[CertificateRecord]:
        """``list_certificates`` row by row (``kvpki list --json`` of 100k+ rows streams instead of
        holding them all); backends that can read incrementally override this default."""
        yield from self.list_certificates(ca, status, now, with_der=with_der)

    @abstractmethod
    def revoked_unexpired(self, ca: str, now: datetime) -> list[CertificateRecord]:
        """What a CRL must list: revoked certificates whose notAfter has not passed."""

    @abstractmethod
    def next_crl_number(self, ca: str) -> int:
        """A strictly increasing CRL number per CA."""

    @abstractmethod
    def crl_snapshot(
        self, ca: str, clock: Callable[[], datetime], partition: int | None = None, *, generation: int | None = None
    ) -> CrlSnapshot:
        """Take the next CRL number, then read ``clock()`` (at whole seconds) and the revoked set, in one
        transaction that holds the number's lock until it ends.

        ``partition``: only the revocations recorded in that CRL partition (the number still comes
        from the CA's one sequence, so it increases within every partition's scope too).
        ``generation``: only certificates that key generation signed (``kvpki rollover``), likewise.

        A later number is granted only after the earlier snapshot committed, and its set is read
        after that, so of any two CRLs of a CA the higher-numbered one has a thisUpdate that is not
        earlier and lists every entry of the other (except entries whose certificate expired in
        between, which RFC 5280 lets a CRL drop).
        Across machines sharing one database this relies on their clocks being synchronised.
        """

    def revocation_count(self, ca: str, partition: int | None = None) -> int:
        """How many certificates of ``ca`` (of one CRL partition) were ever revoked: a cheap change
        marker for cached CRLs.

        Revocations are never undone, so the count only grows.  Backends should
        override this default with a COUNT query.
        """
        rows = self.list_certificates(ca, "revoked", datetime.now(UTC))
        return sum(1 for r in rows if partition is None or r.crl_partition == partition)

    # CRL partitions (RFC 5280 5.2.5): certificates are assigned to partitions as they are issued.

    def reserve_crl_partitions(self, ca: str, count: int, size: int) -> list[int]:
        """The partitions of ``count`` certificates about to be issued by ``ca``, in one transaction:
        the current partition is filled up to ``size`` certificates, then the next one opened.
        Reservations whose certificate is never recorded leave a partition smaller, never larger."""
        raise UsageError("this inventory cannot partition CRLs")

    def last_crl_partition(self, ca: str) -> int | None:
        """The highest partition of ``ca`` reserved so far, or None when none was."""
        raise UsageError("this inventory cannot partition CRLs")

    # Stored CRLs (``crl_publish.py`` coordinates them).  Backends create their table on first use.

    def crl_lock(self, ca: str) -> AbstractContextManager[None]:
        """Held while deciding whether to sign a new CRL of ``ca`` and storing it: across processes and
        machines sharing the inventory, so exactly one of them signs each new CRL."""
        raise UsageError("this inventory cannot store CRLs")

    def crl_state(self, ca: str, partition: int | None = None) -> CrlState:
        """The revocation count and the latest stored CRL number (of one partition), in one round trip."""
        raise UsageError("this inventory cannot store CRLs")

    def latest_crl(self, ca: str, *, with_der: bool = True) -> StoredCrl | None:
        """The stored CRL of ``ca`` (a ``crl_key``) with the highest number, or None (``with_der=False``:
        ``der`` empty)."""
        raise UsageError("this inventory cannot store CRLs")

    def store_crl(self, ca: str, crl: StoredCrl) -> None:
        """Keep a newly signed CRL (call under ``crl_lock``); older ones beyond ``CRLS_KEPT`` are dropped."""
        raise UsageError("this inventory cannot store CRLs")

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

    # --- lifecycle reporting (kvpki list --expiring, kvpki report); backends override with one query each

    def expiring(self, ca: str, now: datetime, until: datetime) -> list[CertificateRecord]:
        """Valid certificates of ``ca`` whose notAfter is in (now, until], soonest first."""
        rows = [r for r in self.list_certificates(ca, "valid", now) if r.not_after <= until]
        return sorted(rows, key=lambda r: (r.not_after, r.serial))

    def lifecycle_counts(self, ca: str | None, now: datetime) -> list[LifecycleCounts]:
        """Per (CA, profile) counts for ``kvpki report``, of ``ca`` or (None) of every CA, sorted."""
        if ca is None:
            raise NotImplementedError("this inventory backend cannot report across CAs")
        return lifecycle_counts_of(self.list_certificates(ca, None, now), now)

    # --- serving: enrollment rate limits, health (kvpki serve)

    def rate_count(self, key: str, window_start: int) -> int:
        """Count one attempt for ``key`` in the fixed window starting at ``window_start`` (epoch seconds),
        atomically across every process sharing the inventory; return the window's count so far.
        Older windows of ``key`` are dropped."""
        raise UsageError("this inventory cannot count enrollment rates")

    def count_expiring(self, ca: str, now: datetime, until: datetime) -> int:
        """How many valid certificates of ``ca`` expire in (now, until] (a metric, computed periodically)."""
        return len(self.expiring(ca, now, until))

    def ping(self) -> None:
        """Raise unless the inventory can answer now (``/healthz``); backends check they could also write."""
        self.revocation_count("")
