"""`kvpki rollover`: a CA's next key generation, checked with openssl as relying parties would.

Old leaves keep verifying with the old chain and new leaves with the new one; a device that trusts
only the old root validates a new leaf through the NewWithOld cross-certificate; each generation's
CRL is signed by its own key and lists exactly what that key signed; OCSP answers for a serial come
from the key that issued it; EST re-enrollment of an old-key certificate returns a new-key one; the
inventory's issuer_generation column is added to existing SQLite and PostgreSQL databases.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.conftest import DeviceKey, Kvpki
from tests.helpers import openssl, pkilint_findings, write
from tests.kvserver.fixtures import azure_init_args
from tests.kvserver.server import KeyVaultTestServer

PEM = serialization.Encoding.PEM


def certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def verify(tmp: Path, leaf: bytes, trusted: bytes, untrusted: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    """openssl verify with ONLY ``trusted`` as trust anchors (no system store)."""
    args = ["openssl", "verify", "-no-CAfile", "-no-CApath", "-trusted", str(write(tmp / "t.pem", trusted))]
    if untrusted:
        args += ["-untrusted", str(write(tmp / "u.pem", untrusted))]
    args += [*extra, str(write(tmp / "leaf.pem", leaf))]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def serial_of(pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(pem).serial_number, "x")


@pytest.fixture
def pki(local_kvpki: Kvpki) -> Kvpki:
    local_kvpki.ok("init-ca", "--name", "root", "--subject", "CN=Rollover Root,O=kvpki")
    local_kvpki.ok("init-ca", "--name", "issuing", "--parent", "root", "--subject", "CN=Rollover Issuing,O=kvpki")
    return local_kvpki


def test_intermediate_rollover_old_and_new_leaves_verify_and_crls_are_per_key(
    pki: Kvpki, make_csr: Callable[..., DeviceKey], tmp_path: Path
) -> None:
    root = pki.ok("get-ca", "--ca", "root")
    old_chain = pki.ok("get-ca", "--ca", "issuing", "--chain")
    old_leaf = pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=old-1").csr_pem)
    revoked_old = pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=old-2").csr_pem)

    new_ca = certs(pki.ok("rollover", "--ca", "issuing"))[0]
    old_ca = certs(old_chain)[0]
    assert new_ca.subject == old_ca.subject and ski(new_ca) != ski(old_ca)
    assert new_ca.public_key() != old_ca.public_key()
    # recorded in the parent's inventory, signed by the parent's current key
    parent_rows = {row["serial"]: row for row in pki.inventory("root")}
    assert format(new_ca.serial_number, "x") in parent_rows

    new_leaf = pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=new-1").csr_pem)
    revoked_new = pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=new-2").csr_pem)
    new_chain = pki.ok("get-ca", "--ca", "issuing", "--generation", "1", "--chain")
    assert certs(new_chain)[0] == new_ca
    assert x509.load_pem_x509_certificate(new_leaf).issuer == new_ca.subject

    # issuance switched at once; each chain verifies its own leaves, not the other's
    assert verify(tmp_path, old_leaf, root, old_chain).returncode == 0
    assert verify(tmp_path, new_leaf, root, new_chain).returncode == 0
    assert verify(tmp_path, new_leaf, root, old_chain).returncode != 0
    # get-ca --chain publishes both CA certificates during the overlap: either leaf verifies with it
    published = pki.ok("get-ca", "--ca", "issuing", "--chain")
    assert {old_ca, new_ca} <= set(certs(published))
    for leaf in (old_leaf, new_leaf):
        assert verify(tmp_path, leaf, root, published).returncode == 0

    rows = {row["serial"]: row for row in pki.inventory("issuing")}
    assert rows[serial_of(old_leaf)]["issuer_generation"] == 0
    assert rows[serial_of(new_leaf)]["issuer_generation"] == 1

    pki.ok("revoke", "--ca", "issuing", serial_of(revoked_old))
    pki.ok("revoke", "--ca", "issuing", serial_of(revoked_new))
    crl_old = pki.ok("crl", "--ca", "issuing", "--generation", "0")
    crl_new = pki.ok("crl", "--ca", "issuing")
    assert pki.ok("crl", "--ca", "issuing", "--generation", "1") == crl_new  # the default is the current key's
    old_ca_pem = pki.ok("get-ca", "--ca", "issuing", "--generation", "0")
    new_ca_pem = pki.ok("get-ca", "--ca", "issuing")
    for crl, signer, other in ((crl_old, old_ca_pem, new_ca_pem), (crl_new, new_ca_pem, old_ca_pem)):
        crl_file, good, bad = write(tmp_path / "c.pem", crl), write(tmp_path / "g.pem", signer), tmp_path / "b.pem"
        assert b"verify OK" in openssl("crl", "-in", str(crl_file), "-CAfile", str(good), "-noout").stderr
        write(bad, other)
        assert b"verify failure" in openssl("crl", "-in", str(crl_file), "-CAfile", str(bad), "-noout").stderr
    listed_old = {r.serial_number for r in x509.load_pem_x509_crl(crl_old)}
    listed_new = {r.serial_number for r in x509.load_pem_x509_crl(crl_new)}
    assert listed_old == {int(serial_of(revoked_old), 16)} and listed_new == {int(serial_of(revoked_new), 16)}

    # relying parties: each leaf with its generation's CRL (openssl -crl_check)
    def crl_check(leaf: bytes, chain: bytes, crl: bytes) -> subprocess.CompletedProcess[str]:
        return verify(tmp_path, leaf, root, chain, "-crl_check", "-CRLfile", str(write(tmp_path / "r.pem", crl)))

    assert crl_check(old_leaf, old_chain, crl_old).returncode == 0
    assert crl_check(new_leaf, new_chain, crl_new).returncode == 0
    assert "certificate revoked" in crl_check(revoked_old, old_chain, crl_old).stderr
    assert "certificate revoked" in crl_check(revoked_new, new_chain, crl_new).stderr

    # the CRL URL of a new-generation certificate names its own generation's CRL
    new_leaf_cert = x509.load_pem_x509_certificate(new_leaf)
    old_leaf_cert = x509.load_pem_x509_certificate(old_leaf)
    for cert, suffix in ((old_leaf_cert, "/crl/issuing.crl"), (new_leaf_cert, "/crl/issuing.1.crl")):
        try:
            points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            continue  # no base_url configured in this home
        assert str(points[0].full_name[0].value).endswith(suffix)  # type: ignore[index]

    # get-cert --chain gives each certificate with the chain of the key that signed it
    for leaf, chain in ((old_leaf, old_chain), (new_leaf, new_chain)):
        assert pki.ok("get-cert", serial_of(leaf), "--ca", "issuing", "--chain") == leaf + chain

    # renewing an old-key certificate gives a new-key one
    renewed = pki.ok("renew", write(tmp_path / "old.pem", old_leaf).as_posix(), "-", "--ca", "issuing",
                     input=make_csr("/CN=old-1").csr_pem)  # fmt: skip
    assert verify(tmp_path, renewed, root, new_chain).returncode == 0


def test_root_rollover_cross_certificates_link_both_roots(
    pki: Kvpki, make_csr: Callable[..., DeviceKey], tmp_path: Path
) -> None:
    old_root = pki.ok("get-ca", "--ca", "root")
    old_issuing = pki.ok("get-ca", "--ca", "issuing")
    old_leaf = pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=dev-old").csr_pem)

    new_root_cert, new_with_old, old_with_new = certs(pki.ok("rollover", "--ca", "root"))
    old_root_cert = certs(old_root)[0]
    assert new_root_cert.subject == new_root_cert.issuer == old_root_cert.subject
    assert (
        new_with_old.public_key() == new_root_cert.public_key()
        and old_with_new.public_key() == old_root_cert.public_key()
    )
    new_with_old.verify_directly_issued_by(old_root_cert)
    old_with_new.verify_directly_issued_by(new_root_cert)
    new_root = new_root_cert.public_bytes(PEM)
    assert pki.ok("get-ca", "--ca", "root") == new_root

    # then the intermediate rolls under the new root key
    pki.ok("rollover", "--ca", "issuing")
    new_issuing = pki.ok("get-ca", "--ca", "issuing")
    new_leaf = pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=dev-new").csr_pem)
    cross_nwo, cross_own = new_with_old.public_bytes(PEM), old_with_new.public_bytes(PEM)

    assert verify(tmp_path, old_leaf, old_root, old_issuing).returncode == 0  # old leaf, old chain
    assert verify(tmp_path, new_leaf, new_root, new_issuing).returncode == 0  # new leaf, new chain
    # a device that still trusts only the old root: through NewWithOld
    assert verify(tmp_path, new_leaf, old_root, new_issuing).returncode != 0
    result = verify(tmp_path, new_leaf, old_root, new_issuing + cross_nwo)
    assert result.returncode == 0, result.stderr
    # a device that already trusts only the new root: an old leaf through OldWithNew
    assert verify(tmp_path, old_leaf, new_root, old_issuing).returncode != 0
    result = verify(tmp_path, old_leaf, new_root, old_issuing + cross_own)
    assert result.returncode == 0, result.stderr

    # RFC 5280 lint of every certificate a rollover made (pkilint)
    for index, made in enumerate((new_root, cross_nwo, cross_own, new_issuing)):
        assert pkilint_findings(write(tmp_path / f"made{index}.pem", made)) == ""

    published = certs(pki.ok("get-ca", "--ca", "root", "--chain"))
    assert {new_root_cert, old_root_cert, new_with_old, old_with_new} <= set(published)
    assert published[0] == new_root_cert
    # the root's CRLs: one per key, each verifying with its own certificate
    for generation, signer in (("0", old_root), ("1", new_root)):
        crl = write(tmp_path / f"root{generation}.crl", pki.ok("crl", "--ca", "root", "--generation", generation))
        anchor = write(tmp_path / f"root{generation}.pem", signer)
        assert b"verify OK" in openssl("crl", "-in", str(crl), "-CAfile", str(anchor), "-noout").stderr


def test_rollover_refusals_change_nothing(pki: Kvpki) -> None:
    ca_dir = pki.home / "cas" / "issuing"
    before = sorted(p.name for p in ca_dir.iterdir())
    result = pki.run("rollover", "--ca", "nope")
    assert result.returncode != 0 and result.stdout == b"" and b"kvpki: error:" in result.stderr
    result = pki.run("rollover", "--ca", "issuing", "--validity", "-3d")
    assert result.returncode == 2 and result.stdout == b""
    assert sorted(p.name for p in ca_dir.iterdir()) == before
    result = pki.run("crl", "--ca", "issuing", "--generation", "3")
    assert result.returncode != 0 and result.stdout == b"" and b"generation 3" in result.stderr
    # partitioned CRLs and key generations do not combine yet: refused, nothing changed
    (pki.home / "config.toml").write_text(
        '[defaults]\nbase_url = "http://127.0.0.1:9"\n[ca.issuing]\ncrl_partition_size = 100\n'
    )
    result = pki.run("rollover", "--ca", "issuing")
    assert result.returncode == 2 and result.stdout == b"" and b"partitioned CRLs" in result.stderr
    assert sorted(p.name for p in ca_dir.iterdir()) == before


def test_rollover_with_a_new_key_type(pki: Kvpki, make_csr: Callable[..., DeviceKey], tmp_path: Path) -> None:
    new_ca = certs(pki.ok("rollover", "--ca", "issuing", "--key-type", "rsa-3072"))[0]
    assert new_ca.public_key().key_size == 3072  # type: ignore[union-attr]
    leaf = pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=rsa-era").csr_pem)
    chain = pki.ok("get-ca", "--ca", "issuing", "--chain")
    assert verify(tmp_path, leaf, pki.ok("get-ca", "--ca", "root"), chain).returncode == 0


def test_ocsp_answers_come_from_the_issuing_generation(
    pki: Kvpki, make_csr: Callable[..., DeviceKey], tmp_path: Path
) -> None:
    """In-process build_answer: old serials are answered by the old key, new ones by the new key."""
    old_leaf = x509.load_pem_x509_certificate(
        pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=o").csr_pem)
    )
    old_ca = certs(pki.ok("get-ca", "--ca", "issuing"))[0]
    pki.ok("rollover", "--ca", "issuing")
    new_leaf = x509.load_pem_x509_certificate(
        pki.ok("sign-csr", "--ca", "issuing", "-", input=make_csr("/CN=n").csr_pem)
    )
    new_ca = certs(pki.ok("get-ca", "--ca", "issuing"))[0]
    pki.ok("revoke", "--ca", "issuing", format(old_leaf.serial_number, "x"))

    import os

    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings
    from kvpki_cli.serve.ocsp import build_answer

    old_env = os.environ.get("KVPKI_HOME")
    os.environ["KVPKI_HOME"] = str(pki.home)
    try:
        ca = CertificateAuthority.open(Settings.load(pki.home), "issuing")
        for leaf, issuer, status in (
            (old_leaf, old_ca, ocsp.OCSPCertStatus.REVOKED),
            (new_leaf, new_ca, ocsp.OCSPCertStatus.GOOD),
        ):
            request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
            answer = build_answer(ca, request.public_bytes(serialization.Encoding.DER), None, timedelta(hours=1))
            response = ocsp.load_der_ocsp_response(answer.body)
            assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            assert response.certificate_status == status
            issuer.public_key().verify(  # type: ignore[call-arg]
                response.signature, response.tbs_response_bytes, *_verify_args(issuer, response)
            )
            # the same serial asked under the other generation's key is unknown, never "good"
            other = new_ca if issuer == old_ca else old_ca
            crossed = ocsp.OCSPRequestBuilder().add_certificate(leaf, other, hashes.SHA1()).build()
            answer = build_answer(ca, crossed.public_bytes(serialization.Encoding.DER), None, timedelta(hours=1))
            assert ocsp.load_der_ocsp_response(answer.body).certificate_status == ocsp.OCSPCertStatus.UNKNOWN
        ca.inventory.close()
    finally:
        if old_env is None:
            os.environ.pop("KVPKI_HOME", None)
        else:
            os.environ["KVPKI_HOME"] = old_env


def _verify_args(issuer: x509.Certificate, response: ocsp.OCSPResponse) -> tuple[object, ...]:
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = issuer.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return (ec.ECDSA(response.signature_hash_algorithm),)  # type: ignore[arg-type]
    assert isinstance(key, rsa.RSAPublicKey)
    return (padding.PKCS1v15(), response.signature_hash_algorithm)


# --- the inventory column on databases made before it existed

V1_SQLITE = """
CREATE TABLE certificates (
    ca TEXT NOT NULL, serial TEXT NOT NULL, subject TEXT NOT NULL, sans TEXT NOT NULL, profile TEXT NOT NULL,
    requester TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL, csr_sha256 TEXT NOT NULL,
    der BLOB NOT NULL, status TEXT NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'revoked')),
    revoked_at TEXT, reason TEXT, issued_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    PRIMARY KEY (ca, serial));
