"""Hostile input: every malformed or policy-violating CSR/argument gets its documented exit code,
exactly one stderr line, empty stdout, and no inventory row (on every key store)."""

from __future__ import annotations

import base64
import os
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from tests import csrforge as forge
from tests.conftest import KVPKI, Kvpki, openssl
from tests.helpers import pkilint_findings, write

INVALID, POLICY, USAGE, NOT_FOUND, EXISTS = 3, 4, 2, 5, 7


def _csr(
    key, subject: str = "device-1", extensions: list[tuple[x509.ExtensionType, bool]] | None = None, algorithm=None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)]) if subject else x509.Name([])
    )
    for ext, critical in extensions or []:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(
        key,
        algorithm
        if algorithm is not None
        else (None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()),
    ).public_bytes(Encoding.PEM)


def _openssl_csr(tmp: Path, *newkey: str, subject: str = "/CN=device-1") -> bytes:
    return openssl(
        "req", "-new", *newkey, "-nodes", "-keyout", str(tmp / f"k{os.urandom(4).hex()}.pem"), "-subj", subject
    ).stdout


def _bad_signature(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER))
    der[-5] ^= 0x55  # inside the signature value
    return bytes(der)


def _tampered_subject(pem: bytes) -> bytes:
    der = x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER)
    return der.replace(b"device-1", b"device-9")


def _raw_subject_csr(*attributes: tuple[x509.ObjectIdentifier, str]) -> bytes:
    """A CSR whose subject bypasses cryptography's own checks, as a hostile client's would."""
    with warnings.catch_warnings():  # cryptography warns about exactly what this builds
        warnings.simplefilter("ignore", UserWarning)
        name = x509.Name([x509.NameAttribute(oid, value, _validate=False) for oid, value in attributes])
        builder = x509.CertificateSigningRequestBuilder().subject_name(name)
        return builder.sign(P256_FOR_NAMES, hashes.SHA256()).public_bytes(Encoding.PEM)


def _forged(*extensions: bytes, subject: bytes | None = None) -> bytes:
    """A really signed CSR with extensions no library builder allows (duplicates, x400Address, ...)."""
    name = subject if subject is not None else forge.name((forge.OID_CN, forge.UTF8, b"device-1"))
    return forge.csr(P256_FOR_NAMES, name, extensions)


def _san(*names: bytes) -> bytes:
    return forge.extension(forge.OID_SAN, forge.san(*names))


def _openssl_key_csr(tmp: Path, *genkey: str) -> bytes:
    """A CSR for a key type cryptography cannot load (SM2, binary curves), made and signed by openssl."""
    key = tmp / f"k{os.urandom(4).hex()}.pem"
    key.write_bytes(openssl(*genkey).stdout)
    return openssl("req", "-new", "-key", str(key), "-subj", "/CN=device-1").stdout


P256_FOR_NAMES = ec.generate_private_key(ec.SECP256R1())
CN, C, ORG = x509.NameOID.COMMON_NAME, x509.NameOID.COUNTRY_NAME, x509.NameOID.ORGANIZATION_NAME


@dataclass
class Case:
    args: list[str]
    stdin: bytes | Callable[[Path], bytes] | None
    code: int


P256 = ec.generate_private_key(ec.SECP256R1())
GOOD = _csr(P256)
GOOD_DER = x509.load_pem_x509_csr(GOOD).public_bytes(Encoding.DER)

