"""SQLite inventory: the default, one file under KVPKI_HOME.

WAL mode and a busy timeout let many short ``kvpki`` processes (an EST façade
shelling out under load) write concurrently; ``BEGIN IMMEDIATE`` takes the
write lock up front so transactions never deadlock on upgrade.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path

from kvpki_cli.errors import AlreadyExists, BackendError, NotFound
from kvpki_cli.inventory.base import (
    CertificateRecord,
    CrlSnapshot,
    Inventory,
    SerialCollision,
    from_text,
    revoked_row,
    status_condition,
    to_text,
)

# 2: certificates_crl, the covering index a CRL is read from (created on first open of a version-1 file).
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    ca TEXT NOT NULL,
    serial TEXT NOT NULL,
    subject TEXT NOT NULL,
    sans TEXT NOT NULL,
    profile TEXT NOT NULL,
    requester TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    csr_sha256 TEXT NOT NULL,
    der BLOB NOT NULL,
    status TEXT NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'revoked')),
    revoked_at TEXT,
    reason TEXT,
    issued_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    PRIMARY KEY (ca, serial)
);
CREATE INDEX IF NOT EXISTS certificates_status ON certificates (ca, status, not_after);
CREATE INDEX IF NOT EXISTS certificates_crl ON certificates (ca, status, serial, not_after, revoked_at, reason);
CREATE TABLE IF NOT EXISTS crl_numbers (ca TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""
COLUMNS = (
    "ca, serial, subject, sans, profile, requester, not_before, not_after, csr_sha256, der, status, revoked_at, reason"
)
COLUMNS_WITHOUT_DER = COLUMNS.replace(" der,", " X'',")

UNEXPIRED_CONDITION = "WHERE ca=? AND status='revoked' AND not_after>? ORDER BY serial"
REVOKED_UNEXPIRED = f"SELECT {COLUMNS} FROM certificates {UNEXPIRED_CONDITION}"
# Answered from certificates_crl alone, in serial order: no certificate row is read, nothing is sorted.
CRL_ENTRIES = f"SELECT serial, revoked_at, reason FROM certificates {UNEXPIRED_CONDITION}"


def _row_to_record(row: Sequence[object]) -> CertificateRecord:
    (
        ca,
        serial,
        subject,
        sans,
        profile,
        requester,
        not_before,
        not_after,
        csr_sha256,
        der,
        status,
        revoked_at,
        reason,
    ) = row
    return CertificateRecord(
        ca=str(ca),
        serial=str(serial),
        subject=str(subject),
        sans=() if sans == "[]" else tuple(json.loads(str(sans))),  # most devices: no SANs to parse
        profile=str(profile),
        requester=str(requester),
        not_before=from_text(str(not_before)),
        not_after=from_text(str(not_after)),
        csr_sha256=str(csr_sha256),
        der=bytes(der),  # type: ignore[call-overload]
        status=str(status),
        revoked_at=from_text(str(revoked_at)) if revoked_at else None,
        reason=str(reason) if reason else None,
    )


# A damaged file can make even SQLite's error message undecodable: Python then raises UnicodeDecodeError.
SQLITE_ERRORS = (sqlite3.Error, UnicodeDecodeError)


def _describe(exc: Exception) -> str:
    """SQLite's message, printable and short: a damaged file can put its raw bytes into it."""
    text = "".join(c if c.isprintable() else "?" for c in " ".join(str(exc).split()))
    return text if len(text) <= 160 else text[:157] + "..."


