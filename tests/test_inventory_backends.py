"""One behavioural contract, run against every inventory backend (SQLite and a real PostgreSQL).

The backends must be interchangeable: a CA can move from SQLite to a shared
PostgreSQL without any command behaving differently.  PostgreSQL runs as a real
server (tests/pg_fixture.py); these tests are skipped only if it cannot start.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509

from kvpki_cli.errors import EXIT_BACKEND, EXIT_USAGE, AlreadyExists, NotFound, UsageError
from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import CertificateRecord, Inventory, SerialCollision
from tests.helpers import ec_csr_pem

if TYPE_CHECKING:  # imported for real by pytest_plugins, so pytest can rewrite its asserts
    from tests.pg_fixture import PostgresServer


REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
WORKERS = 8
INSERTS_PER_WORKER = 25
CRL_NUMBERS_PER_WORKER = 5
SHARED_SERIAL = "c0ffee"


def make_record(
    ca: str = "root",
    serial: str | None = None,
    *,
    not_after: datetime = NOW + timedelta(days=30),
    sans: tuple[str, ...] = ("DNS:device.example", "IP:192.0.2.1"),
) -> CertificateRecord:
    return CertificateRecord(
        ca=ca,
        serial=serial or secrets.token_hex(19),
        subject="CN=device-ü,O=Example",
        sans=sans,
        profile="device",
        requester="pytest",
        not_before=NOW - timedelta(days=1),
        not_after=not_after,
        csr_sha256=secrets.token_hex(32),
        der=b"\x30\x00\x00\xff" + secrets.token_bytes(64),
    )


def stored(record: CertificateRecord) -> CertificateRecord:
    """What every backend gives back: timestamps in UTC, at whole seconds."""
    return record._replace(
        not_before=record.not_before.astimezone(UTC).replace(microsecond=0),
        not_after=record.not_after.astimezone(UTC).replace(microsecond=0),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def inventory_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty inventory on each backend (no schema yet)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inventory.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def inventory(inventory_url: str, tmp_path: Path) -> Iterator[Inventory]:
    opened = open_inventory(inventory_url, tmp_path)
    yield opened
    opened.close()


def test_record_and_get_round_trip(inventory: Inventory) -> None:
    with_micros = make_record(not_after=NOW + timedelta(days=30, microseconds=654321))
    no_sans = make_record(sans=())
    inventory.record_issued([with_micros, no_sans])

    assert inventory.get("root", with_micros.serial) == stored(with_micros)
    assert inventory.get("root", no_sans.serial) == stored(no_sans)
    assert inventory.get("root", "abc") is None
    assert inventory.get("other", with_micros.serial) is None
    assert inventory.list_certificates("root", None, NOW) == [stored(with_micros), stored(no_sans)]


def test_rows_survive_reopening(inventory_url: str, tmp_path: Path) -> None:
    """The second open finds the schema in place and the rows committed."""
    record = make_record()
    first = open_inventory(inventory_url, tmp_path)
    first.record_issued([record])
    first.close()
    second = open_inventory(inventory_url, tmp_path)
    try:
        assert second.get("root", record.serial) == stored(record)
    finally:
        second.close()


def test_empty_batch_is_a_no_op(inventory: Inventory) -> None:
    inventory.record_issued([])
    assert inventory.list_certificates("root", None, NOW) == []


def test_duplicate_serial_writes_nothing_from_the_batch(inventory: Inventory) -> None:
    first = make_record()
    inventory.record_issued([first])
    fresh = [make_record(), make_record()]
    duplicate = make_record(serial=first.serial)

    with pytest.raises(SerialCollision):
        inventory.record_issued([*fresh, duplicate])
    twin = make_record()
    with pytest.raises(SerialCollision):
        inventory.record_issued([twin, twin._replace(subject="CN=twin")])

    assert inventory.list_certificates("root", None, NOW) == [stored(first)]
    for record in [*fresh, twin]:
        assert inventory.get("root", record.serial) is None
    # Serials are unique per CA, not globally; and the connection is still usable after the rollback.
    inventory.record_issued([duplicate._replace(ca="other")])
    assert inventory.get("other", first.serial) is not None


def test_revoke_unknown_and_twice(inventory: Inventory) -> None:
    record = make_record()
    inventory.record_issued([record])

    with pytest.raises(NotFound):
        inventory.revoke("root", "abcdef", NOW, "keyCompromise")
    with pytest.raises(NotFound):
        inventory.revoke("other", record.serial, NOW, "keyCompromise")

    when = NOW + timedelta(microseconds=500)
    revoked = inventory.revoke("root", record.serial, when, "keyCompromise")
    expected = stored(record)._replace(status="revoked", revoked_at=NOW, reason="keyCompromise")
    assert revoked == expected
    assert inventory.get("root", record.serial) == expected

    with pytest.raises(AlreadyExists):
        inventory.revoke("root", record.serial, NOW + timedelta(hours=1), "superseded")
    assert inventory.get("root", record.serial) == expected  # the first revocation stands


def test_list_filters_by_effective_status(inventory: Inventory) -> None:
    valid = make_record()
    expired = make_record(not_after=NOW - timedelta(days=1))
    boundary = make_record(not_after=NOW)  # notAfter == now counts as expired
    revoked = make_record()
    revoked_expired = make_record(not_after=NOW - timedelta(days=1))
    elsewhere = make_record(ca="other")
    inventory.record_issued([valid, expired, boundary, revoked, revoked_expired, elsewhere])
    inventory.revoke("root", revoked.serial, NOW - timedelta(days=2), "superseded")
    inventory.revoke("root", revoked_expired.serial, NOW - timedelta(days=2), "superseded")
    now = NOW + timedelta(microseconds=999_999)  # sub-second precision must not change the answer

    def serials(status: str | None) -> list[str]:
        return [r.serial for r in inventory.list_certificates("root", status, now)]

    assert serials(None) == [r.serial for r in (valid, expired, boundary, revoked, revoked_expired)]
    assert serials("valid") == [valid.serial]
    assert serials("expired") == [expired.serial, boundary.serial]
    assert serials("revoked") == [revoked.serial, revoked_expired.serial]
    for status in ("valid", "expired", "revoked"):
        assert all(r.effective_status(now) == status for r in inventory.list_certificates("root", status, now))
    assert inventory.revocation_count("root") == 2
    assert inventory.revocation_count("other") == 0
    with pytest.raises(UsageError):  # an unknown filter is an error, not "everything"
        inventory.list_certificates("root", "bogus", now)


def test_revoked_unexpired_is_what_a_crl_lists(inventory: Inventory) -> None:
    live = [make_record(serial=s) for s in ("1f", "a0", "b")]
    dead = make_record(not_after=NOW - timedelta(seconds=1))
    untouched = make_record()
    inventory.record_issued([*live, dead, untouched])
    for record in [*live, dead]:
        inventory.revoke("root", record.serial, NOW - timedelta(days=1), "keyCompromise")

    listed = inventory.revoked_unexpired("root", NOW)
    assert [r.serial for r in listed] == ["1f", "a0", "b"]  # text order of the hex serials
    assert all(r.status == "revoked" and r.revoked_at == NOW - timedelta(days=1) for r in listed)
    assert inventory.revoked_unexpired("other", NOW) == []


def test_crl_numbers_strictly_increase_per_ca(inventory: Inventory) -> None:
    assert [inventory.next_crl_number("root") for _ in range(4)] == [1, 2, 3, 4]
    assert inventory.next_crl_number("other") == 1
    assert inventory.next_crl_number("root") == 5


def _insert_worker(url: str, home: str, barrier: Any, results: Any) -> None:
    """One process like one `kvpki sign-csr`: opens the inventory itself (racing schema creation)."""
    try:
        barrier.wait(timeout=60)
        inventory = open_inventory(url, Path(home))
        serials = []
        for _ in range(INSERTS_PER_WORKER):
            record = make_record(ca="busy")
            inventory.record_issued([record])
            serials.append(record.serial)
        try:
            inventory.record_issued([make_record(ca="busy", serial=SHARED_SERIAL)])
            serials.append(SHARED_SERIAL)
        except SerialCollision:
            pass
        crl_numbers = [inventory.next_crl_number("busy") for _ in range(CRL_NUMBERS_PER_WORKER)]
        inventory.close()
        results.put(("ok", serials, crl_numbers))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}", []))


def test_concurrent_processes_insert_every_row_once(inventory_url: str, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like separate kvpki processes
    barrier = context.Barrier(WORKERS)
    results = context.Queue()
    workers = [
        context.Process(target=_insert_worker, args=(inventory_url, str(tmp_path), barrier, results))
        for _ in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)

    errors = [detail for state, detail, _ in outcomes if state != "ok"]
    assert not errors
    inserted = [serial for _, serials, _ in outcomes for serial in serials]
    assert inserted.count(SHARED_SERIAL) == 1  # exactly one process won the shared serial
    assert len(inserted) == WORKERS * INSERTS_PER_WORKER + 1
    assert len(set(inserted)) == len(inserted)
    crl_numbers = sorted(number for _, _, numbers in outcomes for number in numbers)
    assert crl_numbers == list(range(1, WORKERS * CRL_NUMBERS_PER_WORKER + 1))

    inventory = open_inventory(inventory_url, tmp_path)
    try:
        rows = inventory.list_certificates("busy", None, NOW)
    finally:
        inventory.close()
    assert sorted(r.serial for r in rows) == sorted(inserted)


# --- the CLI on PostgreSQL ---------------------------------------------------------------------------------------


def _kvpki_command() -> list[str]:
    installed = Path(sys.executable).parent / "kvpki"
    return [str(installed)] if installed.exists() else [sys.executable, "-m", "kvpki_cli"]


def _cli(home: Path, url: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "PG"))}
    env.update(KVPKI_HOME=str(home), KVPKI_INVENTORY_URL=url, KVPKI_REQUESTER="pytest", PYTHONPATH=str(REPO))

    def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*_kvpki_command(), *args], input=input, capture_output=True, env=env, timeout=120)

    return run


def _ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_cli_end_to_end_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = _cli(home, postgres_url)
    root = x509.load_pem_x509_certificate(_ok(run("init-ca", "--name", "root", "--subject", "CN=Root")))
    _ok(run("init-ca", "--name", "sub", "--parent", "root", "--subject", "CN=Sub"))  # recorded in root's inventory
    leaf = x509.load_pem_x509_certificate(_ok(run("sign-csr", "--ca", "root", input=ec_csr_pem("device-001"))))
    serial = format(leaf.serial_number, "x")

    revoked = json.loads(_ok(run("revoke", "--ca", "root", "--reason", "keycompromise", serial)))
    assert revoked["serial"] == serial and revoked["status"] == "revoked"

    crls = [x509.load_der_x509_crl(_ok(run("crl", "--ca", "root", "--format", "der", "--new"))) for _ in range(2)]
    assert all(crl.is_signature_valid(root.public_key()) for crl in crls)  # type: ignore[arg-type]
    assert [entry.serial_number for entry in crls[0]] == [leaf.serial_number]
    numbers = [crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for crl in crls]
    assert numbers[0] < numbers[1]

    rows = {row["serial"]: row for row in json.loads(_ok(run("list", "--ca", "root", "--json")))}
    assert rows[serial]["status"] == "revoked" and rows[serial]["subject"] == "CN=device-001"
    assert {row["profile"] for row in rows.values()} == {"sub-ca", "device"}
    assert not (home / "inventory.sqlite3").exists()  # nothing silently fell back to SQLite

    inventory = open_inventory(postgres_url, home)  # and the rows really are in PostgreSQL
    try:
        assert inventory.revocation_count("root") == 1
    finally:
        inventory.close()


@pytest.mark.parametrize(
    ("case", "code"),
    [("refused", EXIT_BACKEND), ("wrong-password", EXIT_BACKEND), ("malformed", EXIT_USAGE)],
)
def test_cli_inventory_failure_is_one_line_without_password(
    postgres_server: PostgresServer, tmp_path: Path, case: str, code: int
) -> None:
    secret = f"S3cret-{secrets.token_hex(8)}"
    if case == "refused":
        url = postgres_server.url(password=secret, port=_closed_port())
    elif case == "wrong-password":
        url = postgres_server.url(password=secret)
    else:
        url = postgres_server.url(password=f"%zz{secret}")  # bad percent-encoding: libpq echoes the token
    run = _cli(tmp_path / "home", url)
    _ok(run("init-ca", "--name", "root", "--subject", "CN=Root"))  # a root CA needs no inventory row

    result = run("sign-csr", "--ca", "root", input=ec_csr_pem("device-001"))

    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert result.stdout == b""
    assert stderr.count("\n") == 1 and stderr.startswith("kvpki: error: "), stderr
    assert "Traceback" not in stderr
    assert secret not in stderr
    assert "127.0.0.1" in stderr  # says where it tried


def _closed_port() -> int:
    """A port nothing listens on (bound then released, as the fixture picks its own)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
