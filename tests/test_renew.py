"""`kvpki renew`: a new certificate for the same names and profile, optionally superseding the old one."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

from tests.conftest import Kvpki
from tests.helpers import load_cert, openssl_verify, write


def test_renew_keeps_names_and_profile_and_rotates_key(kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    root = kvpki.init_ca("root", "--subject", "CN=Renew Root")
    first = make_csr("/CN=gw.example.com")
    old_pem = kvpki.ok(
        "sign-csr", "--ca", "root", "--profile", "server", "--san", "DNS:gw.example.com", input=first.csr_pem
    )
    old_path = write(tmp_path / "old.pem", old_pem)
    # the new CSR asks for other names: renewal ignores them and keeps the old certificate's
    rotated = make_csr("/CN=something-else")
    new_pem = kvpki.ok(
        "renew", str(old_path), "--ca", "root", "--revoke-old", "--requester", "ops", input=rotated.csr_pem
    )
    old, new = load_cert(old_pem), load_cert(new_pem)
    assert new.subject == old.subject and new.serial_number != old.serial_number
    sans = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw.example.com"]
    assert new.public_key() == x509.load_pem_x509_csr(rotated.csr_pem).public_key()
    assert openssl_verify(tmp_path, root, new_pem, b"", "-purpose", "sslserver").returncode == 0
    rows = {row["serial"]: row for row in kvpki.inventory("root")}
    assert rows[format(old.serial_number, "x")]["status"] == "revoked"
    assert rows[format(old.serial_number, "x")]["reason"] == "superseded"
    new_row = rows[format(new.serial_number, "x")]
    assert (new_row["status"], new_row["profile"], new_row["requester"]) == ("valid", "server", "ops")


def test_renew_refuses_revoked_unknown_and_foreign(kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    kvpki.init_ca("root", "--subject", "CN=Renew Root")
    kvpki.init_ca("other", "--subject", "CN=Other Root")
    mine = write(tmp_path / "mine.pem", kvpki.ok("sign-csr", "--ca", "root", input=make_csr("/CN=dev-1").csr_pem))
    foreign = write(
        tmp_path / "foreign.pem", kvpki.ok("sign-csr", "--ca", "other", input=make_csr("/CN=dev-2").csr_pem)
    )
    before = kvpki.inventory("root")
    cases = [
        ([str(foreign), "--ca", "root"], make_csr().csr_pem, 3),  # not issued by this CA
        ([str(mine), "--ca", "root"], b"garbage", 3),
        ([str(tmp_path / "missing.pem"), "--ca", "root"], make_csr().csr_pem, 3),
        ([str(mine), "--ca", "root", "--validity", "never"], make_csr().csr_pem, 2),
    ]
    for args, stdin, code in cases:
        result = kvpki.run("renew", *args, input=stdin)
        assert (result.returncode, result.stdout) == (code, b""), (args, result.stderr)
        assert result.stderr.decode().count("\n") == 1
    assert kvpki.inventory("root") == before
    kvpki.ok("revoke", "--cert", str(mine), "--ca", "root")
    revoked = kvpki.run("renew", str(mine), "--ca", "root", input=make_csr().csr_pem)
    assert revoked.returncode == 4 and b"revoked" in revoked.stderr
    assert [row["status"] for row in kvpki.inventory("root")] == ["revoked"]
    assert json.loads(kvpki.ok("list", "--ca", "root", "--status", "valid", "--json")) == []
