"""Renewal safety net for devices that were offline (issue 9 item 2): `renew_after_expiry`.

An expired, unrevoked certificate of this CA renews within the window after its notAfter
(`kvpki renew --renew-after-expiry`, `[ca.N] renew_after_expiry`, `[est.L] renew_after_expiry`);
beyond it, or with the window off (the default), renewal is refused.  Every renewal records
the serial it replaces.  Expired certificates are made in-process with a validity in the past.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpki_cli.authority import CertificateAuthority, SigningRequest, check_renewal_time, new_record, utcnow
from kvpki_cli.config import Settings
from kvpki_cli.errors import PolicyViolation
from kvpki_cli.inventory.base import CertificateRecord
from kvpki_cli.pki.certificates import issue_certificate, new_serial_number
from kvpki_cli.pki.csr import parse_csr
from tests.conftest import Kvpki
from tests.helpers import load_cert, write

SERIALS = iter(range(0x100, 0x10000))


def issue_expired(home: Path, ca_name: str, csr_pem: bytes, expired_ago: timedelta, profile: str = "device") -> bytes:
    """A certificate of ``ca_name`` (signed and recorded like any other) whose notAfter is ``expired_ago`` past."""
    ca = CertificateAuthority.open(Settings.load(home), ca_name)
    csr_der = x509.load_pem_x509_csr(csr_pem).public_bytes(Encoding.DER)
    now = utcnow()
    template = ca.approve(SigningRequest(csr_der, parse_csr(csr_der), profile=profile), now)
    not_after = (now - expired_ago).replace(microsecond=0)
    template = template._replace(not_before=not_after - timedelta(days=30), not_after=not_after)
    certificate = issue_certificate(template, new_serial_number(), ca.certificate, ca.keystore.signer(), ca.config.urls)
    ca.inventory.record_issued([new_record(ca.name, template, certificate, "test-offline", csr_der)])
    ca.inventory.close()
    return certificate.public_bytes(Encoding.PEM)


def serial(pem: bytes) -> str:
    return format(load_cert(pem).serial_number, "x")


@settings(max_examples=200, deadline=None)
@given(
    age=st.integers(min_value=-10 * 86400, max_value=400 * 86400),
    window=st.one_of(st.none(), st.integers(min_value=1, max_value=365 * 86400)),
)
def test_window_boundary_for_any_age_and_window(age: int, window: int | None) -> None:
    """Accepted iff valid now, or expired at most `window` ago: the decision has no other input."""
    from cryptography.hazmat.primitives.asymmetric import ec

    now = utcnow().replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name.from_rfc4514_string("CN=t")
    from cryptography.hazmat.primitives import hashes

    not_after = now - timedelta(seconds=age)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(not_after - timedelta(days=30)).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    span = timedelta(seconds=window) if window is not None else None
    expected = age < 0 or (span is not None and timedelta(seconds=age) <= span)
    try:
        check_renewal_time(cert, now, span)
        accepted = True
    except PolicyViolation as refusal:
        accepted = False
        assert "bootstrap credential" in str(refusal)
    assert accepted == expected


def test_cli_renew_of_expired_certificate_within_and_beyond_the_window(
    local_kvpki: Kvpki, make_csr, tmp_path: Path
) -> None:
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=Offline Root")
    recent = write(
        tmp_path / "recent.pem", issue_expired(kvpki.home, "root", make_csr("/CN=train-7").csr_pem, timedelta(days=10))
    )
    old = write(
        tmp_path / "old.pem", issue_expired(kvpki.home, "root", make_csr("/CN=train-8").csr_pem, timedelta(days=40))
    )
    rows_before = len(kvpki.inventory("root"))

    # default: off, so an expired certificate does not renew (exit 4, one line, nothing on stdout)
    refused = kvpki.run("renew", str(recent), "--ca", "root", input=make_csr("/CN=x").csr_pem)
    assert refused.returncode == 4 and refused.stdout == b""
    lines = refused.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvpki: error: ") and "renew_after_expiry" in lines[0]
    beyond = kvpki.run(
        "renew", str(old), "--ca", "root", "--renew-after-expiry", "30d", input=make_csr("/CN=x").csr_pem
    )
    assert beyond.returncode == 4 and beyond.stdout == b"" and "bootstrap credential" in beyond.stderr.decode()
    assert len(kvpki.inventory("root")) == rows_before  # nothing changed on failure

    new_pem = kvpki.ok(
        "renew", str(recent), "--ca", "root", "--renew-after-expiry", "30d", input=make_csr("/CN=x").csr_pem
    )
    new = load_cert(new_pem)
    assert new.subject == load_cert(recent.read_bytes()).subject and new.not_valid_after_utc > utcnow()
    rows = {row["serial"]: row for row in kvpki.inventory("root")}
    assert rows[serial(new_pem)]["replaces"] == serial(recent.read_bytes())
    assert rows[serial(recent.read_bytes())]["replaces"] is None


def test_cli_renew_window_from_ca_config_and_revoked_stays_refused(
    local_kvpki: Kvpki, make_csr, tmp_path: Path
) -> None:
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=Offline Root")
    (kvpki.home / "config.toml").write_text('[ca.root]\nrenew_after_expiry = "180d"\n')
    expired = write(
        tmp_path / "e.pem", issue_expired(kvpki.home, "root", make_csr("/CN=scooter-1").csr_pem, timedelta(days=100))
    )
    stolen = write(
        tmp_path / "s.pem", issue_expired(kvpki.home, "root", make_csr("/CN=scooter-2").csr_pem, timedelta(days=1))
    )
    kvpki.ok("revoke", "--ca", "root", serial(stolen.read_bytes()), "--reason", "keyCompromise")
    new_pem = kvpki.ok("renew", str(expired), "--ca", "root", input=make_csr("/CN=x").csr_pem)
    assert {r["serial"]: r for r in kvpki.inventory("root")}[serial(new_pem)]["replaces"] == serial(
        expired.read_bytes()
    )
    revoked = kvpki.run("renew", str(stolen), "--ca", "root", input=make_csr("/CN=x").csr_pem)
    assert revoked.returncode == 4 and "revoked" in revoked.stderr.decode() and revoked.stdout == b""
    (kvpki.home / "config.toml").write_text('[ca.root]\nrenew_after_expiry = "soon"\n')
    bad = kvpki.run("renew", str(expired), "--ca", "root", input=make_csr("/CN=x").csr_pem)
    assert bad.returncode == 2 and "renew_after_expiry" in bad.stderr.decode()
    bad_option = kvpki.run("renew", str(expired), "--ca", "root", "--renew-after-expiry", "0d", input=b"")
    assert bad_option.returncode == 2


def test_renewal_of_valid_certificate_records_replaces(local_kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=Offline Root")
    old_pem = kvpki.ok("sign-csr", "--ca", "root", input=make_csr("/CN=dev-1").csr_pem)
    new_pem = kvpki.ok(
        "renew", str(write(tmp_path / "o.pem", old_pem)), "--ca", "root", input=make_csr("/CN=dev-1").csr_pem
    )
    rows = {row["serial"]: row for row in kvpki.inventory("root")}
    assert rows[serial(new_pem)]["replaces"] == serial(old_pem)


LEGACY_SCHEMA = """
CREATE TABLE certificates (
    ca TEXT NOT NULL, serial TEXT NOT NULL, subject TEXT NOT NULL, sans TEXT NOT NULL, profile TEXT NOT NULL,
    requester TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL, csr_sha256 TEXT NOT NULL,
    der BLOB NOT NULL, status TEXT NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'revoked')),
    revoked_at TEXT, reason TEXT,
    issued_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')), PRIMARY KEY (ca, serial));
