"""CRL and OCSP publishing checked with openssl, with revocations made by the CLI in another process."""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvpki_cli.serve.ocsp import Delegate, build_response
from tests import servekit
from tests.helpers import pkilint_findings
from tests.servekit import (
    EDGE_HEADERS,
    EstServer,
    curl,
    est_body,
    make_key_csr,
    openssl,
    pkcs7_certificates,
)

est_server = servekit.est_server  # the module-scoped live server fixture


def enroll(server: EstServer, directory: Path, cn: str) -> Path:
    _, csr = make_key_csr(directory, cn, f"/CN={cn}")
    result = curl(server, "/.well-known/est/simpleenroll", data=est_body(csr), user="alice", headers=EDGE_HEADERS)
    assert result.status == 200
    (cert,) = pkcs7_certificates(result.body)
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def issuing_pem(server: EstServer, directory: Path) -> Path:
    with urllib.request.urlopen(f"{server.http_url}/ca/issuing.crt", timeout=10) as response:
        der = response.read()
    path = directory / "issuing.pem"
    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    return path


def ocsp_check(server: EstServer, issuer: Path, cert: Path) -> str:
    response = cert.with_suffix(".ocsp.der")
    result = openssl("ocsp", "-issuer", str(issuer), "-cert", str(cert), "-url", f"{server.http_url}/ocsp/issuing",
                     "-CAfile", str(server.root_pem), "-verify_other", str(issuer),
                     "-respout", str(response))  # fmt: skip
    assert b"Response verify OK" in result.stderr + result.stdout
    assert b"WARNING" not in result.stderr + result.stdout  # e.g. "no nonce in response"
    assert pkilint_findings(response, "ocsp") == ""
    return result.stdout.decode()


def fetch_crl(server: EstServer, directory: Path, issuer: Path) -> tuple[str, x509.CertificateRevocationList]:
    with urllib.request.urlopen(f"{server.http_url}/crl/issuing.crl", timeout=10) as response:
        assert response.headers["Content-Type"] == "application/pkix-crl"
        der = response.read()
    path = directory / "issuing.crl"
    path.write_bytes(der)
    result = openssl("crl", "-inform", "DER", "-in", str(path), "-CAfile", str(issuer), "-verify", "-noout", "-text")
    assert b"verify OK" in result.stderr + result.stdout
    assert pkilint_findings(path, "crl") == ""
    return result.stdout.decode(), x509.load_der_x509_crl(der)


def test_ocsp_and_crl_follow_cli_revocation(est_server: EstServer, tmp_path: Path) -> None:
    issuer = issuing_pem(est_server, tmp_path)
    cert_path = enroll(est_server, tmp_path, "revoke-me")
    serial = format(x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number, "x")

    assert f"{cert_path}: good" in ocsp_check(est_server, issuer, cert_path)
    _, crl_before = fetch_crl(est_server, tmp_path, issuer)
    _, crl_again = fetch_crl(est_server, tmp_path, issuer)
    number = crl_before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert crl_again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number  # cached

    est_server.kvpki("revoke", serial, "--ca", "issuing", "--reason", "keyCompromise")

    status = ocsp_check(est_server, issuer, cert_path)
    assert f"{cert_path}: revoked" in status and "Reason: keyCompromise" in status
    text, crl_after = fetch_crl(est_server, tmp_path, issuer)
    assert crl_after.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert serial.upper() in text.replace(":", "")
    assert crl_after.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def test_ocsp_unknown_serial_and_get_form(est_server: EstServer, tmp_path: Path) -> None:
    issuer_path = issuing_pem(est_server, tmp_path)
    out = openssl("ocsp", "-issuer", str(issuer_path), "-serial", "0x1234567", "-url",
                  f"{est_server.http_url}/ocsp/issuing", "-CAfile", str(est_server.root_pem),
                  "-verify_other", str(issuer_path))  # fmt: skip
    assert "0x1234567: unknown" in out.stdout.decode()

    cert = x509.load_pem_x509_certificate(enroll(est_server, tmp_path, "get-form").read_bytes())
    issuer = x509.load_pem_x509_certificate(issuer_path.read_bytes())
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA256())
        .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
        .build()
    )
    encoded = urllib.parse.quote(base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode(), safe="")
    with urllib.request.urlopen(f"{est_server.http_url}/ocsp/issuing/{encoded}", timeout=10) as response:
        assert response.headers["Content-Type"] == "application/ocsp-response"
        answer = ocsp.load_der_ocsp_response(response.read())
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answer.serial_number == cert.serial_number
    assert answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"0123456789abcdef"
    assert answer.next_update_utc is not None and answer.next_update_utc > answer.this_update_utc
    issuer.public_key().verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]


def test_ocsp_for_another_issuer_is_unauthorized(est_server: EstServer, tmp_path: Path) -> None:
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(b"\1" * 20, b"\0" * 20, 5, hashes.SHA1()).build()
    result = curl(est_server, "/ocsp/issuing", data=request.public_bytes(serialization.Encoding.DER),
                  headers=("Content-Type: application/ocsp-request",))  # fmt: skip
    assert result.status == 200
    assert ocsp.load_der_ocsp_response(result.body).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    garbage = curl(
        est_server, "/ocsp/issuing", data=b"\x30\x03garbage", headers=("Content-Type: application/ocsp-request",)
    )
    assert ocsp.load_der_ocsp_response(garbage.body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert (
        curl(est_server, "/ocsp/nosuchca", data=b"x", headers=("Content-Type: application/ocsp-request",)).status == 404
    )
    assert curl(est_server, "/crl/nosuchca.crl").status == 404


def test_delegated_ocsp_signer(est_server: EstServer, tmp_path: Path) -> None:
    """A delegated responder certificate signs and is included in the response (in-process)."""
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings

    ca = CertificateAuthority.open(Settings.load(est_server.home), "issuing")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    delegate_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OCSP responder")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .sign(ca.keystore.signer(), hashes.SHA256())
    )
    cert = x509.load_pem_x509_certificate(enroll(est_server, tmp_path, "delegated").read_bytes())
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, ca.certificate, hashes.SHA1()).build()
    der = build_response(ca, request.public_bytes(serialization.Encoding.DER), Delegate(delegate_cert, key),
                         timedelta(hours=1))  # fmt: skip
    answer = ocsp.load_der_ocsp_response(der)
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answer.certificates == [delegate_cert]
    key.public_key().verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