CREATE TABLE crl_numbers (ca TEXT PRIMARY KEY, last INTEGER NOT NULL);
INSERT INTO certificates (ca, serial, subject, sans, profile, requester, not_before, not_after, csr_sha256, der)
    VALUES ('c', 'abc', 'CN=x', '[]', 'device', 't', '2026-01-01T00:00:00Z', '2036-01-01T00:00:00Z', '', x'00');
PRAGMA user_version = 1;
"""


def _record(serial: str, generation: int):  # type: ignore[no-untyped-def]
    from kvpki_cli.inventory.base import CertificateRecord

    now = datetime.now(UTC).replace(microsecond=0)
    return CertificateRecord("c", serial, "CN=y", (), "device", "t", now, now + timedelta(days=1), "", b"\x01",
                             issuer_generation=generation)  # fmt: skip


def test_sqlite_inventory_of_schema_1_gains_the_column(tmp_path: Path) -> None:
    from kvpki_cli.inventory.sqlite import SqliteInventory

    path = tmp_path / "inventory.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SQLITE)
    inventory = SqliteInventory(path)
    old = inventory.get("c", "abc")
    assert old is not None and old.issuer_generation == 0
    inventory.record_issued([_record("def", 3)])
    assert inventory.get("c", "def").issuer_generation == 3  # type: ignore[union-attr]
    inventory.close()
    again = SqliteInventory(path)  # opening the migrated file again changes nothing
    assert [r.issuer_generation for r in again.list_certificates("c", None, datetime.now(UTC))] == [0, 3]
    again.close()


def test_postgres_inventory_of_schema_1_gains_the_column(postgres_url: str) -> None:
    import psycopg

    from kvpki_cli.inventory.postgres import SCHEMA, PostgresInventory

    with psycopg.connect(postgres_url, autocommit=True) as db:
        for statement in SCHEMA:
            if "issuer_generation" not in statement:
                db.execute(statement)
        db.execute("INSERT INTO kvpki_schema (version) VALUES (1)")
        db.execute(
            "INSERT INTO kvpki_certificates (ca, serial, subject, sans, profile, requester, not_before, not_after,"
            " csr_sha256, der) VALUES ('c', 'abc', 'CN=x', '{}', 'device', 't', now(), now() + interval '1 day',"
            " '', '\\x00')"
        )
    inventory = PostgresInventory(postgres_url)
    old = inventory.get("c", "abc")
    assert old is not None and old.issuer_generation == 0
    inventory.record_issued([_record("def", 2)])
    assert inventory.get("c", "def").issuer_generation == 2  # type: ignore[union-attr]
    inventory.close()


# --- EST: re-enrollment of an old-key certificate, /cacerts during the overlap, per-generation CRLs


def test_est_reenroll_old_key_certificate_returns_new_key_certificate(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A running server: issuance switches at once, /cacerts and client trust within seconds; then a restart."""
    import time

    from tests import servekit

    home = tmp_path_factory.mktemp("rollover-serve")
    server = _start(home)
    key = home / "dev.key"
    try:
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
                "-subj", "/CN=roll-dev", "-outform", "DER", "-out", str(home / "dev.der"))  # fmt: skip
        body = base64.b64encode((home / "dev.der").read_bytes())
        first = _enroll(server, body, user="alice")
        old_ca = certs(server.kvpki("get-ca", "--ca", "issuing").stdout)[0]
        first.verify_directly_issued_by(old_ca)
        assert new_ca_absent(servekit.curl(server, "/.well-known/est/cacerts").body, old_ca)

        # rollover while the server runs: its very next issuance uses the new key
        server.kvpki("rollover", "--ca", "issuing")
        new_ca = certs(server.kvpki("get-ca", "--ca", "issuing").stdout)[0]
        second = _enroll(server, body, user="alice")
        second.verify_directly_issued_by(new_ca)
        deadline = time.monotonic() + 20
        while "now issuing with key generation 1" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        published = _pkcs7_certs(servekit.curl(server, "/.well-known/est/cacerts").body)
        assert new_ca in published and old_ca in published  # RFC 7030 4.1.3: both during the overlap

        # EST re-enrollment of the old-key certificate returns a new-key certificate
        (home / "old.pem").write_bytes(first.public_bytes(PEM))
        renewed = _reenroll(server, body, home / "old.pem", key)
        renewed.verify_directly_issued_by(new_ca)
        assert renewed.subject == first.subject
        rows = {row["serial"]: row for row in server.inventory()}
        assert rows[format(renewed.serial_number, "x")]["issuer_generation"] == 1
        assert rows[format(first.serial_number, "x")]["issuer_generation"] == 0
        # an old-generation device certificate still acts as EST identity (IoT Edge CA enrollment)
        edge_key = home / "edge.key"
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", str(edge_key), "-subj", "/CN=roll-dev", "-outform", "DER", "-out", str(home / "edge.der"),
                "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                "-addext", "keyUsage=critical,digitalSignature,keyCertSign")  # fmt: skip
        edge_body = base64.b64encode((home / "edge.der").read_bytes())
        result = servekit.curl(server, "/.well-known/est/edge-ca-one-ca/simpleenroll", data=edge_body,
                               cert=home / "old.pem", key=key,
                               headers=("Content-Type: application/pkcs10",))  # fmt: skip
        assert result.status == 200, result.body
        edge_ca = _pkcs7_certs(result.body)[0]
        edge_ca.verify_directly_issued_by(new_ca)
        assert edge_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        # and a new-generation certificate is trusted as TLS client certificate without a restart
        (home / "new.pem").write_bytes(second.public_bytes(PEM))
        _reenroll(server, body, home / "new.pem", key).verify_directly_issued_by(new_ca)

        # /crl/issuing.crl stays generation 0's (what old certificates name), /crl/issuing.1.crl is the new key's
        for path, signer in (("/crl/issuing.crl", old_ca), ("/crl/issuing.1.crl", new_ca)):
            fetched = servekit.curl(server, path)
            assert fetched.status == 200
            crl = x509.load_der_x509_crl(fetched.body)
            assert crl.is_signature_valid(signer.public_key())  # type: ignore[arg-type]
        for path, expected in (("/ca/issuing.crt", old_ca), ("/ca/issuing.1.crt", new_ca)):
            assert x509.load_der_x509_certificate(servekit.curl(server, path).body) == expected
        assert servekit.curl(server, "/crl/issuing.7.crl").status == 404
        assert servekit.curl(server, "/ca/issuing.7.crt").status == 404
    finally:
        _stop(server)

    server = _start(home, prepare=False)  # after a restart: the same, from start-up
    try:
        published = _pkcs7_certs(servekit.curl(server, "/.well-known/est/cacerts").body)
        assert new_ca in published and old_ca in published
        _reenroll(server, body, home / "old.pem", key).verify_directly_issued_by(new_ca)
    finally:
        _stop(server)


