"""One signed CRL per revocation state, shared through the inventory by every process that publishes it.

Several ``kvpki serve`` instances (and ``kvpki crl``) share one inventory.  The
first of them to find the latest stored CRL out of date signs a new one under the
inventory's per-CA CRL lock (a PostgreSQL advisory lock; a lock file for SQLite)
and stores it; the others, waiting on the lock or arriving later, find it current
and publish the very same bytes.  So each change of the revoked set costs one CA
signature however many instances serve the CA, and all of them serve identical
CRLs.  Numbers strictly increase and each CRL lists everything the previous one
listed (``Inventory.crl_snapshot``).

A stored CRL is current while the CA's revocation count is the one read before
its snapshot (nothing revoked since) and less than half of its validity has
passed.  Validity is judged by the wall clock against the stored thisUpdate, so
machines sharing a database need synchronised clocks (NTP).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509

from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.inventory.base import Inventory, StoredCrl, crl_key


def is_current(stored: StoredCrl | None, revocations: int, now: datetime, validity: timedelta | None = None) -> bool:
    """Nothing revoked since ``stored`` was signed, within the first half of its validity (and, if
    ``validity`` is given, signed with exactly that validity)."""
    if stored is None or stored.revocations != revocations:
        return False
    lifetime = stored.next_update - stored.this_update
    if validity is not None and int(lifetime.total_seconds()) != int(validity.total_seconds()):
        return False
    return stored.this_update <= now + timedelta(minutes=5) and now < stored.this_update + lifetime / 2


def published_crl(
    ca: CertificateAuthority,
    validity: timedelta,
    *,
    exact_validity: bool = False,
    new: bool = False,
    partition: int | None = None,
    generation: int | None = None,
) -> StoredCrl:
    """The CA's current CRL: the stored one if current, else a new one signed and stored here.

    ``exact_validity``: a stored CRL signed with another validity is not current (``kvpki crl
    --next-update``); ``serve`` accepts whichever current CRL is stored.  ``new``: sign one anyway
    (``kvpki crl --new``); serve instances then publish it.  ``partition``: the CRL of that
    partition (RFC 5280 5.2.5), stored, locked and judged current on its own.  ``generation``: the CRL
    of that key generation (``kvpki rollover``; default: the current one), stored under ``ca.crl_scope``.
    """
    inventory = ca.inventory
    if partition is not None:
        ca.check_crl_partition(partition)
    number = ca.current().number if generation is None else ca.generation(generation).number
    key = crl_key(ca.name, partition) if partition is not None else ca.crl_scope(number)
    wanted = validity if exact_validity else None
    stored = None if new else _current(inventory, ca.name, partition, wanted, key)
    if stored is not None:
        return stored
    with inventory.crl_lock(key):
        # Look again under the lock: another process may have signed while we waited.
        stored = None if new else _current(inventory, ca.name, partition, wanted, key)
        if stored is not None:
            return stored
        # Before the snapshot: never newer than the CRL.  Counted over every key generation.
        revocations = inventory.revocation_count(ca.name, partition)
        der = ca.crl_der(validity, partition, number)
        crl = x509.load_der_x509_crl(der)  # for its number and dates; the DER is kept as signed (a 1M-entry
        # CRL re-encoded by public_bytes costs more than its entries took to write)
        fresh = StoredCrl(
            number=crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number,
            this_update=crl.last_update_utc,
            next_update=crl.next_update_utc or crl.last_update_utc + validity,
            revocations=revocations,
            der=der,
        )
        inventory.store_crl(key, fresh)
        return fresh


def _current(
    inventory: Inventory, ca: str, partition: int | None, validity: timedelta | None, key: str | None = None
) -> StoredCrl | None:
    """The latest stored CRL (under ``key``, default the CA's or partition's) if it is current; its bytes
    are read only then (a CRL may be 50 MB)."""
    key = key or crl_key(ca, partition)
    revocations = inventory.revocation_count(ca, partition)
    head = inventory.latest_crl(key, with_der=False)
    if not is_current(head, revocations, datetime.now(UTC), validity):
        return None
    stored = inventory.latest_crl(key)
    return stored if stored is not None and stored.number == head.number else None  # type: ignore[union-attr]
