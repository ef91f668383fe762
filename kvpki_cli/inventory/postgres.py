"""PostgreSQL inventory: for a CA that several machines share.

Same semantics as the SQLite backend (``sqlite.py``), in native types
(``timestamptz``, ``bytea``, ``text[]``) so operators can query the tables
directly.  Timestamps are stored and compared at whole seconds in UTC, exactly
as SQLite's text timestamps are, so both backends agree on what is expired.

This module is imported only when a ``postgresql://`` URL is configured, so
psycopg stays an optional dependency (``pip install 'kvpki[postgres]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

from kvpki_cli.errors import AlreadyExists, BackendError, NotFound, UsageError
from kvpki_cli.inventory.base import (
    CRLS_KEPT,
    CertificateRecord,
    CrlSnapshot,
    CrlState,
    Inventory,
    LifecycleCounts,
    SerialCollision,
    StoredCrl,
    crl_key,
    fill_partitions,
    revoked_row,
    status_condition,
)

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
except ImportError:  # pragma: no cover - depends on the installation
    raise BackendError("the PostgreSQL inventory needs psycopg: pip install 'kvpki[postgres]'") from None

SCHEMA_VERSION = 1
CONNECT_TIMEOUT_S = 10
# Key of the advisory lock that serialises first-time schema creation: concurrent
# CREATE TABLE IF NOT EXISTS can still fail on the catalog's unique indexes.
SCHEMA_LOCK = 0x6B76706B69  # "kvpki"

# What a CRL is read from, in the order it lists: an index-only scan, no sort, no certificate read.
# Not part of the version: a version-1 database gets it on the next connection (older kvpki ignores it).
CRL_INDEX = (
    "CREATE INDEX IF NOT EXISTS kvpki_certificates_crl ON kvpki_certificates"
    ' (ca, status, serial COLLATE "C") INCLUDE (not_after, revoked_at, reason)'
)
# Columns newer than schema version 1, added on connection when missing (not part of the version):
# the serial a renewal replaced, and the key generation that signed each row (rows from before: key 0).
ADDED_COLUMNS = {"replaces": "text", "issuer_generation": "integer NOT NULL DEFAULT 0"}
# CRL partitions (RFC 5280 5.2.5), not part of the version either: added on the next connection.
PARTITION_SCHEMA = (
    "ALTER TABLE kvpki_certificates ADD COLUMN IF NOT EXISTS crl_partition integer",
    "CREATE INDEX IF NOT EXISTS kvpki_certificates_partition_crl ON kvpki_certificates"
    ' (ca, crl_partition, status, serial COLLATE "C") INCLUDE (not_after, revoked_at, reason)',
    "CREATE TABLE IF NOT EXISTS kvpki_crl_partitions"
    " (ca text PRIMARY KEY, last_partition integer NOT NULL, filled integer NOT NULL)",
)
# Advisory lock class of "one instance signs the next CRL of a CA" (second key: hashtext of the CA name).
CRL_LOCK = 0x6B63726C  # "kcrl"
CRL_LOCK_TIMEOUT = "120s"  # longer than signing a 1M-entry CRL; a holder that dies releases it at once
# Created on first use (no schema version bump): the signed CRLs every serve instance publishes.
CRLS_TABLE = """
    CREATE TABLE IF NOT EXISTS kvpki_crls (
        ca          text        NOT NULL,
        number      bigint      NOT NULL,
        this_update timestamptz NOT NULL,
        next_update timestamptz NOT NULL,
        revocations bigint      NOT NULL,
        der         bytea       NOT NULL,
        stored_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (ca, number)
    )
"""

# Table names carry a prefix: unlike the private SQLite file, a PostgreSQL
# database may be shared with other applications.  They are unqualified, so
# ``?options=-csearch_path%3Dpki`` in the URL picks a schema.
SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS kvpki_certificates (
        ca          text        NOT NULL,
        serial      text        NOT NULL,
        subject     text        NOT NULL,
        sans        text[]      NOT NULL,
        profile     text        NOT NULL,
        requester   text        NOT NULL,
        not_before  timestamptz NOT NULL,
        not_after   timestamptz NOT NULL,
        csr_sha256  text        NOT NULL,
        der         bytea       NOT NULL,
        status      text        NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'revoked')),
        revoked_at  timestamptz,
        reason      text,
        issued_at   timestamptz NOT NULL DEFAULT now(),
        id          bigint      GENERATED ALWAYS AS IDENTITY,
        replaces    text,
        crl_partition integer,
        PRIMARY KEY (ca, serial)
    )
    """,
    "CREATE INDEX IF NOT EXISTS kvpki_certificates_status ON kvpki_certificates (ca, status, not_after)",
    "CREATE TABLE IF NOT EXISTS kvpki_crl_numbers (ca text PRIMARY KEY, last bigint NOT NULL)",
    CRL_INDEX,
    *PARTITION_SCHEMA,
    "CREATE TABLE IF NOT EXISTS kvpki_schema (version integer NOT NULL)",
)