def new_ca_absent(body: bytes, old_ca: x509.Certificate) -> bool:
    """Before the rollover /cacerts holds the old CA certificate and no other of that subject."""
    same_subject = [c for c in _pkcs7_certs(body) if c.subject == old_ca.subject]
    return same_subject == [old_ca]


def _reenroll(server, body: bytes, cert: Path, key: Path) -> x509.Certificate:  # type: ignore[no-untyped-def]
    from tests import servekit

    result = servekit.curl(server, "/.well-known/est/simplereenroll", data=body, cert=cert, key=key,
                           headers=("Content-Type: application/pkcs10",))  # fmt: skip
    assert result.status == 200, result.body
    return _pkcs7_certs(result.body)[0]


def _pkcs7_certs(body: bytes) -> list[x509.Certificate]:
    from cryptography.hazmat.primitives.serialization import pkcs7

    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))


def _enroll(server, body: bytes, user: str) -> x509.Certificate:  # type: ignore[no-untyped-def]
    from tests import servekit

    result = servekit.curl(server, "/.well-known/est/simpleenroll", data=body, user=user,
                           headers=("Content-Type: application/pkcs10",))  # fmt: skip
    assert result.status == 200, result.body
    return _pkcs7_certs(result.body)[0]


def _start(home: Path, prepare: bool = True):  # type: ignore[no-untyped-def]
    import os
    import time

    from tests import servekit

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(servekit.REPO), "NO_PROXY": "*", "no_proxy": "*"})
    if prepare:
        port, http_port = servekit.free_port(), servekit.free_port()
        servekit._prepare(home, env, port, http_port)
        (home / "ports.json").write_text(json.dumps([port, http_port]))
    else:  # a restart on fresh ports: the old ones may linger in TIME_WAIT
        old_port, old_http = json.loads((home / "ports.json").read_text())
        port, http_port = servekit.free_port(), servekit.free_port()
        config = (home / "serve.toml").read_text()
        config = config.replace(f"port = {old_port}\n", f"port = {port}\n")
        config = config.replace(f"http_port = {old_http}\n", f"http_port = {http_port}\n")
        (home / "serve.toml").write_text(config)
        (home / "ports.json").write_text(json.dumps([port, http_port]))
    log_path = home / "serve.log"
    starts = log_path.read_text().count("listening on https") if log_path.exists() else 0
    with log_path.open("ab") as log:
        process = subprocess.Popen([*servekit.KVPKI, "serve", "--config", str(home / "serve.toml")],
                                   stdout=log, stderr=log, env=env, cwd=home)  # fmt: skip
    server = servekit.EstServer(home, env, port, http_port, process, log_path)
    deadline = time.monotonic() + 20
    while server.log().count("listening on https") <= starts:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"kvpki serve did not start: {server.log()}")
        time.sleep(0.05)
    return server


