"""Every command and profile end to end, checked with openssl and pkilint (run on every key store)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import Kvpki, openssl
from tests.helpers import load_cert, openssl_verify, pkilint_findings, write


@pytest.fixture
def hierarchy(kvpki: Kvpki) -> tuple[bytes, bytes]:
    """root (P-384) -> issuing (P-256) on the store under test."""
    root = kvpki.init_ca("root", "--subject", "CN=Test Root CA,O=kvpki tests", "--key-type", "ec-p384")
    issuing = kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=Test Issuing CA,O=kvpki tests")
    return root, issuing


def test_root_sub_leaf_chain_verifies_with_openssl(
    kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr, tmp_path: Path
) -> None:
    root, issuing = hierarchy
    device = make_csr("/CN=device-001")
    leaf = kvpki.ok("sign-csr", "--ca", "issuing", input=device.csr_pem)
    assert leaf.startswith(b"-----BEGIN CERTIFICATE-----") and leaf.count(b"BEGIN") == 1
    result = openssl_verify(tmp_path, root, leaf, issuing, "-purpose", "sslclient")
    assert result.returncode == 0, result.stderr
    # the certificate really belongs to the CSR's key
    cert = load_cert(leaf)
    key_pub = openssl("pkey", "-in", str(device.key), "-pubout").stdout
    assert openssl("x509", "-noout", "-pubkey", input=leaf).stdout == key_pub
    # sub-CA certificate is signed with SHA-384 by the P-384 root, the leaf with SHA-256
    assert isinstance(load_cert(issuing).signature_hash_algorithm, hashes.SHA384)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_chain_flag_and_get_ca(kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr, tmp_path: Path) -> None:
    root, issuing = hierarchy
    with_chain = kvpki.ok("sign-csr", "--ca", "issuing", "--chain", input=make_csr().csr_pem)
    certs = x509.load_pem_x509_certificates(with_chain)
    assert [c.subject.rfc4514_string() for c in certs] == [
        "CN=device-001",
        "CN=Test Issuing CA,O=kvpki tests",
        "CN=Test Root CA,O=kvpki tests",
    ]
    assert kvpki.ok("get-ca", "--ca", "issuing") == issuing
    assert kvpki.ok("get-ca", "--ca", "issuing", "--chain") == issuing + root
    der = kvpki.ok("get-ca", "--ca", "root", "--format", "der")
    assert x509.load_der_x509_certificate(der) == load_cert(root)
    p7 = kvpki.ok("get-ca", "--ca", "issuing", "--chain", "--format", "pkcs7")
    printed = openssl("pkcs7", "-print_certs", input=p7).stdout
    assert printed.count(b"BEGIN CERTIFICATE") == 2


@pytest.mark.parametrize(
    ("profile", "subject", "extra", "purpose"),
    [
        ("device", "/CN=device-42", [], "sslclient"),
        (
            "server",
            "/CN=gateway.example.com",
            ["--san", "DNS:gateway.example.com", "--san", "IP:10.0.0.5"],
            "sslserver",
        ),
        ("edge-ca", "/CN=edge-gateway-ca", [], "any"),
        ("sub-ca", "/CN=Line Sub CA", [], "any"),
    ],
)
def test_every_profile_verifies_and_lints_clean(
    kvpki: Kvpki,
    hierarchy: tuple[bytes, bytes],
    make_csr,
    tmp_path: Path,
    profile: str,
    subject: str,
    extra: list[str],
    purpose: str,
) -> None:
    root, issuing = hierarchy
    csr = make_csr(subject, newkey=("-newkey", "rsa:2048"))
    pem = kvpki.ok("sign-csr", "--ca", "issuing", "--profile", profile, *extra, input=csr.csr_pem)
    result = openssl_verify(tmp_path, root, pem, issuing, "-purpose", purpose)
    assert result.returncode == 0, result.stderr
    assert pkilint_findings(write(tmp_path / f"{profile}.pem", pem)) == ""
    cert = load_cert(pem)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    if profile in ("edge-ca", "sub-ca"):
        assert constraints.value.ca and usage.value.key_cert_sign and usage.value.crl_sign
        if profile == "edge-ca":
            assert constraints.value.path_length == 0
        # the new CA can itself issue a certificate that openssl accepts (what IoT Edge does with its Edge CA)
        leaf_csr = make_csr("/CN=edge-module")
        leaf_path = tmp_path / "module.pem"
        openssl(
            "x509",
            "-req",
            "-in",
            str(write(tmp_path / "m.csr", leaf_csr.csr_pem)),
            "-CA",
            str(write(tmp_path / "ca.pem", pem)),
            "-CAkey",
            str(csr.key),
            "-days",
            "5",
            "-out",
            str(leaf_path),
            "-extfile",
            str(
                write(
                    tmp_path / "ext.cnf",
                    b"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
                )
            ),
        )
        assert openssl_verify(tmp_path, root, leaf_path.read_bytes(), issuing + pem).returncode == 0
    else:
        assert not constraints.value.ca and not usage.value.key_cert_sign
    if profile == "server":
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["gateway.example.com"]


def test_root_and_sub_ca_lint_clean(kvpki: Kvpki, hierarchy: tuple[bytes, bytes], tmp_path: Path) -> None:
    root, issuing = hierarchy
    assert pkilint_findings(write(tmp_path / "root.pem", root)) == ""
    assert pkilint_findings(write(tmp_path / "issuing.pem", issuing)) == ""
    root_cert = load_cert(root)
    assert root_cert.issuer == root_cert.subject
    assert load_cert(issuing).extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_revoke_and_crl_verified_by_openssl_and_pkilint(
    kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr, tmp_path: Path
) -> None:
    root, issuing = hierarchy
    keep = kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr("/CN=keep").csr_pem)
    gone = kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr("/CN=gone").csr_pem)
    gone_path = write(tmp_path / "gone.pem", gone)
    record = json.loads(kvpki.ok("revoke", "--cert", str(gone_path), "--ca", "issuing", "--reason", "keyCompromise"))
    assert record["status"] == "revoked" and record["reason"] == "keyCompromise"
    crl_pem = kvpki.ok("crl", "--ca", "issuing")
    crl_path = write(tmp_path / "crl.pem", crl_pem)
    assert (
        openssl(
            "crl", "-in", str(crl_path), "-noout", "-CAfile", str(write(tmp_path / "issuing.pem", issuing)), "-verify"
        ).returncode
        == 0
    )
    assert pkilint_findings(crl_path, "crl") == ""
    text = openssl("crl", "-in", str(crl_path), "-noout", "-text").stdout.decode()
    crl = x509.load_pem_x509_crl(crl_pem)
    assert [r.serial_number for r in crl] == [load_cert(gone).serial_number]
    assert "Key Compromise" in text
    chain = root + issuing
    revoked = openssl_verify(tmp_path, chain, gone, b"", "-crl_check", "-CRLfile", str(crl_path))
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    assert openssl_verify(tmp_path, chain, keep, b"", "-crl_check", "-CRLfile", str(crl_path)).returncode == 0
    # CRL numbers strictly increase between publications
    second = x509.load_der_x509_crl(kvpki.ok("crl", "--ca", "issuing", "--format", "der", "--new"))

    def number(c: x509.CertificateRevocationList) -> int:
        return c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    assert number(second) > number(crl)
    # revoking again is a conflict, listing shows the states
    again = kvpki.run("revoke", record["serial"], "--ca", "issuing")
    assert again.returncode == 7 and again.stdout == b""
    statuses = {row["subject"]: row["status"] for row in kvpki.inventory("issuing")}
    assert statuses == {"CN=keep": "valid", "CN=gone": "revoked"}
    assert [r["subject"] for r in json.loads(kvpki.ok("list", "--ca", "issuing", "--status", "revoked", "--json"))] == [
        "CN=gone"
    ]


def test_input_encodings_pem_der_base64(kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr, tmp_path: Path) -> None:
    csr = x509.load_pem_x509_csr(make_csr("/CN=enc-1").csr_pem)
    der = csr.public_bytes(Encoding.DER)
    one_line = base64.b64encode(der)
    wrapped = b"\n".join(one_line[i : i + 64] for i in range(0, len(one_line), 64)) + b"\n"
    for body in (der, one_line, wrapped, b"  " + wrapped.replace(b"\n", b"\r\n")):
        cert = load_cert(kvpki.ok("sign-csr", "-", "--ca", "issuing", input=body))
        assert cert.public_key() == csr.public_key()
    from_file = kvpki.ok("sign-csr", str(write(tmp_path / "c.der", der)), "--ca", "issuing", "--format", "der")
    assert x509.load_der_x509_certificate(from_file).public_key() == csr.public_key()


def test_output_formats(kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr) -> None:
    root, issuing = hierarchy
    document = json.loads(
        kvpki.ok("sign-csr", "--ca", "issuing", "--format", "json", "--chain", input=make_csr("/CN=js").csr_pem)
    )
    cert = load_cert(document["certificate"].encode())
    assert document["serial"] == format(cert.serial_number, "x")
    assert document["subject"] == "CN=js" and document["profile"] == "device"
    assert [c.encode() for c in document["chain"]] == [issuing, root]
    p7 = kvpki.ok("sign-csr", "--ca", "issuing", "--format", "pkcs7", "--chain", input=make_csr("/CN=p7").csr_pem)
    assert openssl("pkcs7", "-print_certs", input=p7).stdout.count(b"BEGIN CERTIFICATE") == 3


def test_serial_validity_and_extensions(kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr) -> None:
    before = datetime.now(UTC)
    result = kvpki.run(
        "sign-csr", "--ca", "issuing", "--validity", "10y", input=make_csr("/CN=cap").csr_pem, check=True
    )
    cert = load_cert(result.stdout)
    assert b"capped" in result.stderr
    serial_octets = cert.serial_number.to_bytes(20, "big")
    assert cert.serial_number > 0 and serial_octets[0] != 0 and cert.serial_number.bit_length() <= 159
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=365) <= lifetime <= timedelta(days=365, minutes=6)
    assert before - timedelta(minutes=6) <= cert.not_valid_before_utc <= before - timedelta(minutes=4)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    issuer = load_cert(kvpki.ok("get-ca", "--ca", "issuing"))
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_validity_never_exceeds_issuer(kvpki: Kvpki, make_csr) -> None:
    kvpki.init_ca("short", "--subject", "CN=Short Root", "--validity", "30d")
    result = kvpki.run("sign-csr", "--ca", "short", "--validity", "300d", input=make_csr().csr_pem, check=True)
    issuer = load_cert(kvpki.ok("get-ca", "--ca", "short"))
    assert load_cert(result.stdout).not_valid_after_utc <= issuer.not_valid_after_utc
    assert b"CA certificate's notAfter" in result.stderr


def test_batch_signing_into_out_dir(kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr, tmp_path: Path) -> None:
    root, issuing = hierarchy
    files = [str(write(tmp_path / f"dev{i}.csr", make_csr(f"/CN=dev{i}").csr_pem)) for i in range(5)]
    out = tmp_path / "out"
    result = kvpki.run("sign-csr", *files, "--ca", "issuing", "--out-dir", str(out), check=True)
    assert result.stdout == b""
    issued = sorted(out.iterdir())
    assert [p.name for p in issued] == [f"dev{i}.pem" for i in range(5)]
    for i, path in enumerate(issued):
        assert load_cert(path.read_bytes()).subject.rfc4514_string() == f"CN=dev{i}"
        assert openssl_verify(tmp_path, root, path.read_bytes(), issuing).returncode == 0
    assert len(kvpki.inventory("issuing")) == 5
    # a second run would overwrite: refused before anything is issued
    again = kvpki.run("sign-csr", *files, "--ca", "issuing", "--out-dir", str(out))
    assert again.returncode == 2 and len(kvpki.inventory("issuing")) == 5
    # one bad CSR in a batch: nothing issued, nothing written
    bad = write(tmp_path / "bad.csr", b"garbage")
    out2 = tmp_path / "out2"
    failed = kvpki.run("sign-csr", files[0], str(bad), "--ca", "issuing", "--out-dir", str(out2))
    assert failed.returncode == 3 and b"bad.csr" in failed.stderr
    assert not any(out2.iterdir()) and len(kvpki.inventory("issuing")) == 5


def test_inventory_records_every_field(kvpki: Kvpki, hierarchy: tuple[bytes, bytes], make_csr) -> None:
    csr = make_csr("/CN=gw.example.com")
    pem = kvpki.ok(
        "sign-csr",
        "--ca",
        "issuing",
        "--profile",
        "server",
        "--san",
        "DNS:gw.example.com",
        "--requester",
        "provisioner-7",
        input=csr.csr_pem,
    )
    cert = load_cert(pem)
    [row] = kvpki.inventory("issuing")
    digest = hashes.Hash(hashes.SHA256())
    digest.update(x509.load_pem_x509_csr(csr.csr_pem).public_bytes(Encoding.DER))
    assert row["serial"] == format(cert.serial_number, "x")
    assert row["sans"] == ["gw.example.com"] and row["profile"] == "server" and row["requester"] == "provisioner-7"
    assert row["csr_sha256"] == digest.finalize().hex() and row["status"] == "valid"
    assert row["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    table = kvpki.run("list", "--ca", "issuing", check=True)
    assert table.stdout == b"" and row["serial"].encode() in table.stderr


def test_sub_ca_records_in_parent_inventory_and_rsa_ca(kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    root = kvpki.init_ca("rsa-root", "--subject", "CN=RSA Root", "--key-type", "rsa-3072", "--path-length", "1")
    sub = kvpki.init_ca("rsa-sub", "--parent", "rsa-root", "--subject", "CN=RSA Sub", "--key-type", "rsa-2048")
    sub_cert = load_cert(sub)
    assert sub_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    [row] = kvpki.inventory("rsa-root")
    assert row["serial"] == format(sub_cert.serial_number, "x") and row["profile"] == "sub-ca"
    leaf = kvpki.ok("sign-csr", "--ca", "rsa-sub", input=make_csr().csr_pem)
    assert openssl_verify(tmp_path, root, leaf, sub).returncode == 0
    # pathlen 0 under rsa-sub: it may not issue CA certificates
    refused = kvpki.run("sign-csr", "--ca", "rsa-sub", "--profile", "edge-ca", input=make_csr("/CN=edge").csr_pem)
    assert refused.returncode == 4 and b"path length" in refused.stderr


def test_init_ca_refuses_to_overwrite(kvpki: Kvpki) -> None:
    first = kvpki.init_ca("only", "--subject", "CN=Only")
    again = kvpki.run("init-ca", "--name", "only", "--subject", "CN=Other", *kvpki.store.init_args("only"))
    assert again.returncode == 7 and again.stdout == b"" and again.stderr.count(b"\n") == 1
    assert kvpki.ok("get-ca", "--ca", "only") == first