CREATE TABLE crl_numbers (ca TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""


@pytest.mark.parametrize("user_version", [1, 2, 3])
def test_sqlite_inventory_without_the_column_gets_it_on_open(tmp_path: Path, user_version: int) -> None:
    """A file of today's main (or of a later version that lacks this column) is upgraded in place, once."""
    from kvpki_cli.inventory.sqlite import SqliteInventory

    path = tmp_path / "inventory.db"
    db = sqlite3.connect(path)
    db.executescript(LEGACY_SCHEMA)
    db.execute(
        "INSERT INTO certificates (ca, serial, subject, sans, profile, requester, not_before, not_after,"
        " csr_sha256, der) VALUES ('r', 'ab', 'CN=a', '[]', 'device', 'x', '2026-01-01T00:00:00Z',"
        " '2026-02-01T00:00:00Z', '', X'00')"
    )
    if user_version >= 3:  # version 3 (CRL partitions) has crl_partition, but not necessarily replaces
        db.execute("ALTER TABLE certificates ADD COLUMN crl_partition INTEGER")
    db.execute(f"PRAGMA user_version={user_version}")
    db.commit()
    db.close()
    for _ in range(2):  # idempotent
        inventory = SqliteInventory(path)
        record = inventory.get("r", "ab")
        assert record is not None and record.replaces is None
        inventory.record_issued([record._replace(serial="cd", replaces="ab")])
        got = inventory.get("r", "cd")
        assert got is not None and got.replaces == "ab"
        inventory.revoke("r", "cd", utcnow(), "superseded")
        inventory.close()
        db = sqlite3.connect(path)
        db.execute("DELETE FROM certificates WHERE serial='cd'")
        db.commit()
        columns = [row[1] for row in db.execute("PRAGMA table_info(certificates)")]
        assert columns.count("replaces") == 1
        db.close()


def test_list_json_shows_replaces(local_kvpki: Kvpki, make_csr) -> None:
    local_kvpki.init_ca("root", "--subject", "CN=Offline Root")
    local_kvpki.ok("sign-csr", "--ca", "root", input=make_csr("/CN=dev-1").csr_pem)
    (row,) = json.loads(local_kvpki.ok("list", "--ca", "root", "--json"))
    assert "replaces" in row and row["replaces"] is None


# --- EST: the expired certificate arrives as the TLS client certificate ---------------------------

OFFLINE_LABELS = """
[est.offline]
ca = "issuing"
profile = "device"
client_cas = ["bootstrap.pem", "expired-ca.pem"]
identity_cas = ["est-identity"]
renew_after_expiry = "30d"
"""


@pytest.fixture(scope="module")
def offline_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """tests/servekit's server plus [est.offline] with a 30-day window (so TLS skips its time check),
    and a bootstrap CA that has expired (its leaf is still within its own validity)."""
    import os

    from tests.servekit import REPO, _prepare, free_port, start_serve, stop_serve

    home = tmp_path_factory.mktemp("offline")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(REPO), "NO_PROXY": "*", "no_proxy": "*"})
    port, http_port = free_port(), free_port()
    _prepare(home, env, port, http_port)
    config = (home / "serve.toml").read_text()
    assert '[est.default]\nca = "issuing"\n' in config
    # the default label too (strongSwan 5.9.8 has no --label); [est.other] stays without a window
    config = config.replace(
        '[est.default]\nca = "issuing"\n', '[est.default]\nca = "issuing"\nrenew_after_expiry = "30d"\n'
    )
    (home / "serve.toml").write_text(config + OFFLINE_LABELS)
    expired_ca_key, expired_ca = self_signed_ca("CN=Expired Bootstrap CA", expired_ago=timedelta(days=1))
    (home / "expired-ca.pem").write_bytes(expired_ca.public_bytes(Encoding.PEM))
    leaf_key, leaf = leaf_of(expired_ca_key, expired_ca, "CN=boot-under-expired-ca")
    write_pair(home, "under-expired-ca", leaf_key, leaf)
    server = start_serve(home, env, port, http_port)
    try:
        yield server
    finally:
        stop_serve(server)