def _stop(server) -> None:  # type: ignore[no-untyped-def]
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.mark.parametrize("store", ["azure"], indirect=True)
def test_key_vault_rollover_of_root_and_sub_ca_keeps_each_key_version_signing(
    kvpki: Kvpki, kv: KeyVaultTestServer, kv_env: dict[str, str], make_csr: Callable[..., DeviceKey], tmp_path: Path
) -> None:
    """Key Vault: each generation is a new key version of the same certificate; old ones keep signing."""
    kvpki.init_ca("kvroot", "--subject", "CN=Vault Root")
    kvpki.ok("init-ca", "--name", "kvsub", "--parent", "kvroot", *azure_init_args(kv), "--subject", "CN=Vault Sub")
    root0 = kvpki.ok("get-ca", "--ca", "kvroot")
    chain0 = kvpki.ok("get-ca", "--ca", "kvsub", "--chain")
    old_leaf = kvpki.ok("sign-csr", "--ca", "kvsub", "-", input=make_csr("/CN=old").csr_pem)

    sub1 = certs(kvpki.ok("rollover", "--ca", "kvsub"))[0]
    assert sub1.subject == certs(chain0)[0].subject and ski(sub1) != ski(certs(chain0)[0])
    chain1 = kvpki.ok("get-ca", "--ca", "kvsub", "--generation", "1", "--chain")
    new_leaf = kvpki.ok("sign-csr", "--ca", "kvsub", "-", input=make_csr("/CN=new").csr_pem)
    assert verify(tmp_path, old_leaf, root0, chain0).returncode == 0
    assert verify(tmp_path, new_leaf, root0, chain1).returncode == 0
    assert verify(tmp_path, new_leaf, root0, chain0).returncode != 0

    # a root: the new certificate is self-signed by the new key version; a sub-CA rolled after it chains to it
    root1_pem = kvpki.ok("rollover", "--ca", "kvroot", "--key-type", "ec-p384")
    root1 = certs(root1_pem)[0]
    assert root1.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert root1.subject == certs(root0)[0].subject and ski(root1) != ski(certs(root0)[0])
    assert verify(tmp_path, root1_pem, root1_pem, b"").returncode == 0
    kvpki.ok("rollover", "--ca", "kvsub")
    chain2 = kvpki.ok("get-ca", "--ca", "kvsub", "--generation", "2", "--chain")
    newest = kvpki.ok("sign-csr", "--ca", "kvsub", "-", input=make_csr("/CN=newest").csr_pem)
    assert verify(tmp_path, newest, root1.public_bytes(PEM), chain2).returncode == 0
    assert verify(tmp_path, old_leaf, root0, chain0).returncode == 0  # the old chain still verifies its leaves

    # the vault: one certificate per CA, a key version per generation (+ temporaries), all CA versions enabled
    for name, count in (("kvroot", 2), ("kvsub", 3)):
        recorded = json.loads((kvpki.home / "cas" / name / "generations.json").read_text())
        assert sorted(recorded) == [str(n) for n in range(count)]
        versions = [entry["kid"].rsplit("/", 1)[1] for entry in recorded.values()]
        assert len(set(versions)) == count and all(f"/keys/{name}/" in entry["kid"] for entry in recorded.values())

    # CRLs of generations 0 and 1 of the sub-CA, each signed by its own key version
    kvpki.ok("revoke", "--ca", "kvsub", serial_of(old_leaf))
    kvpki.ok("revoke", "--ca", "kvsub", serial_of(new_leaf))
    for generation, chain, revoked in ((0, chain0, old_leaf), (1, chain1, new_leaf)):
        crl = kvpki.ok("crl", "--ca", "kvsub", "--generation", str(generation))
        issuer = certs(chain)[0].public_bytes(PEM)
        crl_file, ca_file = write(tmp_path / "c.pem", crl), write(tmp_path / "i.pem", issuer)
        assert b"verify OK" in openssl("crl", "-in", str(crl_file), "-CAfile", str(ca_file), "-noout").stderr
        assert {r.serial_number for r in x509.load_pem_x509_crl(crl)} == {int(serial_of(revoked), 16)}
    assert not [entry for entry in kv.log if entry.method == "DELETE"]

    # OCSP for an old-generation certificate: signed by the old key version (counted at the vault)
    import os

    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings
    from kvpki_cli.serve.ocsp import build_answer

    recorded = json.loads((kvpki.home / "cas" / "kvsub" / "generations.json").read_text())
    version_of = {int(n): entry["kid"].rsplit("/", 1)[1] for n, entry in recorded.items()}
    old_env = os.environ.get("KVPKI_HOME")
    os.environ["KVPKI_HOME"] = str(kvpki.home)
    try:
        ca = CertificateAuthority.open(Settings.load(kvpki.home), "kvsub")
        for leaf, chain, generation in ((old_leaf, chain0, 0), (newest, chain2, 2)):
            kv.clear_log()
            issuer = certs(chain)[0]
            request = ocsp.OCSPRequestBuilder().add_certificate(
                x509.load_pem_x509_certificate(leaf), issuer, hashes.SHA1()
            ).build()
            answer = build_answer(ca, request.public_bytes(serialization.Encoding.DER), None, timedelta(hours=1))
            response = ocsp.load_der_ocsp_response(answer.body)
            assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            issuer.public_key().verify(  # type: ignore[call-arg]
                response.signature, response.tbs_response_bytes, *_verify_args(issuer, response)
            )
            signs = [e.path for e in kv.log if e.path.endswith("/sign") and e.status == 200]
            assert signs and all(f"/keys/kvsub/{version_of[generation]}/sign" in path for path in signs)
        ca.inventory.close()
    finally:
        if old_env is None:
            os.environ.pop("KVPKI_HOME", None)
        else:
            os.environ["KVPKI_HOME"] = old_env
    assert not [entry for entry in kv.log if entry.method == "DELETE"]


