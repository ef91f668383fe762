"""`kvpki list --expiring` and `kvpki report`: known counts and a generated cross-check, on SQLite and PostgreSQL.

The SQL of each backend is checked against ``lifecycle_counts_of``, a plain-Python
statement of the definitions, on random inventories (KVPKI_FUZZ_CASES for more).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import CertificateRecord, Inventory, LifecycleCounts, lifecycle_counts_of
from tests.helpers import ec_csr_pem

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
CASES = int(os.environ.get("KVPKI_FUZZ_CASES", "3"))


def record(
    ca: str, subject: str, not_before: datetime, not_after: datetime, profile: str = "device"
) -> CertificateRecord:
    return CertificateRecord(
        ca=ca,
        serial=secrets.token_hex(19),
        subject=subject,
        sans=(),
        profile=profile,
        requester="pytest",
        not_before=not_before,
        not_after=not_after,
        csr_sha256="",
        der=secrets.token_bytes(16),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def inventory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Inventory]:
    sqlite = f"sqlite:///{tmp_path / 'inv.sqlite3'}"
    url = sqlite if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = open_inventory(url, tmp_path)
    yield opened
    opened.close()


def _load(inventory: Inventory, rows: list[tuple[CertificateRecord, bool]]) -> list[CertificateRecord]:
    inventory.record_issued([r for r, _ in rows])
    for r, revoke in rows:
        if revoke:
            inventory.revoke(r.ca, r.serial, NOW - DAY, "keyCompromise")
    return [r._replace(status="revoked") if revoke else r for r, revoke in rows]


def test_known_counts(inventory: Inventory) -> None:
    life = 100 * DAY
    fresh = record("a", "CN=fresh", NOW - 10 * DAY, NOW + 90 * DAY)
    due = record("a", "CN=due", NOW - 90 * DAY, NOW + 10 * DAY)
    exactly = record("a", "CN=edge", NOW - 80 * DAY, NOW + 20 * DAY, "server")  # exactly 20% left: due
    two = timedelta(seconds=2)
    almost = record("a", "CN=edge2", NOW - 80 * DAY + two, NOW + 20 * DAY + two, "server")  # 2 s short of due
    old_x = record("a", "CN=x", NOW - life, NOW - DAY)  # expired, renewed by new_x
    new_x = record("a", "CN=x", NOW - DAY, NOW + 99 * DAY)
    orphan_y = record("a", "CN=y", NOW - life, NOW - 2 * DAY)  # expired, nothing after it
    orphan_z = record("a", "CN=z", NOW - life, NOW - 3 * DAY)  # its only successor is revoked
    revoked_z = record("a", "CN=z", NOW - DAY, NOW + 50 * DAY)
    revoked_old = record("a", "CN=w", NOW - life, NOW - 5 * DAY)  # revoked and expired: counted as revoked
    other_ca_x = record("b", "CN=x", NOW - life, NOW - DAY)  # a successor must come from the same CA
    records = _load(
        inventory,
        [
            (fresh, False),
            (due, False),
            (exactly, False),
            (almost, False),
            (old_x, False),
            (new_x, False),
            (orphan_y, False),
            (orphan_z, False),
            (revoked_z, True),
            (revoked_old, True),
            (other_ca_x, False),
        ],
    )
    expected = [
        LifecycleCounts("a", "device", valid=3, due=1, expired=3, expired_without_successor=2, revoked=2),
        LifecycleCounts("a", "server", valid=2, due=1, expired=0, expired_without_successor=0, revoked=0),
        LifecycleCounts("b", "device", valid=0, due=0, expired=1, expired_without_successor=1, revoked=0),
    ]
    assert inventory.lifecycle_counts(None, NOW) == expected
    assert inventory.lifecycle_counts("a", NOW) == expected[:2]
    assert inventory.lifecycle_counts("nobody", NOW) == []
    assert lifecycle_counts_of(records, NOW) == expected  # the reference agrees with the hand count
    # list --expiring: valid ones with notAfter in (now, now + window], soonest first; revoked never
    assert [r.subject for r in inventory.expiring("a", NOW, NOW + 30 * DAY)] == ["CN=due", "CN=edge", "CN=edge2"]
    assert [r.subject for r in inventory.expiring("a", NOW, NOW + 10 * DAY)] == ["CN=due"]
    assert inventory.expiring("a", NOW, NOW + DAY) == []
    assert inventory.expiring("b", NOW, NOW + 365 * DAY) == []


@pytest.mark.parametrize("seed", range(CASES))
def test_sql_matches_the_definitions_on_random_inventories(inventory: Inventory, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(300):
        not_before = NOW + timedelta(seconds=rng.randint(-400 * 86400, 10 * 86400))
        lifetime = timedelta(seconds=rng.choice([3600, 86400, 30 * 86400, 365 * 86400, rng.randint(1, 10**8)]))
        item = record(
            rng.choice(["a", "b", "c-1"]),
            f"CN=dev-{rng.randint(0, 60)}",
            not_before.replace(microsecond=0),
            (not_before + lifetime).replace(microsecond=0),
            rng.choice(["device", "server", "dps-verification"]),
        )
        rows.append((item, rng.random() < 0.2))
    records = _load(inventory, rows)
    now = NOW + timedelta(seconds=rng.randint(-86400, 86400))
    assert inventory.lifecycle_counts(None, now) == lifecycle_counts_of(records, now)
    for ca in ("a", "c-1"):
        mine = [r for r in records if r.ca == ca]
        assert inventory.lifecycle_counts(ca, now) == lifecycle_counts_of(mine, now)
        window = now + timedelta(days=rng.randint(1, 90))
        wanted = sorted(
            (r for r in mine if r.status == "valid" and now < r.not_after <= window),
            key=lambda r: (r.not_after, r.serial),
        )
        assert [r.serial for r in inventory.expiring(ca, now, window)] == [r.serial for r in wanted]


# --- the CLI, on both backends -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def run(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "PG", "AZURE_"))}
    env.update(KVPKI_HOME=str(tmp_path / "home"), KVPKI_REQUESTER="pytest", PYTHONPATH=str(REPO))
    if request.param == "postgresql":
        env["KVPKI_INVENTORY_URL"] = request.getfixturevalue("postgres_url")

    def runner(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, "-m", "kvpki_cli", *args]
        return subprocess.run(command, input=input, capture_output=True, env=env, timeout=120)

    return runner


def _ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_cli_list_expiring_and_report(run) -> None:  # type: ignore[no-untyped-def]
    _ok(run("init-ca", "--name", "root", "--subject", "CN=Root"))
    _ok(run("init-ca", "--name", "sub", "--parent", "root", "--subject", "CN=Sub"))
    serials = {}
    for name, validity in (("d-10", "10d"), ("d-60", "60d"), ("d-365", "365d"), ("d-revoked", "5d")):
        pem = _ok(run("sign-csr", "--ca", "sub", "--validity", validity, input=ec_csr_pem(name)))
        serials[name] = format(x509.load_pem_x509_certificate(pem).serial_number, "x")
    _ok(run("revoke", serials["d-revoked"], "--ca", "sub"))
    _ok(run("dps-verification", "--ca", "sub", "--code", "ABC123"))

    expiring = json.loads(_ok(run("list", "--ca", "sub", "--expiring", "30d", "--json")))
    assert [row["subject"] for row in expiring] == ["CN=ABC123", "CN=d-10"]  # soonest first, revoked left out
    assert [row["serial"] for row in json.loads(_ok(run("list", "--ca", "sub", "--expiring", "61d", "--json")))][
        1:
    ] == [serials["d-10"], serials["d-60"]]
    bad = run("list", "--ca", "sub", "--expiring", "30d", "--status", "revoked")
    assert bad.returncode == 2 and bad.stdout == b"" and bad.stderr.count(b"\n") == 1
    assert run("list", "--ca", "sub", "--expiring", "soon").returncode == 2

    report = json.loads(_ok(run("report", "--json")))
    rows = {(r["ca"], r["profile"]): r for r in report["rows"]}
    assert set(rows) == {("root", "sub-ca"), ("sub", "device"), ("sub", "dps-verification")}
    assert rows[("sub", "device")] | {"ca": None, "profile": None} == {
        "ca": None,
        "profile": None,
        "valid": 3,
        "due": 0,
        "expired": 0,
        "expired_without_successor": 0,
        "revoked": 1,
    }
    assert report["totals"]["valid"] == 5 and report["totals"]["revoked"] == 1
    assert report["due_fraction"] == 0.2
    only = json.loads(_ok(run("report", "--ca", "root", "--json")))
    assert [(r["ca"], r["profile"], r["valid"]) for r in only["rows"]] == [("root", "sub-ca", 1)]

    table = run("report")
    assert table.returncode == 0 and table.stdout == b""
    lines = table.stderr.decode().splitlines()
    assert lines[0].split()[:3] == ["ca", "profile", "valid"]
    assert any(line.split()[:3] == ["sub", "device", "3"] for line in lines)
    assert lines[-1].split() == ["total", "5", "0", "0", "0", "1"]
    assert run("report", "--ca", "nope").returncode == 5