CASES: dict[str, Case] = {
    "empty input": Case([], b"", INVALID),
    "garbage text": Case([], b"this is not a CSR\n", INVALID),
    "random binary": Case([], bytes(range(1, 256)) * 3, INVALID),
    "truncated DER": Case([], GOOD_DER[: len(GOOD_DER) // 2], INVALID),
    "DER with a broken length": Case([], b"\x30\x82\xff\xff" + GOOD_DER[4:], INVALID),
    "DER plus trailing junk": Case([], GOOD_DER + b"\x00junk", INVALID),
    "wrong PEM label": Case([], GOOD.replace(b"CERTIFICATE REQUEST", b"CERTIFICATE"), INVALID),
    "private key instead of CSR": Case([], b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", INVALID),
    "PEM with corrupt base64": Case(
        [], GOOD.replace(GOOD.splitlines()[2], b"@@@@" + GOOD.splitlines()[2][4:]), INVALID
    ),
    "base64 of garbage": Case([], base64.b64encode(b"\x30\x03abc"), INVALID),
    "bad CSR signature": Case([], _bad_signature(GOOD), INVALID),
    "subject altered after signing": Case([], _tampered_subject(GOOD), INVALID),
    "oversized input": Case([], b"A" * 200_000, INVALID),
    "RSA 512": Case([], lambda t: _openssl_csr(t, "-newkey", "rsa:512"), POLICY),
    "RSA 1024": Case([], lambda t: _openssl_csr(t, "-newkey", "rsa:1024"), POLICY),
    "RSA exponent 3": Case([], lambda t: _csr(rsa.generate_private_key(3, 2048)), POLICY),
    "EC secp256k1": Case([], _csr(ec.generate_private_key(ec.SECP256K1())), POLICY),
    "EC P-521": Case([], _csr(ec.generate_private_key(ec.SECP521R1())), POLICY),
    "Ed25519 key": Case([], _csr(ed25519.Ed25519PrivateKey.generate()), POLICY),
    "CA:TRUE under device profile": Case(
        [], _csr(P256, extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)]), POLICY
    ),
    "server profile without SAN": Case(["--profile", "server"], GOOD, POLICY),
    "device CN with forbidden characters": Case([], _csr(P256, subject="device one/#"), POLICY),
    "device without CN": Case([], _csr(P256, subject=""), POLICY),
    "SAN DNS not a host name": Case(["--profile", "server", "--san", "DNS:bad_name..example"], GOOD, POLICY),
    "wildcard SAN on a device": Case(["--san", "DNS:*.example.com"], GOOD, POLICY),
    "CSR SAN of a forbidden type": Case(
        ["--profile", "server"],
        _csr(P256, extensions=[(x509.SubjectAlternativeName([x509.DirectoryName(x509.Name([]))]), False)]),
        POLICY,
    ),
    "CN longer than 64 characters": Case([], _raw_subject_csr((CN, "d" * 65)), INVALID),
    "three-letter country": Case([], _raw_subject_csr((CN, "device-1"), (C, "USA")), INVALID),
    "NUL byte in CN": Case([], _raw_subject_csr((CN, "good.example\x00evil")), INVALID),
    "newline in O": Case([], _raw_subject_csr((CN, "device-1"), (ORG, "Contoso\nInc")), INVALID),
    "control character in a URI SAN": Case(["--san", "URI:urn:dev\x01ice"], GOOD, POLICY),
    "space in an email SAN": Case(["--san", "email:a b@example.com"], GOOD, POLICY),
    "malformed --san": Case(["--san", "XYZ:foo"], GOOD, INVALID),
    "malformed --san IP": Case(["--san", "IP:300.1.1.1"], GOOD, INVALID),
    "malformed --subject": Case(["--subject", "not a dn"], GOOD, INVALID),
    "path length on edge-ca": Case(["--profile", "edge-ca", "--path-length", "3"], GOOD, POLICY),
    "bad --validity": Case(["--validity", "forever"], GOOD, USAGE),
    "zero --validity": Case(["--validity", "0d"], GOOD, USAGE),
    "unknown profile": Case(["--profile", "nope"], GOOD, USAGE),
    "unknown format": Case(["--format", "xml"], GOOD, USAGE),
    "DER output with --chain": Case(["--format", "der", "--chain"], GOOD, USAGE),
    "several CSRs without --out-dir": Case(["a.csr", "b.csr"], None, USAGE),
    "missing CSR file": Case(["/nonexistent/device.csr"], None, INVALID),
    "unknown option": Case(["--frobnicate"], GOOD, USAGE),
    "unknown CA": Case(["--ca", "ghost"], GOOD, NOT_FOUND),
    # issue 7 item 12: these were exit 1 (internal error)
    "duplicate SAN extensions": Case(
        ["--profile", "server"], _forged(_san(forge.gn_dns(b"a.example")), _san(forge.gn_dns(b"b.example"))), INVALID
    ),
    "duplicate basicConstraints": Case(
        [],
        _forged(
            forge.extension(forge.OID_BASIC_CONSTRAINTS, forge.basic_constraints(False)),
            forge.extension(forge.OID_BASIC_CONSTRAINTS, forge.basic_constraints(True)),
        ),
        INVALID,
    ),
    "x400Address SAN": Case([], _forged(_san(forge.gn_x400())), POLICY),
    "EDIPartyName SAN": Case([], _forged(_san(forge.gn_edi_party())), POLICY),
    "SM2 key": Case([], lambda t: _openssl_key_csr(t, "genpkey", "-algorithm", "SM2"), POLICY),
    "sect283k1 key": Case([], lambda t: _openssl_key_csr(t, "ecparam", "-name", "sect283k1", "-genkey"), POLICY),
    "--san DNS with a U-label": Case(["--san", "DNS:bücher.de"], GOOD, INVALID),
    "--san email with two @": Case(["--san", "email:a@b@c.com"], GOOD, INVALID),
    "--validity 99999y": Case(["--validity", "99999y"], GOOD, USAGE),
    "--validity over 100y": Case(["--validity", "101y"], GOOD, USAGE),
    # issue 7 item 13: newlines, controls and too-wide wildcards
    "--san DNS ending in a newline": Case(["--profile", "server", "--san", "DNS:a.example\n"], GOOD, POLICY),
    "--san email ending in a newline": Case(["--san", "email:ops@example.com\n"], GOOD, POLICY),
    "CSR DNS SAN ending in a newline": Case(
        ["--profile", "server"], _forged(_san(forge.gn_dns(b"a.example\n"))), POLICY
    ),
    "CSR email SAN ending in a newline": Case([], _forged(_san(forge.gn_email(b"ops@example.com\n"))), POLICY),
    "wildcard under a TLD": Case(["--profile", "server", "--san", "DNS:*.com"], GOOD, POLICY),
    "wildcard under a registry suffix": Case(["--profile", "server", "--san", "DNS:*.co.uk"], GOOD, POLICY),
    "--path-length beyond any encoding": Case(["--profile", "sub-ca", "--path-length", str(2**64)], GOOD, USAGE),
    "IP address as a DNS SAN": Case(["--profile", "server", "--san", "DNS:10.0.0.1"], GOOD, POLICY),
    "CSR wildcard under a TLD": Case(["--profile", "server"], _forged(_san(forge.gn_dns(b"*.com"))), POLICY),
    "bidi override in CN": Case(
        ["--profile", "server", "--san", "DNS:a.example"], _raw_subject_csr((CN, "moc.\u202eexample")), INVALID
    ),
    "C1 control (NEL) in O": Case([], _raw_subject_csr((CN, "device-1"), (ORG, "Contoso\u0085Inc")), INVALID),
    "bidi isolate in --subject": Case(["--subject", "CN=device-1,O=a\u2066b"], GOOD, INVALID),
}


@pytest.fixture
def ready(kvpki: Kvpki) -> Kvpki:
    kvpki.init_ca("root", "--subject", "CN=Hostile Root")
    kvpki.init_ca("issuing", "--parent", "root", "--subject", "CN=Hostile Issuing", "--path-length", "0")
    return kvpki


def _assert_one_line_error(result, code: int, label: str) -> None:
    assert result.returncode == code, f"{label}: exit {result.returncode}, stderr {result.stderr!r}"
    assert result.stdout == b"", f"{label}: stdout not empty"
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvpki: error: "), f"{label}: stderr {result.stderr!r}"
    assert "Traceback" not in result.stderr.decode()


def test_hostile_csr_corpus(ready: Kvpki, tmp_path: Path) -> None:
    assert len(CASES) >= 25
    before = ready.inventory("issuing")
    for label, case in CASES.items():
        stdin = case.stdin(tmp_path) if callable(case.stdin) else case.stdin
        args = ["sign-csr", *case.args] if "--ca" in case.args else ["sign-csr", "--ca", "issuing", *case.args]
        result = ready.run(*args, input=stdin if stdin is not None else b"")
        _assert_one_line_error(result, case.code, label)
    assert ready.inventory("issuing") == before == []
    assert ready.inventory("root") != []  # the sub-CA row only


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["revoke", "0123abcd", "--ca", "issuing"], NOT_FOUND),
        (["revoke", "xyz", "--ca", "issuing"], INVALID),
        (["revoke", "--ca", "issuing"], USAGE),
        (["revoke", "01", "--ca", "issuing", "--reason", "bored"], USAGE),
        (["revoke", "--cert", "/nonexistent.pem", "--ca", "issuing"], INVALID),
        (["get-ca", "--ca", "ghost"], NOT_FOUND),
        (["get-ca", "--ca", "../etc"], USAGE),
        (["crl", "--ca", "issuing", "--next-update", "soon"], USAGE),
        (["crl", "--ca", "issuing", "--next-update", "99999y"], USAGE),
        (["list", "--ca", "issuing", "--status", "weird"], USAGE),
        (["init-ca", "--name", "root", "--subject", "CN=Again"], EXISTS),
        (["init-ca", "--name", "bad/name", "--subject", "CN=x"], USAGE),
        (["init-ca", "--name", "x1", "--subject", "garbage"], INVALID),
        (["init-ca", "--name", "x2", "--subject", "CN=x", "--parent", "ghost"], NOT_FOUND),
        (["init-ca", "--name", "x3", "--subject", "CN=x", "--parent", "issuing"], POLICY),
        (["init-ca", "--name", "x4", "--subject", "CN=x", "--key-type", "dsa-1024"], USAGE),
        (["init-ca", "--name", "x6", "--subject", "CN=x", "--path-length", "99999999999999999999999"], USAGE),
    ],
)
def test_hostile_arguments(ready: Kvpki, args: list[str], code: int) -> None:
    before = ready.inventory("issuing"), ready.inventory("root")
    _assert_one_line_error(ready.run(*args), code, " ".join(args))
    assert (ready.inventory("issuing"), ready.inventory("root")) == before
    assert not (ready.home / "cas" / "x3").exists() and not (ready.home / "cas" / "x2").exists()