@pytest.mark.parametrize(
    ("path", "skip", "kind"),
    [
        ("/create", 0, "status"),
        ("/create", 1, "status"),
        ("/pending/merge", 0, "status"),
        ("/create", 0, "apply-then-drop"),
        ("/create", 1, "apply-then-drop"),
        ("/pending/merge", 0, "apply-then-drop"),
    ],
)
@pytest.mark.parametrize("store", ["azure"], indirect=True)
def test_key_vault_rollover_interrupted_at_each_vault_write_resumes_without_deleting(
    kvpki: Kvpki, kv: KeyVaultTestServer, make_csr: Callable[..., DeviceKey], tmp_path: Path,
    path: str, skip: int, kind: str,
) -> None:  # fmt: skip
    """A failure at any vault write leaves the old generation current; the rerun continues, never repeats a key."""
    from tests.kvserver.server import FaultRule

    kvpki.init_ca("kvroot", "--subject", "CN=Vault Root")
    root0 = kvpki.ok("get-ca", "--ca", "kvroot")
    kv.clear_log()
    kv.set_faults(rules=[FaultRule(kind=kind, status=403, path_contains=path, method="POST", skip=skip)])
    first = kvpki.run("rollover", "--ca", "kvroot")
    kv.set_faults()
    if first.returncode != 0:
        assert first.stdout == b"" and first.stderr.count(b"kvpki: error:") == 1, first.stderr
        assert b"Traceback" not in first.stderr
        # still generation 0: issues and verifies with the old root
        leaf = kvpki.ok("sign-csr", "--ca", "kvroot", "-", input=make_csr("/CN=meanwhile").csr_pem)
        assert verify(tmp_path, leaf, root0, b"").returncode == 0
        assert kvpki.ok("get-ca", "--ca", "kvroot") == root0
        second = kvpki.run("rollover", "--ca", "kvroot")
        assert second.returncode == 0, second.stderr
    root1 = kvpki.ok("get-ca", "--ca", "kvroot")
    assert root1 != root0
    assert verify(tmp_path, root1, root1, b"").returncode == 0
    leaf = kvpki.ok("sign-csr", "--ca", "kvroot", "-", input=make_csr("/CN=after").csr_pem)
    assert verify(tmp_path, leaf, root1, b"").returncode == 0
    crl = write(tmp_path / "c.pem", kvpki.ok("crl", "--ca", "kvroot", "--generation", "0"))
    assert b"verify OK" in openssl("crl", "-in", str(crl), "-CAfile", str(write(tmp_path / "r.pem", root0)),
                                   "-noout").stderr  # fmt: skip
    # exactly two versions made (new key, then its pending CA version), nothing repeated: init-ca's two + two;
    # the temporary version is disabled, the CA versions of both generations stay enabled
    versions = kv.vault.certs["kvroot"].versions
    assert [(v.tags.get("kvpki-role"), v.tags.get("kvpki-generation", "0"), v.enabled) for v in versions] == [
        ("temporary", "0", False), ("ca", "0", True), ("temporary", "1", False), ("ca", "1", True)
    ]
    assert not [e for e in kv.log if e.method == "DELETE"]


