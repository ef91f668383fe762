"""Partitioned CRLs (RFC 5280 5.2.5, issue 8 goal 2): each leaf gets the CRL DP of its partition at
issuance, each partition's CRL carries a critical issuingDistributionPoint naming that URL and lists only
that partition's revocations.  Checked with openssl (verify -crl_check matches IDP and CRL DP), pkilint
and pyhanko-certvalidator, on SQLite and PostgreSQL; partitions of 3 certificates keep it fast."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpki_cli.errors import EXIT_NOT_FOUND, EXIT_USAGE
from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import fill_partitions
from tests.conftest import Kvpki, StoreSetup, make_env
from tests.helpers import load_cert, openssl_verify, pkilint_findings, write
from tests.test_path_validation import _validator

BASE = "http://pki.example.test"
SIZE = 3
LEAVES = 7  # partitions 0, 1 (full) and 2 (one certificate)


@pytest.fixture(params=["sqlite", "postgresql"])
def inventory_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inventory.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


def runner(tmp_path: Path, url: str) -> Kvpki:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[defaults]\nbase_url = "{BASE}"\n\n[ca.issuing]\ncrl_partition_size = {SIZE}\n'
    )
    return Kvpki(home, make_env(home, {"KVPKI_INVENTORY_URL": url}), StoreSetup("local"))


def crl_dp(certificate: x509.Certificate) -> str:
    points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return str(points[0].full_name[0].value)  # type: ignore[index]


def pem_crl(kvpki: Kvpki, ca: str, *extra: str) -> bytes:
    return kvpki.ok("crl", "--ca", ca, *extra)


def test_partitions_from_issuance_to_validation(inventory_url: str, make_csr, tmp_path: Path) -> None:
    kvpki = runner(tmp_path, inventory_url)
    root = kvpki.init_ca("root", "--subject", "CN=Partition Root")
    issuing = kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=Partition Issuing")
    leaves = [kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr(f"/CN=dev-{i}").csr_pem) for i in range(LEAVES)]
    sub_ca = kvpki.init_ca("sub", "--parent", "issuing", "--subject", "CN=Partition Sub")  # a CA: full CRL

    # At issuance: the CRL DP of the partition, recorded in the inventory; partitions hold SIZE at most.
    certificates = [load_cert(pem) for pem in leaves]
    inventory = open_inventory(inventory_url, kvpki.home)
    for index, certificate in enumerate(certificates):
        assert crl_dp(certificate) == f"{BASE}/crl/issuing/{index // SIZE}.crl"
        assert inventory.get("issuing", format(certificate.serial_number, "x")).crl_partition == index // SIZE  # type: ignore[union-attr]
    sub_certificate = load_cert(sub_ca.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    assert crl_dp(sub_certificate) == f"{BASE}/crl/issuing.crl"
    assert inventory.get("issuing", format(sub_certificate.serial_number, "x")).crl_partition is None  # type: ignore[union-attr]
    inventory.close()
    assert pkilint_findings(write(tmp_path / "leaf.pem", leaves[3])) == ""

    # Revoke one of partition 0 and one of partition 2 (and the sub-CA: full CRL only).
    revoked = {0: certificates[1], 2: certificates[6]}
    for certificate in [*revoked.values(), sub_certificate]:
        kvpki.ok("revoke", format(certificate.serial_number, "x"), "--ca", "issuing", "--reason", "keyCompromise")

    partition_crls = {k: pem_crl(kvpki, "issuing", "--partition", str(k)) for k in range(3)}
    full = x509.load_pem_x509_crl(pem_crl(kvpki, "issuing"))
    numbers = []
    for k, pem in partition_crls.items():
        crl = x509.load_pem_x509_crl(pem)
        assert crl.is_signature_valid(load_cert(issuing).public_key())  # type: ignore[arg-type]
        idp = crl.extensions.get_extension_for_oid(ExtensionOID.ISSUING_DISTRIBUTION_POINT)
        assert idp.critical
        assert [n.value for n in idp.value.full_name] == [f"{BASE}/crl/issuing/{k}.crl"]  # type: ignore[union-attr]
        assert idp.value.only_contains_user_certs and not idp.value.only_contains_ca_certs  # type: ignore[attr-defined]
        expected = {revoked[k].serial_number} if k in revoked else set()
        assert {entry.serial_number for entry in crl} == expected
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
        assert pkilint_findings(write(tmp_path / f"p{k}.crl.pem", pem), "crl") == ""
    assert len(set(numbers)) == 3  # one per-CA sequence: monotonic within every scope
    # The full CRL (no IDP) stays and lists everything, CA certificates included.
    assert {e.serial_number for e in full} == {c.serial_number for c in [*revoked.values(), sub_certificate]}
    with pytest.raises(x509.ExtensionNotFound):
        full.extensions.get_extension_for_oid(ExtensionOID.ISSUING_DISTRIBUTION_POINT)

    # openssl matches the partition CRL's IDP with the certificate's CRL DP.
    def verify(leaf: bytes, crl: bytes) -> subprocess.CompletedProcess[str]:
        path = write(tmp_path / "check.crl.pem", crl)
        return openssl_verify(tmp_path, root, leaf, issuing, "-crl_check", "-CRLfile", str(path))

    assert verify(leaves[0], partition_crls[0]).returncode == 0
    rejected = verify(leaves[1], partition_crls[0])
    assert rejected.returncode != 0 and "certificate revoked" in rejected.stdout + rejected.stderr
    out_of_scope = verify(leaves[3], partition_crls[0])  # partition 1's certificate: CRL 0 does not cover it
    assert out_of_scope.returncode != 0 and "different CRL scope" in out_of_scope.stdout + out_of_scope.stderr
    assert verify(leaves[3], partition_crls[1]).returncode == 0
    assert verify(leaves[6], partition_crls[2]).returncode != 0

    # pyhanko-certvalidator: path validation with revocation from the partition CRL.
    root_crl = kvpki.ok("crl", "--ca", "root", "--format", "der")
    partition_der = kvpki.ok("crl", "--ca", "issuing", "--partition", "0", "--format", "der")
    path = asyncio.run(_validator(leaves[0], issuing, root, [root_crl, partition_der]).async_validate_usage(set()))
    assert len(path) == 3
    from pyhanko_certvalidator.errors import PathValidationError, RevokedError

    with pytest.raises(RevokedError):
        asyncio.run(_validator(leaves[1], issuing, root, [root_crl, partition_der]).async_validate_usage(set()))
    with pytest.raises(PathValidationError):  # out of scope: hard-fail finds no CRL for partition 1
        asyncio.run(_validator(leaves[4], issuing, root, [root_crl, partition_der]).async_validate_usage(set()))


def test_partition_errors_and_stored_crls(inventory_url: str, make_csr, tmp_path: Path) -> None:
    kvpki = runner(tmp_path, inventory_url)
    kvpki.init_ca("root", "--subject", "CN=Partition Root")
    kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=Partition Issuing")
    no_partitions = kvpki.run("crl", "--ca", "root", "--partition", "0")
    assert no_partitions.returncode == EXIT_USAGE and no_partitions.stdout == b""
    assert b"kvpki: error:" in no_partitions.stderr and b"Traceback" not in no_partitions.stderr
    never = kvpki.run("crl", "--ca", "issuing", "--partition", "0")  # nothing issued yet
    assert never.returncode == EXIT_NOT_FOUND and never.stdout == b""
    kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr("/CN=one").csr_pem)
    assert kvpki.run("crl", "--ca", "issuing", "--partition", "1").returncode == EXIT_NOT_FOUND
    assert kvpki.run("crl", "--ca", "issuing", "--partition", "-1").returncode == EXIT_USAGE
    # Stored and shared like the full CRL: the same bytes until something in the partition is revoked.
    first = pem_crl(kvpki, "issuing", "--partition", "0")
    assert pem_crl(kvpki, "issuing", "--partition", "0") == first
    assert pem_crl(kvpki, "issuing") != first  # its own scope, its own stored CRL
    assert pem_crl(kvpki, "issuing", "--partition", "0") == first
    bad = kvpki.run("crl", "--ca", "issuing", "--partition", "x")
    assert bad.returncode == EXIT_USAGE


def test_serve_publishes_partition_crls(inventory_url: str, make_csr, tmp_path: Path, monkeypatch) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from kvpki_cli.config import Settings
    from kvpki_cli.serve.crl import CrlCache, Publisher
    from kvpki_cli.serve.workers import CaWorkers

    kvpki = runner(tmp_path, inventory_url)
    kvpki.init_ca("root", "--subject", "CN=Partition Root")
    kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=Partition Issuing")
    leaves = [load_cert(kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr(f"/CN=s{i}").csr_pem)) for i in range(4)]
    kvpki.ok("revoke", format(leaves[3].serial_number, "x"), "--ca", "issuing")
    monkeypatch.setenv("KVPKI_HOME", str(kvpki.home))
    monkeypatch.setenv("KVPKI_INVENTORY_URL", inventory_url)
    workers = CaWorkers(Settings.load(kvpki.home), 2)
    week = CrlCache(timedelta(days=7))  # the validity `kvpki crl` asks for by default
    publisher = Publisher({"root", "issuing"}, workers, week, 10)

    async def scenario() -> dict[str, tuple[int, bytes]]:
        app = web.Application()
        app.add_routes(publisher.routes())
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            answers = {}
            for path in ("/crl/issuing/0.crl", "/crl/issuing/1.crl", "/crl/issuing/1.crl", "/crl/issuing/2.crl",
                         "/crl/issuing/01.crl", "/crl/issuing/x.crl", "/crl/root/0.crl", "/crl/nosuch/0.crl",
                         "/crl/issuing.crl"):  # fmt: skip
                response = await client.get(path)
                answers[path] = (response.status, await response.read())
            return answers

    try:
        answers = asyncio.run(scenario())
    finally:
        workers.shutdown()
    for k in (0, 1):
        status, der = answers[f"/crl/issuing/{k}.crl"]
        assert status == 200
        crl = x509.load_der_x509_crl(der)
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
        assert idp.full_name[0].value == f"{BASE}/crl/issuing/{k}.crl"  # type: ignore[index]
        assert {e.serial_number for e in crl} == ({leaves[3].serial_number} if k == 1 else set())
    stored = pem_crl(kvpki, "issuing", "--partition", "1", "--format", "der")
    assert stored == answers["/crl/issuing/1.crl"][1]  # one signature, served and printed alike
    for path in ("/crl/issuing/2.crl", "/crl/issuing/01.crl", "/crl/issuing/x.crl", "/crl/root/0.crl",
                 "/crl/nosuch/0.crl"):  # fmt: skip
        assert answers[path][0] == 404, path
    assert answers["/crl/issuing.crl"][0] == 200


def test_snapshot_of_a_partition(inventory_url: str, tmp_path: Path) -> None:
    """crl_snapshot(partition=k) lists exactly partition k's revoked, unexpired rows, numbered from the CA's
    one sequence; revocation counts per partition drive the stored CRLs' currency."""
    from tests.test_crl_scale import record

    inventory = open_inventory(inventory_url, tmp_path)
    future = datetime.now(UTC) + timedelta(days=30)
    rows = [record("ca", 0x1000 + i, future)._replace(crl_partition=i % 3) for i in range(12)]
    rows.append(record("ca", 0x2000, future))  # no partition: full CRL only
    rows.append(record("other", 0x1000, future)._replace(crl_partition=0))
    inventory.record_issued(rows)
    for serial in (0x1000, 0x1003, 0x1004, 0x2000):
        inventory.revoke("ca", format(serial, "x"), datetime.now(UTC), "superseded")
    inventory.revoke("other", "1000", datetime.now(UTC), "superseded")
    clock = lambda: datetime.now(UTC)  # noqa: E731
    first = inventory.crl_snapshot("ca", clock, 0)
    assert [r.serial for r in first.revoked] == ["1000", "1003"]
    second = inventory.crl_snapshot("ca", clock, 1)
    assert [r.serial for r in second.revoked] == ["1004"] and second.number > first.number
    assert inventory.crl_snapshot("ca", clock, 2).revoked == []
    assert len(inventory.crl_snapshot("ca", clock).revoked) == 4
    assert [inventory.revocation_count("ca", k) for k in (0, 1, 2)] == [2, 1, 0]
    assert inventory.revocation_count("ca") == 4
    assert inventory.crl_state("ca", 0).revocations == 2
    inventory.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 5)), max_size=30))
