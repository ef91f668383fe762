"""Hostile HTTP input: the right status, a plain-text reason, no certificate and no inventory row."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, load_pem_private_key
from cryptography.x509.oid import NameOID

from kvpki_cli.textsafe import first_unsafe
from tests import csrforge as forge
from tests import servekit
from tests.servekit import (
    EDGE_HEADERS,
    EstServer,
    HttpResult,
    curl,
    est_body,
    make_key_csr,
    openssl,
    pkcs7_certificates,
)

est_server = servekit.est_server  # the module-scoped live server fixture

ENROLL = "/.well-known/est/simpleenroll"
REENROLL = "/.well-known/est/simplereenroll"


def refused(result: HttpResult, status: int) -> None:
    assert result.status == status, (result.status, result.body)
    assert result.headers.get("content-type", "").startswith("text/plain")
    assert b"BEGIN" not in result.body and not result.body.startswith(b"MII")


def test_hostile_requests_issue_nothing(est_server: EstServer, tmp_path: Path) -> None:
    rows_before = est_server.inventory()
    _, csr = make_key_csr(tmp_path, "good", "/CN=hostile-target")
    body = est_body(csr)

    refused(curl(est_server, ENROLL, data=body, user="alice", headers=("Content-Type: text/plain",)), 415)
    refused(curl(est_server, ENROLL, data=b"!!!not base64!!!", user="alice", headers=EDGE_HEADERS), 400)
    tampered = bytearray(csr)
    tampered[-5] ^= 0x55  # inside the signature: proof of possession fails
    result = curl(est_server, ENROLL, data=est_body(bytes(tampered)), user="alice", headers=EDGE_HEADERS)
    refused(result, 400)
    assert b"signature" in result.body
    big = tmp_path / "big"
    big.write_bytes(b"A" * (10 * 1024 * 1024))
    refused(curl(est_server, ENROLL, data=big.read_bytes(), user="alice", headers=EDGE_HEADERS), 413)

    missing = curl(est_server, ENROLL, data=body, headers=EDGE_HEADERS)
    refused(missing, 401)
    assert missing.headers["www-authenticate"] == 'Basic realm="kvpki test"'
    assert "WWW-Authenticate: Basic" in missing.raw_headers  # conventional casing, libest compares exactly
    refused(curl(est_server, ENROLL, data=body, user="intruder", headers=EDGE_HEADERS), 401)  # unknown user
    wrong = curl(est_server, ENROLL, data=body, headers=(*EDGE_HEADERS, "Authorization: Basic " +
                 base64.b64encode(b"alice:not-her-password").decode()))  # fmt: skip
    refused(wrong, 401)
    refused(curl(est_server, ENROLL, data=body, user="mallory", headers=EDGE_HEADERS), 403)  # not on this label
    refused(curl(est_server, "/.well-known/est/nosuchlabel/simpleenroll", data=body, user="alice",
                 headers=EDGE_HEADERS), 404)  # fmt: skip
    refused(curl(est_server, "/.well-known/est/serverkeygen", data=body, user="alice", headers=EDGE_HEADERS), 404)
    refused(curl(est_server, ENROLL, user="alice", method="GET"), 405)
    bad_cn = make_key_csr(tmp_path, "badcn", "/CN=bad cn with spaces")[1]
    refused(curl(est_server, ENROLL, data=est_body(bad_cn), user="alice", headers=EDGE_HEADERS), 403)

    # Client certificate from a CA nobody trusts: the TLS layer rejects it, nothing is issued.
    rogue_key, rogue_pem = str(tmp_path / "rogue.key"), str(tmp_path / "rogue.pem")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-keyout", rogue_key, "-out", rogue_pem, "-subj", "/CN=hostile-target")  # fmt: skip
    rogue = curl(est_server, ENROLL, data=body, headers=EDGE_HEADERS, cert=tmp_path / "rogue.pem",
                 key=tmp_path / "rogue.key")  # fmt: skip
    assert rogue.curl_rc != 0 and rogue.status == 0  # handshake refused: no HTTP response at all

    assert est_server.inventory() == rows_before
    log = est_server.log()
    assert "refused 415" in log and "refused 401" in log and "refused 403" in log
    assert "alice-secret-1" not in log and "not-her-password" not in log


def test_renewal_cannot_change_names_or_outlive_revocation(est_server: EstServer, tmp_path: Path) -> None:
    key, csr = make_key_csr(tmp_path, "renew", "/CN=renew-me", "-addext", "subjectAltName=DNS:renew-me.example")
    result = curl(est_server, ENROLL, data=est_body(csr), user="alice", headers=EDGE_HEADERS)
    assert result.status == 200
    (cert,) = pkcs7_certificates(result.body)
    cert_path = tmp_path / "renew.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    rows_before = est_server.inventory()

    _, other_subject = make_key_csr(
        tmp_path, "o1", "/CN=someone-else", "-addext", "subjectAltName=DNS:renew-me.example"
    )
    _, other_san = make_key_csr(tmp_path, "o2", "/CN=renew-me", "-addext", "subjectAltName=DNS:evil.example")
    for path in (REENROLL, ENROLL):  # simplereenroll, and IoT Edge's renewal via simpleenroll
        for bad in (other_subject, other_san):
            refused(curl(est_server, path, data=est_body(bad), headers=EDGE_HEADERS, cert=cert_path, key=key), 403)
    # Re-enroll with Basic credentials only is not a renewal.
    refused(curl(est_server, REENROLL, data=est_body(csr), user="alice", headers=EDGE_HEADERS), 403)
    # A device certificate cannot be renewed into a CA on the edge-ca label.
    ca_ext = (
        "-addext",
        "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext",
        "subjectAltName=DNS:renew-me.example",
    )
    _, as_ca = make_key_csr(tmp_path, "asca", "/CN=renew-me", *ca_ext)
    refused(curl(est_server, "/.well-known/est/edge-ca/simpleenroll", data=est_body(as_ca), headers=EDGE_HEADERS,
                 cert=cert_path, key=key), 403)  # fmt: skip
    assert est_server.inventory() == rows_before

    _, same = make_key_csr(tmp_path, "same", "/CN=renew-me", "-addext", "subjectAltName=DNS:renew-me.example")
    assert curl(est_server, REENROLL, data=est_body(same), headers=EDGE_HEADERS, cert=cert_path, key=key).status == 200
    est_server.kvpki("revoke", format(cert.serial_number, "x"), "--ca", "issuing")
    refused(curl(est_server, REENROLL, data=est_body(same), headers=EDGE_HEADERS, cert=cert_path, key=key), 403)
    assert len(est_server.inventory()) == len(rows_before) + 1
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number == cert.serial_number


def test_hostile_csrs_are_refused_with_4xx_not_500(est_server: EstServer) -> None:
    """Issue 7 items 12/13 over EST: each of these was a 500 with a traceback, or was issued."""
    key = ec.generate_private_key(ec.SECP256R1())
    device = forge.name((forge.OID_CN, forge.UTF8, b"hostile-csr"))

    def san(*names: bytes) -> bytes:
        return forge.extension(forge.OID_SAN, forge.san(*names))

    cases = {
        "duplicate SAN": (
            forge.csr(key, device, [san(forge.gn_dns(b"a.example")), san(forge.gn_dns(b"b.example"))]),
            400,
        ),
        "duplicate basicConstraints": (
            forge.csr(key, device, [forge.extension(forge.OID_BASIC_CONSTRAINTS, forge.basic_constraints(False))] * 2),
            400,
        ),
        "x400Address SAN": (forge.csr(key, device, [san(forge.gn_x400())]), 403),
        "EDIPartyName SAN": (forge.csr(key, device, [san(forge.gn_edi_party())]), 403),
        "DNS SAN ending in a newline": (forge.csr(key, device, [san(forge.gn_dns(b"hostile.example\n"))]), 403),
        "email SAN ending in a newline": (forge.csr(key, device, [san(forge.gn_email(b"a@hostile.example\n"))]), 403),
        "bidi override in CN": (forge.csr(key, forge.name((forge.OID_CN, forge.UTF8, "a\u202eb".encode()))), 400),
        "NEL in CN": (forge.csr(key, forge.name((forge.OID_CN, forge.UTF8, "a\u0085b".encode()))), 400),
    }
    rows_before = est_server.inventory()
    for label, (der, status) in cases.items():
        result = curl(est_server, ENROLL, data=est_body(der), user="alice", headers=EDGE_HEADERS)
        assert result.status == status, (label, result.status, result.body)
        refused(result, status)
    assert est_server.inventory() == rows_before
    assert "Traceback" not in est_server.log()


FORGED_LINE = "kvpki serve: issued simpleenroll serial=dead"  # fits in a 64-character CN


def _bootstrap_certificate(est_server: EstServer, tmp_path: Path, common_name: str) -> tuple[Path, Path]:
    """A client certificate from the trusted bootstrap CA (not a kvpki issuance, so kvpki's name rules never saw it)."""
    ca_key = load_pem_private_key((est_server.home / "cas" / "bootstrap" / "key.pem").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((est_server.home / "bootstrap.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = tmp_path / "boot.pem", tmp_path / "boot.key"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return cert_path, key_path


def test_client_certificate_subject_cannot_forge_log_lines_or_requester(est_server: EstServer, tmp_path: Path) -> None:
    """A bootstrap certificate whose CN holds a newline, a forged log line and an ESC sequence (issue 7 item 13)."""
    cert, key = _bootstrap_certificate(est_server, tmp_path, f"boot-1\n{FORGED_LINE}\x1b[2J\x85")
    _, csr = make_key_csr(tmp_path, "victim", "/CN=boot-victim")
    issued = curl(est_server, ENROLL, data=est_body(csr), headers=EDGE_HEADERS, cert=cert, key=key)
    assert issued.status == 200, issued.body
    _, bad = make_key_csr(tmp_path, "victim2", "/CN=bad cn with spaces")
    refused(curl(est_server, ENROLL, data=est_body(bad), headers=EDGE_HEADERS, cert=cert, key=key), 403)

    log = est_server.log()
    assert not any(line.startswith(FORGED_LINE) for line in log.splitlines())
    assert "\x1b" not in log and "\x85" not in log
    assert "CN=boot-1\\x0akvpki serve: issued" in log  # the subject is there, escaped, on the real line
    (row,) = [row for row in est_server.inventory() if row["subject"] == "CN=boot-victim"]
    requester = str(row["requester"])
    assert requester.startswith("est-cert:CN=boot-1\\x0akvpki serve: issued") and requester.endswith("\\x1b[2J\\x85")
    assert not any(c in requester for c in "\n\x1b\x85")


def test_server_log_escapes_messages_and_tracebacks() -> None:
    """Whatever a handler logs (fields, exception messages quoting a request) stays on its own lines."""
    import io
    import logging

    from kvpki_cli.serve.logsafe import server_log

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("kvpki serve: %(message)s"))
    log = server_log()
    log.addHandler(handler)
    try:
        log.warning("refused path=%s", f"/x\n{FORGED_LINE}\x1b[2J")
        try:
            raise ValueError(f"bad input\n{FORGED_LINE}\u202e")
        except ValueError:
            log.exception("internal error in %s", "POST /\r\nkvpki serve: x")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if line.startswith("kvpki serve:")] == [
        f"kvpki serve: refused path=/x\\x0a{FORGED_LINE}\\x1b[2J",
        "kvpki serve: internal error in POST /\\x0d\\x0akvpki serve: x",
    ]
    assert all(line.startswith("  ") for line in lines[2:])  # the traceback, indented: no forged line at column 0
    assert lines[-1] == f"  {FORGED_LINE}\\u202e"
    assert first_unsafe(stream.getvalue().replace("\n", "")) is None