@pytest.mark.parametrize("store", ["azure"], indirect=True)
def test_key_vault_rollover_merged_but_not_recorded_is_finished_by_the_rerun(
    kvpki: Kvpki, kv: KeyVaultTestServer, kv_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The vault merged generation 1 but the home could not record it: the rerun records it, makes no new key."""
    from kvpki_cli.config import Settings
    from kvpki_cli.errors import BackendError
    from kvpki_cli.keystores.azure.store import AzureKeyStore
    from kvpki_cli.rollover import rollover

    kvpki.init_ca("kvroot", "--subject", "CN=Vault Root")
    real_record = AzureKeyStore._record

    def failing_record(self: AzureKeyStore, recorded: dict[int, dict[str, object]]) -> None:
        if max(recorded) >= 1:
            raise OSError(28, "No space left on device")
        real_record(self, recorded)

    monkeypatch.setenv("KVPKI_HOME", str(kvpki.home))
    monkeypatch.setattr(AzureKeyStore, "_record", failing_record)
    with pytest.raises(BackendError, match="merged in the vault"):
        rollover(Settings.load(kvpki.home), "kvroot")
    monkeypatch.setattr(AzureKeyStore, "_record", real_record)
    merged = kv.vault.certs["kvroot"].versions[-1]
    assert merged.tags.get("kvpki-generation") == "1" and merged.der is not None

    rerun = kvpki.run("rollover", "--ca", "kvroot")
    assert rerun.returncode != 0 and rerun.stdout == b""
    assert b"is recorded now and current" in rerun.stderr and rerun.stderr.count(b"\n") == 1
    current = x509.load_pem_x509_certificate(kvpki.ok("get-ca", "--ca", "kvroot"))
    assert current.public_bytes(serialization.Encoding.DER) == merged.der
    assert len(kv.vault.certs["kvroot"].versions) == 4  # no further version
    kvpki.ok("rollover", "--ca", "kvroot")  # and the next rollover is an ordinary one
    assert kvpki.ok("get-ca", "--ca", "kvroot", "--generation", "2")
    assert not [e for e in kv.log if e.method == "DELETE"]


# --- generated: random issue / revoke / rollover sequences, checked per key generation

CASES = int(__import__("os").environ.get("KVPKI_FUZZ_CASES", "4"))


@pytest.mark.parametrize("seed", range(CASES))
def test_random_lifecycles_keep_every_generation_crl_and_ocsp_exact(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the order of issuance, revocation and rollovers: each generation's CRL is signed by that
    generation's key only and lists exactly the revoked certificates that key signed; OCSP answers each
    serial from its own generation (revoked/good) and `unknown` under any other generation's key."""
    import random

    from cryptography.hazmat.primitives.asymmetric import ec

    from kvpki_cli.authority import CertificateAuthority, SigningRequest, init_ca
    from kvpki_cli.config import Settings
    from kvpki_cli.pki.keys import KeyType
    from kvpki_cli.pki.names import parse_subject
    from kvpki_cli.rollover import rollover
    from kvpki_cli.serve.ocsp import build_answer

    for name in [k for k in __import__("os").environ if k.startswith(("KVPKI_", "AZURE_"))]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("KVPKI_HOME", str(home))
    settings = Settings.load(home)
    init_ca(settings, "root", parse_subject("CN=Fuzz Root"), KeyType("ec-p256"))
    init_ca(settings, "issuing", parse_subject("CN=Fuzz Issuing"), KeyType("ec-p256"), parent="root")
    rng = random.Random(seed)
    issued: dict[int, tuple[x509.Certificate, int]] = {}  # serial -> (certificate, generation)
    revoked: set[int] = set()
    generation = 0
    steps = rng.randint(8, 16)
    forced = rng.randrange(1, steps - 1)  # at least one rollover, with certificates before and after it
    for step in range(steps):
        action = rng.random()
        if (step == forced or action < 0.15) and generation < 3:
            generation = rollover(settings, "issuing", KeyType(rng.choice(["ec-p256", "ec-p384"]))).generation
        elif action < 0.4 and len(revoked) < len(issued):
            serial = rng.choice(sorted(set(issued) - revoked))
            CertificateAuthority.open(settings, "issuing").revoke(format(serial, "x"), "keyCompromise")
            revoked.add(serial)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"dev-{seed}-{step}")]))
                .sign(key, hashes.SHA256())
            )
            ca = CertificateAuthority.open(settings, "issuing")
            result = ca.issue(SigningRequest(csr.public_bytes(serialization.Encoding.DER), csr))
            assert result.record.issuer_generation == generation == ca.current().number
            result.certificate.verify_directly_issued_by(ca.current().chain[0])
            issued[result.certificate.serial_number] = (result.certificate, generation)
    ca = CertificateAuthority.open(settings, "issuing")
    ca_certs = {g.number: g.chain[0] for g in ca.generations()}
    assert sorted(ca_certs) == list(range(generation + 1))
    for number in ca_certs:
        crl = ca.crl(timedelta(days=1), generation=number)
        for other, other_cert in ca_certs.items():
            assert crl.is_signature_valid(other_cert.public_key()) == (other == number)  # type: ignore[arg-type]
        expected = {s for s in revoked if issued[s][1] == number}
        assert {r.serial_number for r in crl} == expected
    for serial, (certificate, number) in issued.items():
        for other, other_cert in ca_certs.items():
            request = ocsp.OCSPRequestBuilder().add_certificate(certificate, other_cert, hashes.SHA1()).build()
            der = request.public_bytes(serialization.Encoding.DER)
            response = ocsp.load_der_ocsp_response(build_answer(ca, der, None, timedelta(hours=1)).body)
            if other != number:
                assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
                continue
            wanted = ocsp.OCSPCertStatus.REVOKED if serial in revoked else ocsp.OCSPCertStatus.GOOD
            assert response.certificate_status == wanted
            other_cert.public_key().verify(  # type: ignore[call-arg]
                response.signature, response.tbs_response_bytes, *_verify_args(other_cert, response)
            )
    ca.inventory.close()
