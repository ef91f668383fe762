"""`kvpki renew` keeps every constraint of the old certificate, or refuses (issue 7, item 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from tests.conftest import Kvpki
from tests.helpers import load_cert, openssl, openssl_verify, write

# Everything that limits what a certificate may do (listed here, not taken from the code under test).
CONSTRAINTS = (
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.NAME_CONSTRAINTS,
    ExtensionOID.POLICY_CONSTRAINTS,
    ExtensionOID.INHIBIT_ANY_POLICY,
    ExtensionOID.CERTIFICATE_POLICIES,
)


def constraints(cert: x509.Certificate) -> dict[x509.ObjectIdentifier, x509.Extension[x509.ExtensionType] | None]:
    found = {ext.oid: ext for ext in cert.extensions}
    return {oid: found.get(oid) for oid in CONSTRAINTS}


def test_renewing_a_sub_ca_keeps_path_length_zero(kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    root = kvpki.init_ca("root", "--subject", "CN=Root")
    old_pem = kvpki.init_ca("sub", "--parent", "root", "--subject", "CN=Sub", "--path-length", "0")
    old = write(tmp_path / "sub.pem", old_pem)
    new_pem = kvpki.ok("renew", str(old), "--ca", "root", input=make_csr("/CN=Sub").csr_pem)

    text = openssl("x509", "-noout", "-text", input=new_pem).stdout.decode()
    assert "CA:TRUE, pathlen:0" in text, text
    before, after = load_cert(old_pem), load_cert(new_pem)
    assert after.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert constraints(after) == constraints(before)
    assert openssl_verify(tmp_path, root, new_pem).returncode == 0
    rows = {row["serial"]: row for row in kvpki.inventory("root")}
    assert rows[format(after.serial_number, "x")]["profile"] == "sub-ca"


@pytest.mark.parametrize(
    ("profile", "init_args", "sign_args"),
    [
        ("sub-ca", ["--path-length", "2"], []),
        ("sub-ca", [], []),  # unlimited stays unlimited
        ("edge-ca", [], ["--profile", "edge-ca"]),
        ("server", [], ["--profile", "server", "--san", "DNS:gw.example.com"]),
        ("device", [], []),
    ],
)
def test_every_constraint_survives_renewal(
    local_kvpki: Kvpki, make_csr, tmp_path: Path, profile: str, init_args: list[str], sign_args: list[str]
) -> None:
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=Root")
    if profile == "sub-ca":
        old_pem = kvpki.init_ca("sub", "--parent", "root", "--subject", "CN=Sub", *init_args)
    else:
        old_pem = kvpki.ok("sign-csr", "--ca", "root", *sign_args, input=make_csr("/CN=thing-1").csr_pem)
    old = write(tmp_path / "old.pem", old_pem)
    new_pem = kvpki.ok("renew", str(old), "--ca", "root", input=make_csr("/CN=other").csr_pem)
    assert constraints(load_cert(new_pem)) == constraints(load_cert(old_pem))


def test_renewal_that_would_change_a_constraint_is_refused(local_kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    """The operator changed the sub-ca profile since: renewing would change pathlen, so it refuses."""
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=Root")
    unlimited = write(tmp_path / "a.pem", kvpki.init_ca("sub-a", "--parent", "root", "--subject", "CN=A"))
    zero = write(
        tmp_path / "b.pem", kvpki.init_ca("sub-b", "--parent", "root", "--subject", "CN=B", "--path-length", "0")
    )
    (kvpki.home / "config.toml").write_text("[profiles.sub-ca]\npath_length = 1\n")
    before = kvpki.inventory("root")
    for old in (unlimited, zero):
        result = kvpki.run("renew", str(old), "--ca", "root", input=make_csr("/CN=x").csr_pem)
        stderr = result.stderr.decode()
        assert (result.returncode, result.stdout) == (4, b""), stderr
        assert stderr.count("\n") == 1 and ("path length" in stderr or "basicConstraints" in stderr), stderr
    assert kvpki.inventory("root") == before
