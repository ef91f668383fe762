"""The inventory interface and its record type, shared by the SQLite and PostgreSQL backends."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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


class CrlSnapshot(NamedTuple):
    """What one CRL says, read atomically: its number, its thisUpdate and the revoked set at that time."""

    number: int
    this_update: datetime
    revoked: list[RevokedRow]


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

    @abstractmethod
    def revoked_unexpired(self, ca: str, now: datetime) -> list[CertificateRecord]:
        """What a CRL must list: revoked certificates whose notAfter has not passed."""

    @abstractmethod
    def next_crl_number(self, ca: str) -> int:
        """A strictly increasing CRL number per CA."""

    @abstractmethod
    def crl_snapshot(self, ca: str, clock: Callable[[], datetime]) -> CrlSnapshot:
        """Take the next CRL number, then read ``clock()`` (at whole seconds) and the revoked set, in one
        transaction that holds the number's lock until it ends.

        A later number is granted only after the earlier snapshot committed, and its set is read
        after that, so of any two CRLs of a CA the higher-numbered one has a thisUpdate that is not
        earlier and lists every entry of the other (except entries whose certificate expired in
        between, which RFC 5280 lets a CRL drop).
        Across machines sharing one database this relies on their clocks being synchronised.
        """

    def revocation_count(self, ca: str) -> int:
        """How many certificates of ``ca`` were ever revoked: a cheap change marker for cached CRLs.

        Revocations are never undone, so the count only grows.  Backends should
        override this default with a COUNT query.
        """
        return len(self.list_certificates(ca, "revoked", datetime.now(UTC)))

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""