def test_revoke_certificate_from_another_ca(ready: Kvpki, tmp_path: Path) -> None:
    ready.init_ca("other", "--subject", "CN=Other Root")
    foreign = ready.ok("sign-csr", "--ca", "other", input=GOOD)
    path = tmp_path / "foreign.pem"
    path.write_bytes(foreign)
    _assert_one_line_error(ready.run("revoke", "--cert", str(path), "--ca", "issuing"), INVALID, "foreign cert")
    assert ready.inventory("other")[0]["status"] == "valid"


def test_durations_beyond_100_years_are_usage_errors(ready: Kvpki) -> None:
    """Each of these overflowed datetime (exit 1) before durations were bounded."""
    before = ready.inventory("issuing")
    for args in (
        ["crl", "--ca", "issuing", "--next-update", "99999y"],
        ["init-ca", "--name", "x5", "--subject", "CN=x", "--validity", "99999y"],
        ["sign-csr", "--ca", "issuing", "--validity", "999999w"],
    ):
        _assert_one_line_error(ready.run(*args, input=GOOD), USAGE, " ".join(args))
    env = {**ready.env, "KVPKI_BACKDATE": "999999y"}
    result = subprocess.run(
        [*KVPKI, "sign-csr", "--ca", "issuing"], input=GOOD, capture_output=True, env=env, timeout=60
    )
    _assert_one_line_error(result, USAGE, "KVPKI_BACKDATE=999999y")
    assert b"KVPKI_BACKDATE" in result.stderr or b"backdate" in result.stderr
    assert ready.inventory("issuing") == before == []
    assert not (ready.home / "cas" / "x5").exists()


