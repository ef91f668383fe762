"""Hostile input: every malformed or policy-violating CSR/argument gets its documented exit code,
exactly one stderr line, empty stdout, and no inventory row (on every key store)."""

from __future__ import annotations

import base64
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import Kvpki, openssl

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
        (["list", "--ca", "issuing", "--status", "weird"], USAGE),
        (["init-ca", "--name", "root", "--subject", "CN=Again"], EXISTS),
        (["init-ca", "--name", "bad/name", "--subject", "CN=x"], USAGE),
        (["init-ca", "--name", "x1", "--subject", "garbage"], INVALID),
        (["init-ca", "--name", "x2", "--subject", "CN=x", "--parent", "ghost"], NOT_FOUND),
        (["init-ca", "--name", "x3", "--subject", "CN=x", "--parent", "issuing"], POLICY),
        (["init-ca", "--name", "x4", "--subject", "CN=x", "--key-type", "dsa-1024"], USAGE),
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