def test_partitions_never_exceed_their_size(batches: list[tuple[int, int]]) -> None:
    """Whatever the batch sizes (and size changes), a partition gets at most the size in force when it
    was filled, partitions are consecutive and assignment order is issuance order."""
    partition, filled, seen = 0, 0, []
    for count, size in batches:
        assigned, partition, filled = fill_partitions(partition, filled, count, size)
        assert len(assigned) == count and assigned == sorted(assigned)
        seen += [(k, size) for k in assigned]
    for k in {k for k, _ in seen}:
        assert sum(1 for j, _ in seen if j == k) <= max(size for j, size in seen if j == k)
    used = sorted({k for k, _ in seen})
    assert used == list(range(len(used)))  # consecutive from 0


def test_reservations_are_atomic_across_processes(inventory_url: str, tmp_path: Path) -> None:
    """Concurrent batches (threads with their own connections) never overfill a partition."""
    from concurrent.futures import ThreadPoolExecutor

    def reserve(_: int) -> list[int]:
        inventory = open_inventory(inventory_url, tmp_path)
        try:
            return [k for _ in range(10) for k in inventory.reserve_crl_partitions("ca", 2, 5)]
        finally:
            inventory.close()

    open_inventory(inventory_url, tmp_path).close()  # schema first
    with ThreadPoolExecutor(4) as pool:
        assigned = [k for batch in pool.map(reserve, range(4)) for k in batch]
    assert sorted(assigned) == [k for k in range(16) for _ in range(5)]


