"""CRL numbering agrees with CRL content, on SQLite and on a real PostgreSQL (issue 7, item 3).

The promise: of any two CRLs of a CA, the one with the higher CRL number has a
thisUpdate that is not earlier and lists every serial the other lists.  Two
tests close it: a replay that runs a whole "revoke, then another `kvpki crl`"
at every point where one `crl()` touches the inventory or the key store (the
class of interleavings, deterministically), and real concurrent `kvpki crl`
and `kvpki revoke` processes whose CRLs openssl verifies and parses.
"""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from kvpki_cli import authority as authority_module
from kvpki_cli.authority import CertificateAuthority, SigningRequest, init_ca
from kvpki_cli.config import Settings
from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import CertificateRecord, CrlSnapshot
from kvpki_cli.keystores.base import KeyType
from kvpki_cli.pki.csr import parse_csr
from tests.helpers import ec_csr_pem, openssl

REPO = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("KVPKI_CRL_ROUNDS", "3"))  # main failed at 5 rounds on both backends
CRL_PROCESSES = 8  # per round, started together with REVOKE_PROCESSES revocations
REVOKE_PROCESSES = 4
SNAPSHOT_THREADS, SNAPSHOTS_PER_THREAD, SNAPSHOT_REVOKES = 6, 25, 60


