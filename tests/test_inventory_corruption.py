"""A damaged SQLite inventory is a backend failure (exit 6, one line), never an internal error (issue 7, item 12).

Generated damage: random byte ranges overwritten, truncation at random offsets,
whole-file garbage, and valid SQLite files holding rows of the wrong type.  Every
inventory operation on them either works or raises a KvpkiError; through the
CLI, every command exits with a documented code and one stderr line.
Set KVPKI_FUZZ_CASES for more cases than the default.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kvpki_cli.errors import BackendError, KvpkiError
from kvpki_cli.inventory.base import CertificateRecord, SerialCollision
from kvpki_cli.inventory.sqlite import SqliteInventory
from tests.helpers import ec_csr_pem

REPO = Path(__file__).resolve().parent.parent
CASES = int(os.environ.get("KVPKI_FUZZ_CASES", "150"))
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def record(serial: str) -> CertificateRecord:
    return CertificateRecord(
        ca="root",
        serial=serial,
        subject=f"CN={serial}",
        sans=(f"DNS:{serial}.example",),
        profile="device",
        requester="pytest",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=30),
        csr_sha256="0" * 64,
        der=secrets.token_bytes(600),  # about a certificate's size, so the table spans many pages
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("pristine") / "inventory.sqlite3"
    inventory = SqliteInventory(path)
    serials = [secrets.token_hex(19) for _ in range(80)]
    inventory.record_issued([record(s) for s in serials])
    for serial in serials[:15]:
        inventory.revoke("root", serial, NOW, "keyCompromise")
    inventory.next_crl_number("root")
    inventory.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path, serials


def damage(path: Path, rng: random.Random) -> str:
    """Apply one random kind of damage; return its description."""
    size = path.stat().st_size
    kind = rng.choice(["overwrite", "overwrite", "truncate", "garbage", "zero-page", "wrong-types"])
    if kind == "overwrite":
        offset, length = rng.randrange(size), rng.randint(1, 4096)
        with path.open("r+b") as handle:
            handle.seek(offset)
            handle.write(rng.randbytes(min(length, size - offset)))
        return f"overwrite {length} bytes at {offset}"
    if kind == "truncate":
        offset = rng.randrange(1, size)
        os.truncate(path, offset)
        return f"truncate at {offset}"
    if kind == "garbage":
        path.write_bytes(rng.randbytes(rng.randint(100, size)))
        return "garbage file"
    if kind == "zero-page":
        page = rng.randrange(size // 4096)
        with path.open("r+b") as handle:
            handle.seek(page * 4096)
            handle.write(b"\0" * 4096)
        return f"zeroed page {page}"
    column, value = rng.choice(
        [("sans", "not json"), ("sans", "42"), ("not_after", "soon"), ("not_before", "1"), ("revoked_at", "x")]
    )
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE certificates SET {column} = ? WHERE rowid % 7 = 0", (value,))
    return f"{column} = {value!r}"


def operations(inventory: SqliteInventory, serials: list[str]) -> list[tuple[str, Callable[[], object]]]:
    return [
        ("get", lambda: inventory.get("root", serials[40])),
        ("get-unknown", lambda: inventory.get("root", "abc")),
        ("list", lambda: inventory.list_certificates("root", None, NOW)),
        ("list-valid", lambda: inventory.list_certificates("root", "valid", NOW)),
        ("list-revoked", lambda: inventory.list_certificates("root", "revoked", NOW)),
        ("revoked_unexpired", lambda: inventory.revoked_unexpired("root", NOW)),
        ("revocation_count", lambda: inventory.revocation_count("root")),
        ("crl_snapshot", lambda: inventory.crl_snapshot("root", lambda: NOW)),
        ("next_crl_number", lambda: inventory.next_crl_number("root")),
        ("record_issued", lambda: inventory.record_issued([record(secrets.token_hex(19))])),
        ("revoke", lambda: inventory.revoke("root", serials[50], NOW, "superseded")),
    ]


def test_damaged_inventory_raises_only_kvpki_errors(pristine: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, serials = pristine
    rng = random.Random(7)
    backend_errors = 0
    for case in range(CASES):
        path = tmp_path / f"case{case}.sqlite3"
        shutil.copyfile(source, path)
        what = damage(path, rng)
        try:
            inventory = SqliteInventory(path, busy_timeout_s=2)
        except BackendError:
            backend_errors += 1
            continue
        try:
            for name, operation in operations(inventory, serials):
                try:
                    operation()
                except BackendError as error:
                    backend_errors += 1
                    assert "\n" not in str(error) and str(path) in str(error), (what, name, error)
                except (KvpkiError, SerialCollision):
                    pass  # NotFound / AlreadyExists: the damage removed or altered that row
                except Exception as error:
                    pytest.fail(f"{what}: {name} raised {type(error).__name__}: {error}")
        finally:
            inventory.close()
    assert backend_errors >= CASES // 3  # the damage really reached the database code


def _run(env: dict[str, str], *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvpki_cli", *args], input=input, capture_output=True, env=env, timeout=60
    )


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pages-overwritten"])
def test_cli_on_a_damaged_inventory_exits_6_with_one_line(tmp_path: Path, kind: str) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update(KVPKI_HOME=str(home), PYTHONPATH=str(REPO), KVPKI_REQUESTER="pytest")
    assert _run(env, "init-ca", "--name", "root", "--subject", "CN=Root").returncode == 0
    csr_dir = tmp_path / "csrs"
    csr_dir.mkdir()
    csrs = [csr_dir / f"d{i}.csr" for i in range(60)]
    for i, path in enumerate(csrs):
        path.write_bytes(ec_csr_pem(f"d{i}"))
    assert _run(env, "sign-csr", "--ca", "root", "--out-dir", str(tmp_path / "out"), *map(str, csrs)).returncode == 0
    database = home / "inventory.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = database.stat().st_size
    if kind == "garbage":
        database.write_bytes(random.Random(1).randbytes(size))
    elif kind == "truncated":
        os.truncate(database, size // 3)
    else:  # every page after the schema page: the file opens, every read of the table fails
        with database.open("r+b") as handle:
            handle.seek(4096)
            handle.write(random.Random(2).randbytes(size - 4096))
    leaf = next((tmp_path / "out").iterdir())
    commands = [
        ("list", "--ca", "root", "--json"),
        ("list", "--ca", "root"),
        ("crl", "--ca", "root"),
        ("revoke", "--cert", str(leaf), "--ca", "root"),
        ("renew", str(leaf), "--ca", "root", str(csrs[0])),
        ("sign-csr", "--ca", "root", str(csrs[1])),
    ]
    for command in commands:
        result = _run(env, *command)
        stderr = result.stderr.decode()
        lines = [line for line in stderr.splitlines() if "warning:" not in line]
        assert result.returncode == 6, (command, result.returncode, stderr)
        assert result.stdout == b"" and len(lines) == 1 and "inventory" in lines[0], (command, stderr)
        assert "Traceback" not in stderr and "internal error" not in stderr, (command, stderr)