def test_pem_with_text_before_the_block_is_accepted(ready: Kvpki, tmp_path: Path) -> None:
    """What `openssl pkcs7 -print_certs` and `openssl req -text` write: text, then the PEM block (issue 7 item 17)."""
    p7 = write(tmp_path / "issued.p7b", ready.ok("sign-csr", "--ca", "issuing", "--format", "pkcs7", input=GOOD))
    printed = openssl("pkcs7", "-print_certs", "-in", str(p7)).stdout
    assert printed.startswith(b"subject=") and b"\nissuer=" in printed
    cert_file = write(tmp_path / "issued.pem", printed)
    serial = format(x509.load_pem_x509_certificate(printed.split(b"\n", 2)[2]).serial_number, "x")

    csr_file = write(tmp_path / "with-text.csr", GOOD)
    csr_text = openssl("req", "-in", str(csr_file), "-text").stdout
    assert csr_text.startswith(b"Certificate Request:")
    write(csr_file, csr_text)
    renewed = ready.ok("renew", str(cert_file), str(csr_file), "--ca", "issuing")
    assert (
        x509.load_pem_x509_certificate(renewed).subject
        == x509.load_pem_x509_certificate(printed[printed.index(b"-----BEGIN") :]).subject
    )
    assert ready.ok("sign-csr", "--ca", "issuing", str(csr_file)).startswith(b"-----BEGIN CERTIFICATE-----")

    ready.ok("revoke", "--cert", str(cert_file), "--ca", "issuing")
    assert {row["serial"]: row["status"] for row in ready.inventory("issuing")}[serial] == "revoked"
    # Text around something that is not a certificate is still refused, in one line.
    write(tmp_path / "key.txt", b"note\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    _assert_one_line_error(ready.run("revoke", "--cert", str(tmp_path / "key.txt"), "--ca", "issuing"), INVALID, "key")


# pkilint's PKIX linter calls every wildcard an invalid domain name (only its CA/B Forum linter knows them),
# so the wildcards kvpki still allows (*.example.com, *.example.co.uk) are checked by the refusal cases above.
EDGE_SANS = ("DNS:a.example.com", "DNS:xn--bcher-kva.de", "DNS:a-1.b2.example", "email:ops.team+iot@example.com")


def test_what_is_issued_at_the_edges_lints_clean(ready: Kvpki, tmp_path: Path) -> None:
    """pkilint (the outside check that flagged "a.example\\n" as invalid_domain_name_syntax) finds
    nothing in the certificates issued for names next to the refused ones."""
    args = [arg for san in EDGE_SANS for arg in ("--san", san)]
    server = ready.ok("sign-csr", "--ca", "issuing", "--profile", "server", *args, input=GOOD)
    assert pkilint_findings(write(tmp_path / "server.pem", server)) == ""
    device = ready.ok("sign-csr", "--ca", "issuing", "--subject", "CN=device-1,O=Zürich AG", input=GOOD)
    assert pkilint_findings(write(tmp_path / "device.pem", device)) == ""
    wildcards = ("--san", "DNS:*.example.com", "--san", "DNS:*.example.co.uk")
    wide = x509.load_pem_x509_certificate(
        ready.ok("sign-csr", "--ca", "issuing", "--profile", "server", *wildcards, input=GOOD)
    )
    assert wide.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["*.example.com", "*.example.co.uk"]


def test_requester_is_recorded_escaped(ready: Kvpki) -> None:
    """--requester and KVPKI_REQUESTER reach the inventory through the same escaping as EST's requesters."""
    ready.ok("sign-csr", "--ca", "issuing", "--requester", "ops\nkvpki: forged\x1b[2J\u202e", input=GOOD)
    (row,) = ready.inventory("issuing")
    assert row["requester"] == "ops\\x0akvpki: forged\\x1b[2J\\u202e"