def make_record(serial: str, not_after: datetime) -> CertificateRecord:
    return CertificateRecord(
        ca="root",
        serial=serial,
        subject=f"CN={serial}",
        sans=(),
        profile="device",
        requester="pytest",
        not_before=not_after - timedelta(days=60),
        not_after=not_after,
        csr_sha256="0" * 64,
        der=b"0",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def inventory_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inventory.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


def check_consistent(crls: list[x509.CertificateRevocationList]) -> None:
    """The property, pairwise: higher number => thisUpdate >= and revoked set a superset."""
    numbered = sorted(crls, key=lambda crl: crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    numbers = [crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for crl in numbered]
    assert len(set(numbers)) == len(numbers), f"duplicate CRL numbers {numbers}"
    for lower, higher in itertools.combinations(numbered, 2):
        low_n = lower.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        high_n = higher.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert higher.last_update_utc >= lower.last_update_utc, f"CRL {high_n} has an older thisUpdate than {low_n}"
        missing = {r.serial_number for r in lower} - {r.serial_number for r in higher}
        assert not missing, f"CRL {high_n} omits {sorted(map(hex, missing))} that CRL {low_n} lists"


# ---------------------------------------------------------------------------------------------
# Deterministic replay: another process's "revoke + crl" at every call boundary of one crl().


class Interleaved:
    """Proxy that runs ``hook(name)`` before every method call on the wrapped object."""

    def __init__(self, inner: Any, hook: Callable[[str], None]) -> None:
        self._inner = inner
        self._hook = hook

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self._hook(name)
            return attribute(*args, **kwargs)

        return call


@pytest.fixture
def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reading of the core's clock is one second later, so any thisUpdate inversion shows."""
    start = datetime.now(UTC).replace(microsecond=0)
    ticks = itertools.count()
    monkeypatch.setattr(authority_module, "utcnow", lambda: start + timedelta(seconds=next(ticks)))


@pytest.mark.usefixtures("ticking_clock")
def test_revoke_and_crl_interleaved_at_every_step_of_crl(
    inventory_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("KVPKI_INVENTORY_URL", inventory_url)
    settings = Settings(home)
    init_ca(settings, "root", x509.Name.from_rfc4514_string("CN=Replay Root"), KeyType("ec-p256"))
    issuer = CertificateAuthority.open(settings, "root")
    csrs = [ec_csr_pem(f"dev-{i}") for i in range(12)]
    serials = iter(
        format(item.certificate.serial_number, "x")
        for item in issuer.issue_many([SigningRequest(pem, parse_csr(pem)) for pem in csrs])
    )
    crls: list[x509.CertificateRevocationList] = []
    other = CertificateAuthority.open(settings, "root")  # another process: its own inventory connection
    other.revoke(next(serials), "keyCompromise")

    step = 0
    while True:
        calls = itertools.count()

        def hook(name: str, target: int = step, calls: Iterator[int] = calls) -> None:
            if next(calls) == target:
                other.revoke(next(serials), "keyCompromise")
                crls.append(other.crl(timedelta(days=1)))

        before = len(crls)
        ca = CertificateAuthority.open(settings, "root", Interleaved(open_inventory(inventory_url, home), hook))
        ca.keystore = Interleaved(ca.keystore, hook)
        crls.append(ca.crl(timedelta(days=1)))
        if len(crls) == before + 1:  # the hook found no step number `step`: every step was tried
            break
        step += 1
    assert step >= 2  # at least the key store and the inventory were interleaved
    crls.append(other.crl(timedelta(days=1)))
    check_consistent(crls)
    revoked = {int(r.serial, 16) for r in other.inventory.list_certificates("root", "revoked", datetime.now(UTC))}
    assert {r.serial_number for r in crls[-1]} == revoked


def test_snapshot_is_the_revoked_unexpired_set_at_its_this_update(inventory_url: str, tmp_path: Path) -> None:
    inventory = open_inventory(inventory_url, tmp_path)
    now = datetime(2031, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    live, valid = (make_record(secrets.token_hex(19), now + timedelta(days=30)) for _ in range(2))
    expiring = make_record(secrets.token_hex(19), now + timedelta(days=1))
    gone = make_record(secrets.token_hex(19), now - timedelta(seconds=1))
    elsewhere = make_record(live.serial, now + timedelta(days=1))._replace(ca="other")
    inventory.record_issued([live, expiring, valid, gone, elsewhere])
    for record in (live, expiring, gone, elsewhere):
        inventory.revoke(record.ca, record.serial, now - timedelta(days=2), "keyCompromise")

    first = inventory.crl_snapshot("root", lambda: now)
    assert (first.number, first.this_update) == (1, now.replace(microsecond=0))
    assert sorted(r.serial for r in first.revoked) == sorted([live.serial, expiring.serial])
    assert inventory.next_crl_number("root") == 2  # one numbering, whichever way it is taken
    later = now + timedelta(days=1)  # `expiring` has expired by then: RFC 5280 lets the CRL drop it
    second = inventory.crl_snapshot("root", lambda: later)
    assert (second.number, [r.serial for r in second.revoked]) == (3, [live.serial])
    assert inventory.crl_snapshot("other", lambda: now).number == 1
    inventory.close()


def test_snapshots_race_revocations_in_threads(inventory_url: str, tmp_path: Path) -> None:
    """The inventory contract itself, under real concurrency: threads with their own connections."""
    setup = open_inventory(inventory_url, tmp_path)
    serials = [secrets.token_hex(19) for _ in range(SNAPSHOT_REVOKES)]
    far = datetime.now(UTC) + timedelta(days=30)
    setup.record_issued([make_record(serial, far) for serial in serials])
    setup.close()
    snapshots: list[CrlSnapshot] = []
    errors: list[BaseException] = []
    start = threading.Barrier(SNAPSHOT_THREADS + 2)
    revokers_done = threading.Event()

    def snapshotter() -> None:
        inventory = open_inventory(inventory_url, tmp_path)
        try:
            start.wait()
            taken = 0  # at least SNAPSHOTS_PER_THREAD, and on until the revocations are over (bounded)
            while taken < SNAPSHOTS_PER_THREAD or (not revokers_done.is_set() and taken < 20 * SNAPSHOTS_PER_THREAD):
                snapshots.append(inventory.crl_snapshot("root", lambda: datetime.now(UTC)))
                taken += 1
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            inventory.close()

    def revoker(mine: list[str]) -> None:
        inventory = open_inventory(inventory_url, tmp_path)
        try:
            start.wait()
            for serial in mine:
                inventory.revoke("root", serial, datetime.now(UTC), "keyCompromise")
        except BaseException as exc:
            errors.append(exc)
        finally:
            inventory.close()

    snapshot_threads = [threading.Thread(target=snapshotter) for _ in range(SNAPSHOT_THREADS)]
    revoker_threads = [threading.Thread(target=revoker, args=(serials[i::2],)) for i in range(2)]
    for thread in snapshot_threads + revoker_threads:
        thread.start()
    for thread in revoker_threads:
        thread.join(timeout=300)
    revokers_done.set()
    for thread in snapshot_threads:
        thread.join(timeout=300)
    assert not errors, errors
    final = open_inventory(inventory_url, tmp_path)
    snapshots.append(final.crl_snapshot("root", lambda: datetime.now(UTC)))  # after every revocation
    final.close()
    ordered = sorted(snapshots, key=lambda s: s.number)
    assert [s.number for s in ordered] == list(range(1, len(ordered) + 1))
    for lower, higher in itertools.pairwise(ordered):  # consecutive pairs imply all pairs
        assert higher.this_update >= lower.this_update, (lower.number, higher.number)
        assert {r.serial for r in lower.revoked} <= {r.serial for r in higher.revoked}, (lower.number, higher.number)
    assert {r.serial for r in ordered[-1].revoked} == set(serials)  # the newest CRL lists every revocation


# ---------------------------------------------------------------------------------------------
# The real thing: concurrent processes, CRLs checked by openssl.


def _env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update(KVPKI_HOME=str(home), KVPKI_INVENTORY_URL=url, KVPKI_REQUESTER="pytest", PYTHONPATH=str(REPO))
    return env


def _kvpki(env: dict[str, str], *args: str, input: bytes | None = None) -> bytes:
    result = subprocess.run(
        [sys.executable, "-m", "kvpki_cli", *args], input=input, capture_output=True, env=env, timeout=120
    )
    assert result.returncode == 0, f"kvpki {' '.join(args)}: {result.stderr.decode()}"
    return result.stdout


def test_concurrent_crl_and_revoke_processes(inventory_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home, inventory_url)
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(_kvpki(env, "init-ca", "--name", "root", "--subject", "CN=Concurrent CRL Root"))
    csr_dir, out_dir = tmp_path / "csrs", tmp_path / "certs"
    csr_dir.mkdir()
    paths = []
    for i in range(ROUNDS * REVOKE_PROCESSES):
        path = csr_dir / f"dev-{i}.csr"
        path.write_bytes(ec_csr_pem(f"dev-{i}"))
        paths.append(str(path))
    _kvpki(env, "sign-csr", "--ca", "root", "--out-dir", str(out_dir), *paths)
    serials = [format(x509.load_pem_x509_certificate(p.read_bytes()).serial_number, "x") for p in out_dir.iterdir()]

    crl_files: list[Path] = []
    for round_number in range(ROUNDS):
        to_revoke = serials[round_number * REVOKE_PROCESSES : (round_number + 1) * REVOKE_PROCESSES]
        commands = [["crl", "--ca", "root", "--format", "der", "--new"] for _ in range(CRL_PROCESSES)]
        commands += [["revoke", serial, "--ca", "root", "--reason", "keyCompromise"] for serial in to_revoke]
        order = sorted(range(len(commands)), key=lambda i: (i * 7919) % len(commands))  # interleave the kinds
        processes = [
            (commands[i], subprocess.Popen([sys.executable, "-m", "kvpki_cli", *commands[i]], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            for i in order
        ]  # fmt: skip
        for command, process in processes:
            stdout, stderr = process.communicate(timeout=180)
            assert process.returncode == 0, f"kvpki {' '.join(command)}: {stderr.decode()}"
            if command[0] == "crl":
                path = tmp_path / f"crl-{len(crl_files)}.der"
                path.write_bytes(stdout)
                crl_files.append(path)

    crls = []
    for path in crl_files:  # openssl checks each signature and parses it; cryptography reads the fields
        verified = openssl("crl", "-inform", "DER", "-in", str(path), "-CAfile", str(root_pem), "-verify", "-noout")
        assert b"verify OK" in verified.stderr + verified.stdout
        crls.append(x509.load_der_x509_crl(path.read_bytes()))
    final = x509.load_der_x509_crl(_kvpki(env, "crl", "--ca", "root", "--format", "der", "--new"))
    check_consistent([*crls, final])
    assert {format(r.serial_number, "x") for r in final} == set(serials)
    assert final.public_bytes(Encoding.DER)