# The columns in CertificateRecord's field order, so a row maps onto a record positionally.
COLUMNS = ", ".join(CertificateRecord._fields)
COLUMNS_WITHOUT_DER = COLUMNS.replace(" der,", " ''::bytea,")
INSERT = (
    "INSERT INTO kvpki_certificates (ca, serial, subject, sans, profile, requester, not_before, not_after,"
    " csr_sha256, der, replaces, crl_partition, issuer_generation)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
# COLLATE "C": byte order, as SQLite sorts text, whatever the database's locale.
UNEXPIRED_CONDITION = "WHERE ca = %s AND status = 'revoked' AND not_after > %s ORDER BY serial COLLATE \"C\""
REVOKED_UNEXPIRED = f"SELECT {COLUMNS} FROM kvpki_certificates {UNEXPIRED_CONDITION}"
# The revocation time as the text SQLite stores (base.to_text): the CRL encoder takes it as is.
CRL_ENTRIES = (
    "SELECT serial, to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), reason"
    f" FROM kvpki_certificates {UNEXPIRED_CONDITION}"
)
PARTITION_CRL_ENTRIES = CRL_ENTRIES.replace("WHERE ca = %s", "WHERE ca = %s AND crl_partition = %s")


def utc_seconds(value: datetime) -> datetime:
    """What SQLite's ``to_text`` keeps of a timestamp: UTC, whole seconds."""
    return value.astimezone(UTC).replace(microsecond=0)


def _row_to_record(row: Sequence[Any]) -> CertificateRecord:
    """psycopg already returns str/bytes/list/datetime; only normalise to tuple, UTC and NULL reasons."""
    record = CertificateRecord._make(row)
    return record._replace(
        sans=tuple(record.sans),
        not_before=record.not_before.astimezone(UTC),
        not_after=record.not_after.astimezone(UTC),
        revoked_at=record.revoked_at.astimezone(UTC) if record.revoked_at else None,
        reason=record.reason or None,
    )


def _revocations(ca: str, partition: int | None) -> tuple[str, tuple[Any, ...]]:
    """How many certificates of ``ca`` (of one partition) were ever revoked, as SQL and parameters."""
    if partition is None:
        return "SELECT count(*) FROM kvpki_certificates WHERE ca = %s AND status = 'revoked'", (ca,)
    return (
        "SELECT count(*) FROM kvpki_certificates WHERE ca = %s AND crl_partition = %s AND status = 'revoked'",
        (ca, partition),
    )


def redact_url(url: str) -> str:
    """The URL without password or query string: what error messages may show."""
    scheme, netloc, path, _query, _fragment = urlsplit(url)
    userinfo, at, hosts = netloc.rpartition("@")
    return f"{scheme}://{userinfo.split(':', 1)[0]}{at}{hosts}{path}"


def _url_secrets(url: str) -> set[str]:
    """Every spelling of the password in ``url`` (userinfo or ``?password=``), raw and decoded."""
    parts = urlsplit(url)
    found = {parts.netloc.rpartition("@")[0].partition(":")[2]}
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if unquote(key) == "password":
            found.add(value)
    return {variant for secret in found if secret for variant in (secret, unquote(secret), unquote_plus(secret))}



def _listing(ca: str, status: str | None, now: datetime, with_der: bool) -> tuple[str, list[Any]]:
    """The SELECT of ``list_certificates`` and its parameters."""
    condition, binds_now = status_condition(status, "%s")
    params: list[Any] = [ca, utc_seconds(now)] if binds_now else [ca]
    columns = COLUMNS if with_der else COLUMNS_WITHOUT_DER
    return f"SELECT {columns} FROM kvpki_certificates WHERE ca = %s{condition} ORDER BY issued_at, id", params

class PostgresInventory(Inventory):
    """One connection per instance (the EST server keeps one instance per worker thread)."""

    def __init__(self, url: str, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        self._url = url
        self._where = redact_url(url)
        self._secrets = _url_secrets(url)
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise UsageError(f"invalid inventory URL {self._where}: {self._clean(exc)}") from None
        # libpq has no connect timeout by default: an unreachable host would hang for minutes.
        self._defaults: dict[str, Any] = {}
        if "connect_timeout" not in params:
            self._defaults["connect_timeout"] = connect_timeout_s
        if "application_name" not in params:
            self._defaults["application_name"] = "kvpki"
        self._db = self._connect()
        self._ensure_schema()

    def _clean(self, exc: BaseException) -> str:
        """The error's first line, with any spelling of the password removed."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0] if lines else type(exc).__name__
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text.removeprefix("connection failed: ")

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            # autocommit: reads are single statements; writes open explicit transactions.
            # prepare_threshold=None: no server-side prepared statements, which break
            # behind a transaction-pooling pgbouncer and gain nothing for short-lived processes.
            return psycopg.connect(self._url, autocommit=True, prepare_threshold=None, **self._defaults)
        except psycopg.Error as exc:
            raise BackendError(f"cannot connect to inventory database {self._where}: {self._clean(exc)}") from None

    def _connection(self) -> psycopg.Connection[Any]:
        """The connection, reopened if the server dropped it (a restart under a long-running EST server)."""
        if self._db.closed or self._db.broken:
            self._db = self._connect()
        return self._db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Database failures become one-line BackendErrors; kvpki's own exceptions pass through."""
        try:
            yield
        except psycopg.Error as exc:
            raise BackendError(f"inventory database {self._where} failed: {self._clean(exc)}") from None

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """Commit on success, roll back on any exception (including kvpki's own)."""
        db = self._connection()
        with self._errors(), db.transaction(), db.cursor() as cursor:
            yield cursor

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._errors():
            return self._connection().execute(sql, params).fetchall()

    def _ensure_schema(self) -> None:
        """Create the tables once; later connections only read the version (no DDL rights needed)."""
        with self._transaction() as cursor:
            version = self._schema_version(cursor)
            if (
                version == SCHEMA_VERSION
                and self._has_crl_index(cursor)
                and self._has_partitions(cursor)
                and all(self._has_column(cursor, column) for column in ADDED_COLUMNS)
            ):
                return
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            version = self._schema_version(cursor)  # another process may have won the race
            if version is not None and version > SCHEMA_VERSION:
                raise BackendError(
                    f"inventory database {self._where} has schema version {version}, newer than this kvpki"
                    f" supports ({SCHEMA_VERSION}): upgrade kvpki"
                )
            if version != SCHEMA_VERSION:
                for statement in SCHEMA:
                    cursor.execute(statement)
                cursor.execute("DELETE FROM kvpki_schema")
                cursor.execute("INSERT INTO kvpki_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            else:
                self._create_crl_index(cursor)
                self._add_partitions(cursor)
            for column, definition in ADDED_COLUMNS.items():
                if not self._has_column(cursor, column):  # ALTER needs ownership even when nothing changes
                    cursor.execute(f"ALTER TABLE kvpki_certificates ADD COLUMN IF NOT EXISTS {column} {definition}")

    @staticmethod
    def _add_partitions(cursor: psycopg.Cursor[Any]) -> None:
        """What CRL partitions add to an older database, once: the column and the counter table (needed
        to record certificates: without them a role lacking DDL rights fails until the owner connects),
        then the index (optional, like the CRL index)."""
        row = cursor.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'kvpki_certificates'::regclass"
            " AND attname = 'crl_partition' AND NOT attisdropped"
        ).fetchone()
        if not row or not row[0]:
            cursor.execute(PARTITION_SCHEMA[0])
        if cursor.execute("SELECT to_regclass('kvpki_crl_partitions') IS NULL").fetchone() == (True,):
            cursor.execute(PARTITION_SCHEMA[2])
        try:
            with cursor.connection.transaction():
                cursor.execute(PARTITION_SCHEMA[1])
        except pg_errors.InsufficientPrivilege:
            pass

    @staticmethod
    def _has_partitions(cursor: psycopg.Cursor[Any]) -> bool:
        row = cursor.execute(
            "SELECT to_regclass('kvpki_certificates_partition_crl') IS NOT NULL"
            " AND to_regclass('kvpki_crl_partitions') IS NOT NULL"
        ).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _create_crl_index(cursor: psycopg.Cursor[Any]) -> None:
        """Once, on the first connection after an upgrade.  A role without DDL rights still works
        (CRLs are then read by a slower plan) until one with them connects."""
        try:
            with cursor.connection.transaction():  # a savepoint: the refusal must not end the transaction
                cursor.execute(CRL_INDEX)
        except pg_errors.InsufficientPrivilege:
            pass

    @staticmethod
    def _has_column(cursor: psycopg.Cursor[Any], column: str) -> bool:
        row = cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('kvpki_certificates')"
            " AND attname = %s AND NOT attisdropped)",
            (column,),
        ).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _has_crl_index(cursor: psycopg.Cursor[Any]) -> bool:
        row = cursor.execute("SELECT to_regclass('kvpki_certificates_crl') IS NOT NULL").fetchone()
        return bool(row and row[0])

    @staticmethod
    def _schema_version(cursor: psycopg.Cursor[Any]) -> int | None:
        row = cursor.execute("SELECT to_regclass('kvpki_schema') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return None
        row = cursor.execute("SELECT max(version) FROM kvpki_schema").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def record_issued(self, records: Sequence[CertificateRecord]) -> None:
        rows = [
            (
                r.ca,
                r.serial,
                r.subject,
                list(r.sans),
                r.profile,
                r.requester,
                utc_seconds(r.not_before),
                utc_seconds(r.not_after),
                r.csr_sha256,
                r.der,
                r.replaces,
                r.crl_partition,
                r.issuer_generation,
            )
            for r in records
        ]
        with self._transaction() as cursor:
            try:
                cursor.executemany(INSERT, rows)
            except (pg_errors.UniqueViolation, pg_errors.DeadlockDetected):
                # A deadlock between insert-only batches can only come from a shared (ca, serial).
                raise SerialCollision() from None

    def get(self, ca: str, serial: str) -> CertificateRecord | None:
        rows = self._query(f"SELECT {COLUMNS} FROM kvpki_certificates WHERE ca = %s AND serial = %s", (ca, serial))
        return _row_to_record(rows[0]) if rows else None

    def revoke(self, ca: str, serial: str, when: datetime, reason: str) -> CertificateRecord:
        with self._transaction() as cursor:
            # FOR UPDATE: of two concurrent revocations, the second sees 'revoked' (AlreadyExists).
            row = cursor.execute(
                "SELECT status FROM kvpki_certificates WHERE ca = %s AND serial = %s FOR UPDATE", (ca, serial)
            ).fetchone()
            if row is None:
                raise NotFound(f"no certificate with serial {serial} issued by CA {ca!r}")
            if row[0] == "revoked":
                raise AlreadyExists(f"certificate {serial} is already revoked")
            updated = cursor.execute(
                "UPDATE kvpki_certificates SET status = 'revoked', revoked_at = %s, reason = %s"
                f" WHERE ca = %s AND serial = %s RETURNING {COLUMNS}",
                (utc_seconds(when), reason, ca, serial),
            ).fetchone()
        assert updated is not None
        return _row_to_record(updated)

    def list_certificates(
        self, ca: str, status: str | None, now: datetime, *, with_der: bool = True
    ) -> list[CertificateRecord]:
        return [_row_to_record(row) for row in self._query(*_listing(ca, status, now, with_der))]

    def iter_certificates(
        self, ca: str, status: str | None, now: datetime, *, with_der: bool = True
    ) -> Iterator[CertificateRecord]:
        """Rows as the server sends them (psycopg's single-row mode), not one list of all."""
        with self._errors(), self._connection().cursor() as cursor:
            for row in cursor.stream(*_listing(ca, status, now, with_der)):
                yield _row_to_record(row)

    def revoked_unexpired(self, ca: str, now: datetime) -> list[CertificateRecord]:
        return [_row_to_record(row) for row in self._query(REVOKED_UNEXPIRED, (ca, utc_seconds(now)))]

    def revocation_count(self, ca: str, partition: int | None = None) -> int:
        sql, params = _revocations(ca, partition)
        return int(self._query(sql, params)[0][0])

    def reserve_crl_partitions(self, ca: str, count: int, size: int) -> list[int]:
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO kvpki_crl_partitions (ca, last_partition, filled) VALUES (%s, 0, 0)"
                " ON CONFLICT (ca) DO NOTHING",
                (ca,),
            )
            row = cursor.execute(
                "SELECT last_partition, filled FROM kvpki_crl_partitions WHERE ca = %s FOR UPDATE", (ca,)
            ).fetchone()
            assert row is not None
            assigned, partition, filled = fill_partitions(int(row[0]), int(row[1]), count, size)
            cursor.execute(
                "UPDATE kvpki_crl_partitions SET last_partition = %s, filled = %s WHERE ca = %s",
                (partition, filled, ca),
            )
        return assigned

    def last_crl_partition(self, ca: str) -> int | None:
        rows = self._query("SELECT last_partition FROM kvpki_crl_partitions WHERE ca = %s", (ca,))
        return int(rows[0][0]) if rows else None

    @staticmethod
    def _take_crl_number(cursor: psycopg.Cursor[Any], ca: str) -> int:
        # One statement: the row lock taken by ON CONFLICT DO UPDATE serialises concurrent callers
        # and is held until the transaction ends.
        row = cursor.execute(
            "INSERT INTO kvpki_crl_numbers (ca, last) VALUES (%s, 1)"
            " ON CONFLICT (ca) DO UPDATE SET last = kvpki_crl_numbers.last + 1 RETURNING last",
            (ca,),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def next_crl_number(self, ca: str) -> int:
        with self._transaction() as cursor:
            return self._take_crl_number(cursor, ca)

    def crl_snapshot(
        self, ca: str, clock: Callable[[], datetime], partition: int | None = None, *, generation: int | None = None
    ) -> CrlSnapshot:
        # READ COMMITTED: the SELECT runs after the number's row lock is granted, i.e. after the
        # snapshot holding the previous number committed, and sees every revocation committed before.
        with self._transaction() as cursor:
            number = self._take_crl_number(cursor, ca)
            this_update = utc_seconds(clock())
            # fetchall: psycopg loads rows in C (iterating calls Python per row); then tuple -> RevokedRow in C.
            sql, params = CRL_ENTRIES, [ca, this_update]
            if partition is not None:
                sql, params = PARTITION_CRL_ENTRIES, [ca, partition, this_update]
            if generation is not None:  # one key generation's CRL (kvpki rollover)
                sql = sql.replace("WHERE ca = %s", "WHERE ca = %s AND issuer_generation = %s", 1)
                params = [ca, generation, *params[1:]]
            cursor.execute(sql, params)
            revoked = list(map(revoked_row, cursor.fetchall()))
        return CrlSnapshot(number, this_update, revoked)

    def _crls_table(self) -> None:
        if getattr(self, "_crls_ready", False):
            return
        with self._transaction() as cursor:
            if cursor.execute("SELECT to_regclass('kvpki_crls') IS NULL").fetchone() == (True,):
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                cursor.execute(CRLS_TABLE)
                # CRLs are signed DER: compressing megabytes that will not shrink only costs time on every store.
                cursor.execute("ALTER TABLE kvpki_crls ALTER COLUMN der SET STORAGE EXTERNAL")
        self._crls_ready = True

    def crl_lock(self, ca: str) -> AbstractContextManager[None]:
        return self._crl_lock(ca)

    @contextmanager
    def _crl_lock(self, ca: str) -> Iterator[None]:
        # A session-level advisory lock on this connection: it outlives the transactions in between
        # (the CRL snapshot, the insert) and is released if the process or its connection dies.
        self._crls_table()
        with self._transaction() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{CRL_LOCK_TIMEOUT}'")
            cursor.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (CRL_LOCK, ca))
        try:
            yield
        finally:
            with suppress(BackendError):  # a lost connection has released the lock already
                self._query("SELECT pg_advisory_unlock(%s, hashtext(%s))", (CRL_LOCK, ca))

    def crl_state(self, ca: str, partition: int | None = None) -> CrlState:
        self._crls_table()
        count, params = _revocations(ca, partition)
        rows = self._query(
            f"SELECT ({count}), (SELECT max(number) FROM kvpki_crls WHERE ca = %s)", (*params, crl_key(ca, partition))
        )
        revocations, latest = rows[0]
        return CrlState(int(revocations), None if latest is None else int(latest))

    def latest_crl(self, ca: str, *, with_der: bool = True) -> StoredCrl | None:
        self._crls_table()
        der_column = "der" if with_der else "NULL"
        rows = self._query(
            f"SELECT number, this_update, next_update, revocations, {der_column} FROM kvpki_crls WHERE ca = %s"
            " ORDER BY number DESC LIMIT 1",
            (ca,),
        )
        if not rows:
            return None
        number, this_update, next_update, revocations, der = rows[0]
        return StoredCrl(int(number), this_update.astimezone(UTC), next_update.astimezone(UTC), int(revocations),
                         bytes(der or b""))  # fmt: skip

    def store_crl(self, ca: str, crl: StoredCrl) -> None:
        self._crls_table()
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO kvpki_crls (ca, number, this_update, next_update, revocations, der)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (ca, crl.number, utc_seconds(crl.this_update), utc_seconds(crl.next_update), crl.revocations, crl.der),
            )
            cursor.execute("DELETE FROM kvpki_crls WHERE ca = %s AND number <= %s", (ca, crl.number - CRLS_KEPT))

    def close(self) -> None:
        self._db.close()

    # --- lifecycle reporting (kvpki list --expiring, kvpki report)

    def expiring(self, ca: str, now: datetime, until: datetime) -> list[CertificateRecord]:
        query = (
            f"SELECT {COLUMNS} FROM kvpki_certificates WHERE ca = %s AND status = 'valid'"
            ' AND not_after > %s AND not_after <= %s ORDER BY not_after, serial COLLATE "C"'
        )
        return [_row_to_record(row) for row in self._query(query, (ca, utc_seconds(now), utc_seconds(until)))]

    def lifecycle_counts(self, ca: str | None, now: datetime) -> list[LifecycleCounts]:
        # One scan grouped by (ca, profile), hash-joined against the set of subjects that have a valid
        # certificate: no per-row subquery, no index on subject needed.
        only = " AND ca = %(ca)s" if ca is not None else ""
        query = f"""
            WITH live AS (SELECT DISTINCT ca, subject FROM kvpki_certificates
                          WHERE status = 'valid' AND not_after > %(now)s{only})
            SELECT c.ca, c.profile,
                   count(*) FILTER (WHERE c.status = 'valid' AND c.not_after > %(now)s),
                   count(*) FILTER (WHERE c.status = 'valid' AND c.not_after > %(now)s AND 5 * %(now_s)s::bigint >=
                       4 * extract(epoch FROM c.not_after)::bigint + extract(epoch FROM c.not_before)::bigint),
                   count(*) FILTER (WHERE c.status = 'valid' AND c.not_after <= %(now)s),
                   count(*) FILTER (WHERE c.status = 'valid' AND c.not_after <= %(now)s AND l.subject IS NULL),
                   count(*) FILTER (WHERE c.status = 'revoked')
            FROM kvpki_certificates c LEFT JOIN live l ON l.ca = c.ca AND l.subject = c.subject
            WHERE true{only.replace("ca =", "c.ca =")}
            GROUP BY c.ca, c.profile ORDER BY c.ca COLLATE "C", c.profile COLLATE "C"
        """
        params = {"ca": ca, "now": utc_seconds(now), "now_s": int(now.timestamp())}
        with self._errors():
            rows = self._connection().execute(query, params).fetchall()
        return [LifecycleCounts(str(r[0]), str(r[1]), *(int(v) for v in r[2:])) for r in rows]

    # --- serving: enrollment rate limits (kvpki serve), created on first use like kvpki_crls

    def rate_count(self, key: str, window_start: int) -> int:
        if not getattr(self, "_rates_ready", False):
            with self._transaction() as cursor:
                if cursor.execute("SELECT to_regclass('kvpki_rate_counters') IS NULL").fetchone() == (True,):
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    cursor.execute(RATES_TABLE)
            self._rates_ready = True
        with self._transaction() as cursor:
            cursor.execute("SET LOCAL synchronous_commit = off")  # a counter is not worth a WAL flush wait
            row = cursor.execute(
                "INSERT INTO kvpki_rate_counters (key, window_start, hits) VALUES (%s, %s, 1)"
                " ON CONFLICT (key, window_start) DO UPDATE SET hits = kvpki_rate_counters.hits + 1"
                " RETURNING hits",
                (key, window_start),
            ).fetchone()
            cursor.execute("DELETE FROM kvpki_rate_counters WHERE key = %s AND window_start < %s", (key, window_start))
        return int(row[0]) if row else 0

    def count_expiring(self, ca: str, now: datetime, until: datetime) -> int:
        rows = self._query(
            "SELECT COUNT(*) FROM kvpki_certificates WHERE ca = %s AND status = 'valid'"
            " AND not_after > %s AND not_after <= %s",
            (ca, utc_seconds(now), utc_seconds(until)),
        )
        return int(rows[0][0])

    def ping(self) -> None:
        self._query("SELECT 1", ())


RATES_TABLE = """
CREATE TABLE IF NOT EXISTS kvpki_rate_counters (
    key text NOT NULL,
    window_start bigint NOT NULL,
    hits bigint NOT NULL,
    PRIMARY KEY (key, window_start)
)
"""