def self_signed_ca(subject: str, expired_ago: timedelta):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name.from_rfc4514_string(subject)
    not_after = utcnow() - expired_ago
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(new_serial_number()).not_valid_before(not_after - timedelta(days=365))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def leaf_of(ca_key, ca_cert, subject: str):  # type: ignore[no-untyped-def]
    """A client certificate valid now, issued by ``ca_cert`` (whatever that CA's own validity)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string(subject))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(new_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def write_pair(directory: Path, name: str, key, cert) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    return cert_path, key_path


def expired_device(server, ca: str, name: str, subject: str, expired_ago: timedelta) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """An openssl key and a certificate of kvpki CA ``ca`` for it that expired ``expired_ago`` ago."""
    from tests.servekit import make_key_csr

    key, csr_der = make_key_csr(server.home, name, subject)
    pem = issue_expired(server.home, ca, x509.load_der_x509_csr(csr_der).public_bytes(Encoding.PEM), expired_ago)
    return write(server.home / f"{name}.pem", pem), key


def enroll(server, op: str, subject: str, cert: Path, key: Path, label: str = "offline", name: str = "new"):  # type: ignore[no-untyped-def]
    from tests.servekit import EDGE_HEADERS, curl, est_body, make_key_csr

    _new_key, csr = make_key_csr(server.home, f"{name}-{op}-{label}", subject)
    path = f"/.well-known/est/{label}/{op}"
    return curl(server, path, data=est_body(csr), cert=cert, key=key, headers=EDGE_HEADERS)


@pytest.mark.parametrize("op", ["simplereenroll", "simpleenroll"])  # strongSwan; IoT Edge renews with simpleenroll
def test_est_renewal_within_the_window_links_the_new_certificate(offline_server, op: str) -> None:  # type: ignore[no-untyped-def]
    from tests.servekit import pkcs7_certificates

    cert, key = expired_device(offline_server, "issuing", f"train-{op}", f"/CN=train-{op}", timedelta(days=10))
    answer = enroll(offline_server, op, f"/CN=train-{op}", cert, key)
    assert answer.status == 200, answer.body
    (new,) = pkcs7_certificates(answer.body)
    old = load_cert(cert.read_bytes())
    assert new.subject == old.subject and new.not_valid_after_utc > utcnow()
    rows = {row["serial"]: row for row in offline_server.inventory("issuing")}
    assert rows[format(new.serial_number, "x")]["replaces"] == format(old.serial_number, "x")
    # the same certificate on a label without a window: refused, and the reason says why
    other = enroll(offline_server, op, f"/CN=train-{op}", cert, key, label="other")
    assert other.status == 403 and b"renew_after_expiry" in other.body


def test_est_refuses_expired_beyond_the_window_and_revoked(offline_server) -> None:  # type: ignore[no-untyped-def]
    before = len(offline_server.inventory("issuing"))
    cert, key = expired_device(offline_server, "issuing", "old-scooter", "/CN=old-scooter", timedelta(days=40))
    for op in ("simplereenroll", "simpleenroll"):
        answer = enroll(offline_server, op, "/CN=old-scooter", cert, key)
        assert answer.status == 403 and b"bootstrap credential" in answer.body, answer.body
    stolen, stolen_key = expired_device(offline_server, "issuing", "stolen", "/CN=stolen", timedelta(days=2))
    offline_server.kvpki("revoke", "--ca", "issuing", serial(stolen.read_bytes()), "--reason", "keyCompromise")
    answer = enroll(offline_server, "simplereenroll", "/CN=stolen", stolen, stolen_key)
    assert answer.status == 403 and b"revoked" in answer.body
    assert len(offline_server.inventory("issuing")) == before + 2  # only the two test certificates


def test_est_expired_bootstrap_and_identity_certificates_stay_refused(offline_server) -> None:  # type: ignore[no-untyped-def]
    """Security regression guard: with TLS's time check off, no other credential may be expired."""
    home = offline_server.home
    # bootstrap certificate (kvpki CA "bootstrap", listed in client_cas): valid works, expired does not
    good = expired_device(offline_server, "bootstrap", "boot-ok", "/CN=boot-ok", timedelta(days=-30))
    assert enroll(offline_server, "simpleenroll", "/CN=dev-boot-ok", *good).status == 200
    expired = expired_device(offline_server, "bootstrap", "boot-old", "/CN=boot-old", timedelta(days=1))
    answer = enroll(offline_server, "simpleenroll", "/CN=dev-boot-old", *expired)
    assert answer.status == 403, answer.body
    # identity certificate (est-identity CA): valid works, expired one day does not, even on the windowed label
    good = expired_device(offline_server, "est-identity", "id-ok", "/CN=edge-ok", timedelta(days=-30))
    assert enroll(offline_server, "simpleenroll", "/CN=edge-ok", *good).status == 200
    expired = expired_device(offline_server, "est-identity", "id-old", "/CN=edge-old", timedelta(days=1))
    answer = enroll(offline_server, "simpleenroll", "/CN=edge-old", *expired)
    assert answer.status == 403 and b"identity certificate is not currently valid" in answer.body, answer.body
    # a leaf valid now under an expired (trusted) bootstrap CA: TLS no longer sees the expiry, we do
    answer = enroll(offline_server, "simpleenroll", "/CN=dev-under-expired", home / "under-expired-ca.pem",
                    home / "under-expired-ca.key")  # fmt: skip
    assert answer.status == 403 and b"CA certificate above the client certificate" in answer.body, answer.body