OLD_SQLITE = """
CREATE TABLE certificates (
    ca TEXT NOT NULL, serial TEXT NOT NULL, subject TEXT NOT NULL, sans TEXT NOT NULL, profile TEXT NOT NULL,
    requester TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL, csr_sha256 TEXT NOT NULL,
    der BLOB NOT NULL, status TEXT NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'revoked')),
    revoked_at TEXT, reason TEXT,
    issued_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')), PRIMARY KEY (ca, serial));
CREATE INDEX certificates_status ON certificates (ca, status, not_after);
CREATE TABLE crl_numbers (ca TEXT PRIMARY KEY, last INTEGER NOT NULL);
INSERT INTO certificates (ca, serial, subject, sans, profile, requester, not_before, not_after, csr_sha256, der,
    status, revoked_at, reason)
VALUES ('ca', '1234', 'CN=old', '[]', 'device', 'x', '2026-01-01T00:00:00Z', '2099-01-01T00:00:00Z', '', X'00',
    'revoked', '2026-02-01T00:00:00Z', 'keyCompromise');
"""


@pytest.mark.parametrize("version", [1, 2])
def test_sqlite_upgrade_to_version_3(version: int, tmp_path: Path) -> None:
    from kvpki_cli.inventory.sqlite import SCHEMA_VERSION, SqliteInventory

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SQLITE)
        if version == 2:
            db.execute(
                "CREATE INDEX certificates_crl ON certificates (ca, status, serial, not_after, revoked_at, reason)"
            )
        db.execute(f"PRAGMA user_version={version}")
    db.close()
    inventory = SqliteInventory(path)
    assert SCHEMA_VERSION == 3
    old = inventory.get("ca", "1234")
    assert old is not None and old.crl_partition is None and old.status == "revoked"
    assert [r.serial for r in inventory.crl_snapshot("ca", lambda: datetime.now(UTC)).revoked] == ["1234"]
    assert inventory.crl_snapshot("ca", lambda: datetime.now(UTC), 0).revoked == []
    assert inventory.reserve_crl_partitions("ca", 2, 1) == [0, 1]
    inventory.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        indexes = {row[1] for row in db.execute("PRAGMA index_list(certificates)")}
        assert {"certificates_crl", "certificates_partition_crl"} <= indexes
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT serial, revoked_at, reason FROM certificates"
                " WHERE ca='ca' AND crl_partition=0 AND status='revoked' AND not_after>'x' ORDER BY serial"
            )
        )
    db.close()
    assert "COVERING INDEX certificates_partition_crl" in plan and "TEMP B-TREE" not in plan
    SqliteInventory(path).close()  # opening a version-3 file again changes nothing


