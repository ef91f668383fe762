"""A CA whose certificate, or any certificate above it that this installation issued, is revoked
stops issuing (exit 4 / HTTP 403) but keeps publishing its CRL and OCSP (issue 7, item 4)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests import servekit
from tests.conftest import Kvpki
from tests.helpers import openssl, write
from tests.servekit import EDGE_HEADERS, EstServer, curl, est_body, make_key_csr, pkcs7_certificates

est_server = servekit.est_server  # a server of this module's own: its issuing CA gets revoked


def refused(result, what: str) -> str:  # type: ignore[no-untyped-def]
    """Exit 4, nothing on stdout, one stderr line that says a CA certificate was revoked."""
    stderr = result.stderr.decode()
    assert (result.returncode, result.stdout) == (4, b""), (what, result.returncode, stderr)
    assert stderr.count("\n") == 1 and "revoked" in stderr and "Traceback" not in stderr, (what, stderr)
    return stderr


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "click"])
def test_revoked_sub_ca_refuses_issuance_and_renewal_but_publishes(
    local_kvpki: Kvpki, make_csr, tmp_path: Path, fast_path: bool
) -> None:
    kvpki = local_kvpki
    if not fast_path:
        kvpki.env["KVPKI_NO_FASTPATH"] = "1"
    root = write(tmp_path / "root.pem", kvpki.init_ca("root", "--subject", "CN=Root"))
    sub = write(tmp_path / "sub.pem", kvpki.init_ca("sub", "--parent", "root", "--subject", "CN=Sub"))
    leaf = write(tmp_path / "leaf.pem", kvpki.ok("sign-csr", "--ca", "sub", input=make_csr("/CN=dev-1").csr_pem))
    before = kvpki.inventory("sub")

    kvpki.ok("revoke", "--cert", str(sub), "--ca", "root", "--reason", "cACompromise")

    message = refused(kvpki.run("sign-csr", "--ca", "sub", input=make_csr("/CN=dev-2").csr_pem), "sign-csr")
    assert "'sub'" in message and "cACompromise" in message
    refused(kvpki.run("renew", str(leaf), "--ca", "sub", input=make_csr("/CN=dev-1").csr_pem), "renew")
    csr_file = write(tmp_path / "batch.csr", make_csr("/CN=dev-3").csr_pem)
    refused(kvpki.run("sign-csr", "--ca", "sub", "--out-dir", str(tmp_path / "out"), str(csr_file)), "batch")
    refused(kvpki.run("init-ca", "--name", "below", "--parent", "sub", "--subject", "CN=Below"), "init-ca")
    assert not (kvpki.home / "cas" / "below").exists()
    assert kvpki.inventory("sub") == before  # nothing was recorded

    # Its CRL still works (and lists what it revokes); the root keeps issuing.
    kvpki.ok("revoke", "--cert", str(leaf), "--ca", "sub", "--reason", "keyCompromise")
    crl = write(tmp_path / "sub.crl", kvpki.ok("crl", "--ca", "sub"))
    checked = openssl("crl", "-in", str(crl), "-CAfile", str(sub), "-verify", "-noout", "-text")
    assert b"verify OK" in checked.stderr + checked.stdout and b"Key Compromise" in checked.stdout
    leaf_of_root = write(tmp_path / "r.pem", kvpki.ok("sign-csr", "--ca", "root", input=make_csr("/CN=dev-4").csr_pem))
    assert openssl("verify", "-CAfile", str(root), str(leaf_of_root)).returncode == 0


def test_revoked_intermediate_stops_every_ca_below_it(local_kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=Root")
    mid = write(tmp_path / "mid.pem", kvpki.init_ca("mid", "--parent", "root", "--subject", "CN=Mid"))
    kvpki.init_ca("issuing", "--parent", "mid", "--subject", "CN=Issuing")
    kvpki.init_ca("sibling", "--parent", "root", "--subject", "CN=Sibling")
    kvpki.ok("sign-csr", "--ca", "issuing", input=make_csr("/CN=ok-before").csr_pem)

    kvpki.ok("revoke", "--cert", str(mid), "--ca", "root", "--reason", "cACompromise")

    message = refused(kvpki.run("sign-csr", "--ca", "issuing", input=make_csr("/CN=dev").csr_pem), "below")
    assert "'mid'" in message  # names the CA whose certificate was revoked
    refused(kvpki.run("sign-csr", "--ca", "mid", input=make_csr("/CN=dev").csr_pem), "mid")
    kvpki.ok("sign-csr", "--ca", "sibling", input=make_csr("/CN=dev").csr_pem)  # only that branch stops
    kvpki.ok("crl", "--ca", "issuing")
    kvpki.ok("crl", "--ca", "mid")


def test_superseded_ca_certificate_also_stops_issuance(local_kvpki: Kvpki, make_csr, tmp_path: Path) -> None:
    """Any revocation of the certificate the CA signs with counts, whatever the reason."""
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=Root")
    sub = write(tmp_path / "sub.pem", kvpki.init_ca("sub", "--parent", "root", "--subject", "CN=Sub"))
    kvpki.ok("revoke", "--cert", str(sub), "--ca", "root", "--reason", "superseded")
    refused(kvpki.run("sign-csr", "--ca", "sub", input=make_csr("/CN=dev").csr_pem), "superseded")


def _enroll(server: EstServer, directory: Path, cn: str) -> tuple[int, bytes, Path]:
    _, csr = make_key_csr(directory, cn, f"/CN={cn}")
    result = curl(server, "/.well-known/est/simpleenroll", data=est_body(csr), user="alice", headers=EDGE_HEADERS)
    path = directory / f"{cn}.pem"
    if result.status == 200:
        (cert,) = pkcs7_certificates(result.body)
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return result.status, result.body, path


def test_identity_certificates_of_a_revoked_ca_authorize_nothing(est_server: EstServer, tmp_path: Path) -> None:
    """IoT Edge enrolls with an EST identity certificate; once the identity CA is revoked, that is a 403."""
    from tests import test_serve_edge_identity as edge

    id_pem, id_key, _ = edge.est_identity(est_server, tmp_path, "edge-dev-9")
    _, csr = make_key_csr(tmp_path, "dev9", "/CN=edge-dev-9")
    assert edge.post(est_server, "default", csr, id_pem, id_key).status == 200
    identity_ca = write(tmp_path / "est-identity.pem", est_server.kvpki("get-ca", "--ca", "est-identity").stdout)
    est_server.kvpki("revoke", "--cert", str(identity_ca), "--ca", "root", "--reason", "cACompromise")
    edge.refused(edge.post(est_server, "default", csr, id_pem, id_key), 403, b"revoked")


def test_est_refuses_enrollment_under_a_revoked_ca_and_keeps_publishing(est_server: EstServer, tmp_path: Path) -> None:
    status, _, device = _enroll(est_server, tmp_path, "before-revocation")
    assert status == 200
    with urllib.request.urlopen(f"{est_server.http_url}/ca/issuing.crt", timeout=10) as response:
        issuing = x509.load_der_x509_certificate(response.read())
    issuing_pem = write(tmp_path / "issuing.pem", issuing.public_bytes(serialization.Encoding.PEM))

    est_server.kvpki("revoke", "--cert", str(issuing_pem), "--ca", "root", "--reason", "cACompromise")

    status, body, _ = _enroll(est_server, tmp_path, "after-revocation")  # the next request, no restart
    assert status == 403 and b"revoked" in body, body
    assert "Traceback" not in est_server.log()
    # CRL and OCSP of the revoked CA keep answering, signed by its key.
    est_server.kvpki("revoke", "--cert", str(device), "--ca", "issuing", "--reason", "keyCompromise")
    with urllib.request.urlopen(f"{est_server.http_url}/crl/issuing.crl", timeout=10) as response:
        crl = x509.load_der_x509_crl(response.read())
    assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    serial = x509.load_pem_x509_certificate(device.read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    answer = openssl("ocsp", "-issuer", str(issuing_pem), "-cert", str(device), "-url",
                     f"{est_server.http_url}/ocsp/issuing", "-CAfile", str(est_server.root_pem),
                     "-verify_other", str(issuing_pem))  # fmt: skip
    assert b"Response verify OK" in answer.stderr + answer.stdout and b": revoked" in answer.stdout
    # The server's CRL and the CLI's share one numbering and agree (the server re-signs via the same path).
    cli_crl = x509.load_pem_x509_crl(est_server.kvpki("crl", "--ca", "issuing").stdout)
    number = x509.CRLNumber
    assert cli_crl.extensions.get_extension_for_class(number).value.crl_number > (
        crl.extensions.get_extension_for_class(number).value.crl_number
    )
    assert {r.serial_number for r in crl} <= {r.serial_number for r in cli_crl}