def test_serve_config_validates_renew_after_expiry(tmp_path: Path) -> None:
    from kvpki_cli.errors import UsageError
    from kvpki_cli.serve.config import load_serve_config

    base = '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n[est.a]\nca = "x"\n'
    path = tmp_path / "serve.toml"
    path.write_text(base + 'renew_after_expiry = "180d"\n')
    assert load_serve_config(path).labels["a"].renew_after_expiry == timedelta(days=180)
    path.write_text(base)
    assert load_serve_config(path).labels["a"].renew_after_expiry is None
    for bad in ('"forever"', "180", '"0d"', "true"):
        path.write_text(base + f"renew_after_expiry = {bad}\n")
        with pytest.raises(UsageError, match="renew_after_expiry"):
            load_serve_config(path)
    path.write_text(base + 'renew_after_expiri = "1d"\n')
    with pytest.raises(UsageError, match="unknown setting"):
        load_serve_config(path)


def test_postgres_gets_the_column_on_connect_and_round_trips_it(postgres_url: str) -> None:
    """A database created before `replaces` (version 1, no column) gains it on the next connection."""
    import psycopg

    from kvpki_cli.inventory.postgres import PostgresInventory

    first = PostgresInventory(postgres_url)
    first.close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("ALTER TABLE kvpki_certificates DROP COLUMN replaces")
    record = CertificateRecord(
        ca="r", serial="ab", subject="CN=a", sans=(), profile="device", requester="x",
        not_before=utcnow().replace(microsecond=0) - timedelta(days=2),
        not_after=utcnow().replace(microsecond=0) - timedelta(days=1), csr_sha256="", der=b"\x00",
    )  # fmt: skip
    for _ in range(2):  # idempotent
        inventory = PostgresInventory(postgres_url)
        inventory.record_issued([record._replace(serial=f"{next(SERIALS):x}", replaces="ab")])
        rows = inventory.list_certificates("r", None, utcnow())
        assert rows and all(row.replaces == "ab" for row in rows)
        inventory.close()