class SqliteInventory(Inventory):
    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._create_schema(busy_timeout_s)
            self._db.execute("PRAGMA synchronous=FULL")
        except SQLITE_ERRORS as exc:
            raise BackendError(f"inventory {path} is unusable: {_describe(exc)}") from None

    def _create_schema(self, busy_timeout_s: float) -> None:
        self._enable_wal(busy_timeout_s)
        with self._transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _enable_wal(self, busy_timeout_s: float) -> None:
        """Switch to WAL, retrying: SQLite fails this pragma at once instead of calling the busy
        handler, so processes opening a new inventory together would get "database is locked"."""
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Every SQLite failure (locked, unwritable, corrupted file) becomes one BackendError line."""
        try:
            yield
        except SQLITE_ERRORS as exc:
            raise BackendError(f"inventory {self.path} {doing}: {_describe(exc)}") from None

    def _decode(self, rows: Iterable[Sequence[object]]) -> list[CertificateRecord]:
        try:
            return [_row_to_record(row) for row in rows]
        except (ValueError, TypeError) as exc:  # a damaged file can hold rows of the wrong type
            raise BackendError(f"inventory {self.path} holds an unreadable record: {_describe(exc)}") from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._errors("is busy or unwritable"):
            self._db.execute("BEGIN IMMEDIATE")
        try:
            with self._errors("failed"):
                yield self._db
        except BaseException:
            with suppress(*SQLITE_ERRORS):  # a corrupted file may refuse even this
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except SQLITE_ERRORS as exc:
            with suppress(*SQLITE_ERRORS):
                self._db.execute("ROLLBACK")
            raise BackendError(f"inventory {self.path} commit failed: {_describe(exc)}") from None

    def _rows(self, sql: str, params: Sequence[object]) -> list[CertificateRecord]:
        with self._errors("is unreadable"):
            rows = self._db.execute(sql, params).fetchall()
        return self._decode(rows)

    def record_issued(self, records: Sequence[CertificateRecord]) -> None:
        rows = [
            (
                r.ca,
                r.serial,
                r.subject,
                json.dumps(list(r.sans)),
                r.profile,
                r.requester,
                to_text(r.not_before),
                to_text(r.not_after),
                r.csr_sha256,
                r.der,
            )
            for r in records
        ]
        with self._transaction() as db:
            try:
                db.executemany(
                    "INSERT INTO certificates (ca, serial, subject, sans, profile, requester, not_before,"
                    " not_after, csr_sha256, der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise SerialCollision() from None
                raise BackendError(f"inventory {self.path} rejected a record: {_describe(exc)}") from None

    def get(self, ca: str, serial: str) -> CertificateRecord | None:
        rows = self._rows(f"SELECT {COLUMNS} FROM certificates WHERE ca=? AND serial=?", (ca, serial))
        return rows[0] if rows else None

    def revoke(self, ca: str, serial: str, when: datetime, reason: str) -> CertificateRecord:
        with self._transaction() as db:
            row = db.execute("SELECT status FROM certificates WHERE ca=? AND serial=?", (ca, serial)).fetchone()
            if row is None:
                raise NotFound(f"no certificate with serial {serial} issued by CA {ca!r}")
            if row[0] == "revoked":
                raise AlreadyExists(f"certificate {serial} is already revoked")
            db.execute(
                "UPDATE certificates SET status='revoked', revoked_at=?, reason=? WHERE ca=? AND serial=?",
                (to_text(when), reason, ca, serial),
            )
        record = self.get(ca, serial)
        assert record is not None
        return record

    def list_certificates(
        self, ca: str, status: str | None, now: datetime, *, with_der: bool = True
    ) -> list[CertificateRecord]:
        condition, binds_now = status_condition(status, "?")
        params: list[object] = [ca, to_text(now)] if binds_now else [ca]
        columns = COLUMNS if with_der else COLUMNS_WITHOUT_DER
        return self._rows(f"SELECT {columns} FROM certificates WHERE ca=?{condition} ORDER BY issued_at, rowid", params)

    def revoked_unexpired(self, ca: str, now: datetime) -> list[CertificateRecord]:
        return self._rows(REVOKED_UNEXPIRED, (ca, to_text(now)))

    def revocation_count(self, ca: str) -> int:
        with self._errors("is unreadable"):
            row = self._db.execute(
                "SELECT COUNT(*) FROM certificates WHERE ca=? AND status='revoked'", (ca,)
            ).fetchone()
            return int(row[0])

    @staticmethod
    def _take_crl_number(db: sqlite3.Connection, ca: str) -> int:
        db.execute(
            "INSERT INTO crl_numbers (ca, last) VALUES (?, 1) ON CONFLICT(ca) DO UPDATE SET last = last + 1", (ca,)
        )
        return int(db.execute("SELECT last FROM crl_numbers WHERE ca=?", (ca,)).fetchone()[0])

    def next_crl_number(self, ca: str) -> int:
        with self._transaction() as db:
            return self._take_crl_number(db, ca)

    def crl_snapshot(self, ca: str, clock: Callable[[], datetime]) -> CrlSnapshot:
        # BEGIN IMMEDIATE holds SQLite's one write lock: revocations and other snapshots wait for this one.
        with self._transaction() as db:
            number = self._take_crl_number(db, ca)
            this_update = clock().replace(microsecond=0)
            revoked = list(map(revoked_row, db.execute(CRL_ENTRIES, (ca, to_text(this_update)))))
        return CrlSnapshot(number, this_update, revoked)

    def close(self) -> None:
        self._db.close()
