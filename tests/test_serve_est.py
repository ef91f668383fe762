"""EST interop against a live `kvpki serve`: strongSwan `pki`, and curl + openssl acting like IoT Edge."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests import servekit
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

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def is_ca(cert: x509.Certificate) -> bool:
    return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)


def write_pem(path: Path, certs: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in certs))
    return path


def test_cacerts_wire_format_is_what_clients_accept(est_server: EstServer) -> None:
    context = ssl.create_default_context(cafile=str(est_server.root_pem))
    with (
        socket.create_connection(("127.0.0.1", est_server.port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Content-Type: application/pkcs7-mime; smime-type=certs-only" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert not any(line.lower().startswith("transfer-encoding") for line in lines)
    assert b"\n" not in body and b"\r" not in body  # strongSwan 5.9.8 fails on line breaks
    certs = pkcs7_certificates(body)
    assert {c.subject.rfc4514_string() for c in certs} == {"CN=Test Issuing CA,O=kvpki", "CN=Test Root,O=kvpki"}
    assert all(is_ca(c) for c in certs)  # the issuing chain, never a leaf


def test_strongswan_estca_est_and_reenroll(est_server: EstServer, tmp_path: Path) -> None:
    if shutil.which("pki") is None:
        pytest.skip("strongSwan pki is not installed")
    url, root = est_server.url, str(est_server.root_pem)

    def pki(*args: str) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(["pki", *args], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        return result

    pki("--estca", "--url", url, "--cacert", root, "--caout", str(tmp_path / "est-ca.pem"), "--outform", "pem")
    fetched_root = x509.load_pem_x509_certificate((tmp_path / "est-ca.pem").read_bytes())
    fetched_sub = x509.load_pem_x509_certificate((tmp_path / "est-ca-1.pem").read_bytes())
    assert fetched_root.subject.rfc4514_string() == "CN=Test Root,O=kvpki"
    assert fetched_sub.subject.rfc4514_string() == "CN=Test Issuing CA,O=kvpki"

    key, csr = make_key_csr(tmp_path, "ss", "/CN=strongswan-dev-1")
    (tmp_path / "ss.der").write_bytes(csr)
    out = pki("--est", "--url", url, "--in", str(tmp_path / "ss.der"), "--cacert", root,
              "--userpass", "alice:alice-secret-1", "--outform", "pem")  # fmt: skip
    (tmp_path / "ss.pem").write_bytes(out.stdout)
    first = x509.load_pem_x509_certificate(out.stdout)
    assert first.subject.rfc4514_string() == "CN=strongswan-dev-1"
    assert b"certificate status is good" in out.stderr  # strongSwan checked our server certificate via our OCSP
    openssl("verify", "-CAfile", root, "-untrusted", str(tmp_path / "est-ca-1.pem"), str(tmp_path / "ss.pem"))

    _, renew_csr = make_key_csr(tmp_path, "ss2", "/CN=strongswan-dev-1")
    (tmp_path / "ss2.der").write_bytes(renew_csr)
    out = pki("--est", "--url", url, "--in", str(tmp_path / "ss2.der"), "--cacert", root,
              "--cacert", str(tmp_path / "est-ca-1.pem"), "--cert", str(tmp_path / "ss.pem"), "--key", str(key),
              "--outform", "pem")  # fmt: skip
    renewed = x509.load_pem_x509_certificate(out.stdout)
    assert renewed.subject == first.subject and renewed.serial_number != first.serial_number
    assert renewed.public_key() != first.public_key()
    rows = {row["serial"]: row for row in est_server.inventory()}
    assert rows[format(first.serial_number, "x")]["requester"] == "est-basic:alice"
    assert rows[format(renewed.serial_number, "x")]["requester"] == "est-cert:CN=strongswan-dev-1"
    assert "issued simplereenroll label=default" in est_server.log()


def edge_enroll(
    server: EstServer, label: str, csr_der: bytes, user: str | None, cert: Path | None = None, key: Path | None = None
) -> tuple[int, list[x509.Certificate], list[x509.Certificate]]:
    """IoT Edge's sequence: cacerts and simpleenroll concurrently, Basic up front, wrapped base64."""
    prefix = f"/.well-known/est/{label}/" if label != "default" else "/.well-known/est/"
    body_path = server.home / "curl" / f"edge-{label}-{id(csr_der)}.b64"
    body_path.parent.mkdir(exist_ok=True)
    body_path.write_bytes(est_body(csr_der))
    common = ["curl", "-sS", "--cacert", str(server.root_pem), "--max-time", "30"]
    auth = ["-u", f"{user}:{dict(alice='alice-secret-1', edge='edge-secret-22').get(user, 'x')}"] if user else []
    tls = ["--cert", str(cert), "--key", str(key)] if cert and key else []
    enroll_out, ca_out = body_path.with_suffix(".p7"), body_path.with_suffix(".ca")
    enroll = subprocess.Popen(
        [*common, *auth, *tls, "-o", str(enroll_out), "-w", "%{http_code}",
         *[arg for header in EDGE_HEADERS for arg in ("-H", header)],
         "--data-binary", f"@{body_path}", server.url + prefix + "simpleenroll"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    cacerts = subprocess.Popen([*common, "-o", str(ca_out), "-w", "%{http_code}", server.url + prefix + "cacerts"],
                               stdout=subprocess.PIPE)  # fmt: skip
    enroll_status, _ = enroll.communicate(timeout=60)
    ca_status, _ = cacerts.communicate(timeout=60)
    assert ca_status == b"200"
    issued = pkcs7_certificates(enroll_out.read_bytes()) if enroll_status == b"200" else []
    return int(enroll_status), issued, pkcs7_certificates(ca_out.read_bytes())


def verify_edge_chain(
    server: EstServer, directory: Path, leaf: x509.Certificate, cacerts: list[x509.Certificate]
) -> None:
    """Store the chain as IoT Edge does (enroll result + cacerts) and check it with openssl verify."""
    chain = write_pem(directory / "chain.pem", [leaf, *cacerts])
    leaf_path = write_pem(directory / "leaf.pem", [leaf])
    result = openssl("verify", "-CAfile", str(server.root_pem), "-untrusted", str(chain), str(leaf_path))
    assert result.stdout.strip().endswith(b": OK")


def test_edge_like_device_enrollment_edge_ca_and_renewal(est_server: EstServer, tmp_path: Path) -> None:
    before = len(est_server.inventory())
    # Device identity: RSA-2048 CSR without extensions, Basic credentials.
    device_key, device_csr = make_key_csr(tmp_path, "device", "/CN=edge-device-1", rsa=True)
    status, issued, cacerts = edge_enroll(est_server, "default", device_csr, "edge")
    assert status == 200 and len(issued) == 1 and not is_ca(issued[0])
    assert all(is_ca(c) for c in cacerts)
    device_cert = issued[0]
    verify_edge_chain(est_server, tmp_path, device_cert, cacerts)

    # Edge CA on its label: CA:TRUE pathlen:0 with keyCertSign.
    edge_ca_ext = ("-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                   "-addext", "keyUsage=critical,digitalSignature,keyCertSign")  # fmt: skip
    _, edge_csr = make_key_csr(tmp_path, "edgeca", "/CN=edge-device-1 Edge CA", *edge_ca_ext)
    status, issued, cacerts = edge_enroll(est_server, "edge-ca", edge_csr, "edge")
    assert status == 200 and len(issued) == 1
    constraints = issued[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    verify_edge_chain(est_server, tmp_path, issued[0], cacerts)

    # The same CSR on the device label, or by a user not allowed on edge-ca, is refused.
    assert edge_enroll(est_server, "default", edge_csr, "edge")[0] == 403
    assert edge_enroll(est_server, "edge-ca", edge_csr, "alice")[0] == 403

    # Renewal: new key, same subject, authenticated only by the previous certificate.
    device_pem = write_pem(tmp_path / "device.pem", [device_cert])
    _, renew_csr = make_key_csr(tmp_path, "device2", "/CN=edge-device-1", rsa=True)
    status, issued, cacerts = edge_enroll(est_server, "default", renew_csr, None, device_pem, device_key)
    assert status == 200 and issued[0].subject == device_cert.subject
    assert issued[0].public_key() != device_cert.public_key()
    verify_edge_chain(est_server, tmp_path, issued[0], cacerts)

    rows = est_server.inventory()
    assert len(rows) == before + 3
    by_serial = {row["serial"]: row for row in rows}
    assert by_serial[format(issued[0].serial_number, "x")]["requester"] == "est-cert:CN=edge-device-1"
    assert by_serial[format(device_cert.serial_number, "x")]["requester"] == "est-basic:edge"


def test_bootstrap_certificate_enrolls_on_its_label_only(est_server: EstServer, tmp_path: Path) -> None:
    key, csr = make_key_csr(tmp_path, "boot", "/CN=boot-device-7")
    (tmp_path / "boot.der").write_bytes(csr)
    bootstrap_cert = est_server.kvpki("sign-csr", str(tmp_path / "boot.der"), "--ca", "bootstrap").stdout
    (tmp_path / "boot.pem").write_bytes(bootstrap_cert)
    _, est_csr = make_key_csr(tmp_path, "estid", "/CN=boot-device-7")
    status, issued, _ = edge_enroll(est_server, "default", est_csr, None, tmp_path / "boot.pem", key)
    assert status == 200
    row = next(r for r in est_server.inventory() if r["serial"] == format(issued[0].serial_number, "x"))
    assert row["requester"] == "est-cert:CN=boot-device-7"
    assert edge_enroll(est_server, "other", est_csr, None, tmp_path / "boot.pem", key)[0] == 403


def test_issued_certificates_carry_revocation_urls(est_server: EstServer, tmp_path: Path) -> None:
    _, csr = make_key_csr(tmp_path, "urls", "/CN=url-device")
    result = curl(est_server, "/.well-known/est/simpleenroll", data=est_body(csr), user="alice", headers=EDGE_HEADERS)
    assert result.status == 200
    (cert,) = pkcs7_certificates(result.body)
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert points[0].full_name[0].value == f"{est_server.http_url}/crl/issuing.crl"
    aia = {d.access_method._name: d.access_location.value
           for d in cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value}  # fmt: skip
    base = est_server.http_url
    assert aia == {"OCSP": f"{base}/ocsp/issuing", "caIssuers": f"{base}/ca/issuing.crt"}
    served = curl(est_server, "/ca/issuing.crt")
    assert served.headers["content-type"] == "application/pkix-cert"
    assert x509.load_der_x509_certificate(served.body).subject.rfc4514_string() == "CN=Test Issuing CA,O=kvpki"