def test_strongswan_reenrolls_an_expired_certificate_within_the_window(offline_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """strongSwan `pki --est --cert old.pem --key old.key` (simplereenroll, TLS client auth), old.pem expired."""
    import shutil
    import subprocess

    from tests.helpers import openssl
    from tests.servekit import make_key_csr

    if shutil.which("pki") is None:
        pytest.skip("strongSwan pki is not installed")
    url, root = offline_server.url, str(offline_server.root_pem)
    chain = tmp_path / "issuing.pem"
    chain.write_bytes(offline_server.kvpki("get-ca", "--ca", "issuing").stdout)
    cert, key = expired_device(offline_server, "issuing", "ss-offline", "/CN=ss-offline", timedelta(days=20))
    _, csr = make_key_csr(tmp_path, "ss-new", "/CN=ss-offline")
    (tmp_path / "ss-new.der").write_bytes(csr)
    args = ["pki", "--est", "--url", url, "--in", str(tmp_path / "ss-new.der"), "--cacert", root]
    args += ["--cacert", str(chain), "--cert", str(cert), "--key", str(key), "--outform", "pem"]
    result = subprocess.run(args, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    renewed = x509.load_pem_x509_certificate(result.stdout)
    (tmp_path / "renewed.pem").write_bytes(result.stdout)
    openssl("verify", "-CAfile", root, "-untrusted", str(chain), str(tmp_path / "renewed.pem"))
    rows = {row["serial"]: row for row in offline_server.inventory("issuing")}
    assert rows[format(renewed.serial_number, "x")]["replaces"] == serial(cert.read_bytes())


def test_sqlite_column_upgrade_is_safe_when_processes_open_together(tmp_path: Path) -> None:
    """Eight processes open a legacy file at once: each adds the column or sees it added, none fails."""
    import subprocess
    import sys

    from tests.conftest import REPO

    path = tmp_path / "inventory.db"
    db = sqlite3.connect(path)
    db.executescript(LEGACY_SCHEMA)
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    code = (
        "import sys; from pathlib import Path; from kvpki_cli.inventory.sqlite import SqliteInventory"
        "; SqliteInventory(Path(sys.argv[1]))"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stderr=subprocess.PIPE) for _ in range(8)
    ]
    for process in processes:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
    db = sqlite3.connect(path)
    assert [row[1] for row in db.execute("PRAGMA table_info(certificates)")].count("replaces") == 1
    db.close()