def test_postgres_adds_the_partition_column(postgres_url: str, tmp_path: Path) -> None:
    import psycopg

    open_inventory(postgres_url, tmp_path).close()
    with psycopg.connect(postgres_url, autocommit=True) as db:  # what a database of an older kvpki looks like
        db.execute("DROP INDEX kvpki_certificates_partition_crl")
        db.execute("DROP TABLE kvpki_crl_partitions")
        db.execute("ALTER TABLE kvpki_certificates DROP COLUMN crl_partition")
        db.execute(
            "INSERT INTO kvpki_certificates (ca, serial, subject, sans, profile, requester, not_before, not_after,"
            " csr_sha256, der) VALUES ('ca', '1234', 'CN=old', '{}', 'device', 'x', now(), now() + interval '1 day',"
            " '', '\\x00')"
        )
    inventory = open_inventory(postgres_url, tmp_path)
    assert inventory.get("ca", "1234").crl_partition is None  # type: ignore[union-attr]
    assert inventory.reserve_crl_partitions("ca", 3, 2) == [0, 0, 1]
    assert inventory.last_crl_partition("ca") == 1
    inventory.close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        assert db.execute("SELECT to_regclass('kvpki_certificates_partition_crl') IS NOT NULL").fetchone() == (True,)


def test_partition_snapshots_race_revocations(inventory_url: str, tmp_path: Path) -> None:
    """The one-transaction guarantee per partition, under real concurrency (threads with their own
    connections): within each partition's scope a higher number never lists less nor has an older
    thisUpdate, and numbers are unique across the CA's scopes."""
    import itertools
    import threading

    from kvpki_cli.inventory.base import CrlSnapshot
    from tests.test_crl_scale import record

    setup = open_inventory(inventory_url, tmp_path)
    far = datetime.now(UTC) + timedelta(days=30)
    rows = [record("ca", 0x1000 + i, far)._replace(crl_partition=i % 2) for i in range(40)]
    setup.record_issued(rows)
    setup.close()
    snapshots: dict[int, list[CrlSnapshot]] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def snapshotter(partition: int) -> None:
        inventory = open_inventory(inventory_url, tmp_path)
        try:
            start.wait()
            for _ in range(15):
                snapshots[partition].append(inventory.crl_snapshot("ca", lambda: datetime.now(UTC), partition))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            inventory.close()

    def revoker(mine: list[str]) -> None:
        inventory = open_inventory(inventory_url, tmp_path)
        try:
            start.wait()
            for serial in mine:
                inventory.revoke("ca", serial, datetime.now(UTC), "keyCompromise")
        except BaseException as exc:
            errors.append(exc)
        finally:
            inventory.close()

    threads = [threading.Thread(target=snapshotter, args=(k % 2,)) for k in range(4)]
    threads += [threading.Thread(target=revoker, args=([r.serial for r in rows[i::2]],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    numbers = [s.number for taken in snapshots.values() for s in taken]
    assert len(set(numbers)) == len(numbers) == 60
    for partition, taken in snapshots.items():
        members = {r.serial for r in rows if r.crl_partition == partition}
        ordered = sorted(taken, key=lambda s: s.number)
        for lower, higher in itertools.pairwise(ordered):
            assert higher.this_update >= lower.this_update
            assert {r.serial for r in lower.revoked} <= {r.serial for r in higher.revoked}
        assert all({r.serial for r in s.revoked} <= members for s in ordered)
