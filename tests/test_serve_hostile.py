"""Hostile HTTP input: the right status, a plain-text reason, no certificate and no inventory row."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

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
