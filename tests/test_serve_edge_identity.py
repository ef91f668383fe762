"""Azure IoT Edge with a bootstrap certificate: EST identity certificate as enrollment authority.

curl + openssl behave like aziot-certd: base64 wrapped at 64 with LF, ``Content-Type:
application/pkcs10``, ``content-transfer-encoding: base64``, TLS client certificate via
``--cert/--key``.  Labels (tests/servekit.py): ``est-id`` issues EST identities from CA
``est-identity`` to bootstrap certificates; ``default`` (device ID) and ``edge-ca`` accept
those identities as authority (``identity_cas``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from kvpki_cli.errors import UsageError
from kvpki_cli.serve.config import load_serve_config
from tests import servekit
from tests.servekit import EDGE_HEADERS, EstServer, HttpResult, curl, est_body, make_key_csr, openssl
from tests.test_serve_est import edge_enroll, is_ca, verify_edge_chain, write_pem

est_server = servekit.est_server  # the module-scoped live server fixture

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

EDGE_CA_EXT = (
    "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
    "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
)  # fmt: skip
EST_ID_EXT = ("-addext", "extendedKeyUsage=clientAuth")


def bootstrap_certificate(server: EstServer, directory: Path, device_id: str) -> tuple[Path, Path]:
    """A bootstrap certificate from the bootstrap CA (what the device ships with)."""
    key, csr = make_key_csr(directory, f"boot-{device_id}", f"/CN={device_id}")
    (directory / f"boot-{device_id}.der").write_bytes(csr)
    pem = server.kvpki("sign-csr", str(directory / f"boot-{device_id}.der"), "--ca", "bootstrap").stdout
    (directory / f"boot-{device_id}.pem").write_bytes(pem)
    return directory / f"boot-{device_id}.pem", key


def est_identity(server: EstServer, directory: Path, device_id: str) -> tuple[Path, Path, x509.Certificate]:
    """Bootstrap certificate -> EST identity certificate (ECDSA P-256, EKU clientAuth) on label est-id."""
    boot_pem, boot_key = bootstrap_certificate(server, directory, device_id)
    key, csr = make_key_csr(directory, f"estid-{device_id}", f"/CN={device_id}", *EST_ID_EXT)
    status, issued, cacerts = edge_enroll(server, "est-id", csr, None, boot_pem, boot_key)
    assert status == 200 and len(issued) == 1
    verify_edge_chain(server, directory, issued[0], cacerts)
    return write_pem(directory / f"estid-{device_id}.pem", issued), key, issued[0]


def refused(result: HttpResult, status: int = 403, reason: bytes = b"") -> None:
    assert result.status == status, (result.status, result.body)
    assert result.headers.get("content-type", "").startswith("text/plain")
    assert b"BEGIN" not in result.body and not result.body.startswith(b"MII")
    assert reason in result.body, result.body


def post(server: EstServer, label: str, csr: bytes, cert: Path, key: Path) -> HttpResult:
    return curl(server, f"/.well-known/est/{label}/simpleenroll", data=est_body(csr), cert=cert, key=key,
                headers=EDGE_HEADERS)  # fmt: skip


def inventories(server: EstServer) -> dict[str, list[dict[str, object]]]:
    return {ca: server.inventory(ca) for ca in ("issuing", "est-identity")}


def test_bootstrap_to_edge_ca_and_renewal(est_server: EstServer, tmp_path: Path) -> None:
    issuing_before = len(est_server.inventory("issuing"))
    id_pem, id_key, identity = est_identity(est_server, tmp_path, "edge-dev-1")
    assert identity.issuer.rfc4514_string() == "CN=Test EST Identity CA,O=kvpki"
    usages = identity.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    row = next(r for r in est_server.inventory("est-identity") if r["serial"] == format(identity.serial_number, "x"))
    assert row["requester"] == "est-cert:CN=edge-dev-1"

    # Device ID (RSA-2048, no extensions) authenticated by the EST identity certificate.
    _, device_csr = make_key_csr(tmp_path, "devid", "/CN=edge-dev-1", rsa=True)
    status, issued, cacerts = edge_enroll(est_server, "default", device_csr, None, id_pem, id_key)
    assert status == 200 and not is_ca(issued[0])
    device_cert = issued[0]
    verify_edge_chain(est_server, tmp_path, device_cert, cacerts)

    # Edge CA on its label, authenticated by the EST identity certificate.
    edge_key, edge_csr = make_key_csr(tmp_path, "edgeca", "/CN=aziot-edge CA edge-dev-1", *EDGE_CA_EXT)
    status, issued, cacerts = edge_enroll(est_server, "edge-ca", edge_csr, None, id_pem, id_key)
    assert status == 200 and len(issued) == 1
    edge_ca = issued[0]
    constraints = edge_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert edge_ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    verify_edge_chain(est_server, tmp_path, edge_ca, cacerts)

    # The Edge CA signs a leaf that openssl accepts (chain: leaf -> Edge CA -> issuing -> root).
    edge_pem = write_pem(tmp_path / "edgeca.pem", [edge_ca])
    _, leaf_csr = make_key_csr(tmp_path, "module", "/CN=edgehub.local")
    (tmp_path / "module.der").write_bytes(leaf_csr)
    (tmp_path / "leaf.ext").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                       "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:edgehub.local\n")  # fmt: skip
    openssl("x509", "-req", "-inform", "DER", "-in", str(tmp_path / "module.der"), "-CA", str(edge_pem),
            "-CAkey", str(edge_key), "-CAcreateserial", "-days", "2", "-extfile", str(tmp_path / "leaf.ext"),
            "-out", str(tmp_path / "module.pem"))  # fmt: skip
    untrusted = write_pem(tmp_path / "untrusted.pem", [edge_ca, *cacerts])
    result = openssl("verify", "-CAfile", str(est_server.root_pem), "-untrusted", str(untrusted),
                     str(tmp_path / "module.pem"))  # fmt: skip
    assert result.stdout.strip().endswith(b": OK")

    # Renewal: new key, same subject, simpleenroll authenticated by the EST identity certificate.
    _, renew_csr = make_key_csr(tmp_path, "edgeca2", "/CN=aziot-edge CA edge-dev-1", *EDGE_CA_EXT)
    status, issued, cacerts = edge_enroll(est_server, "edge-ca", renew_csr, None, id_pem, id_key)
    assert status == 200
    renewed = issued[0]
    assert renewed.subject == edge_ca.subject and renewed.serial_number != edge_ca.serial_number
    assert renewed.public_key() != edge_ca.public_key()
    verify_edge_chain(est_server, tmp_path, renewed, cacerts)

    # Renewal with the old Edge CA certificate itself keeps today's semantics (same names, same profile).
    _, renew_csr = make_key_csr(tmp_path, "edgeca3", "/CN=aziot-edge CA edge-dev-1", *EDGE_CA_EXT)
    status, issued, _ = edge_enroll(est_server, "edge-ca", renew_csr, None, edge_pem, edge_key)
    assert status == 200 and issued[0].subject == edge_ca.subject

    rows = {r["serial"]: r for r in est_server.inventory("issuing")}
    assert len(rows) == issuing_before + 4
    for cert, profile in ((device_cert, "device"), (edge_ca, "edge-ca"), (renewed, "edge-ca")):
        row = rows[format(cert.serial_number, "x")]
        assert (row["requester"], row["profile"]) == ("est-cert:CN=edge-dev-1", profile)
    assert rows[format(issued[0].serial_number, "x")]["requester"] == "est-cert:CN=aziot-edge CA edge-dev-1"


def test_identity_authority_refusals_issue_nothing(est_server: EstServer, tmp_path: Path) -> None:
    id_pem, id_key, identity = est_identity(est_server, tmp_path, "edge-dev-2")
    boot_pem, boot_key = bootstrap_certificate(est_server, tmp_path, "edge-dev-2b")
    before = inventories(est_server)

    def edge_csr(subject: str, *extra: str) -> bytes:
        return make_key_csr(tmp_path, "neg", subject, *EDGE_CA_EXT, *extra)[1]

    # CN not tied to the identity (another device's name, or an arbitrary one).
    for subject in ("/CN=aziot-edge CA edge-dev-1", "/CN=edge-dev-1", "/CN=aziot-edge CA"):
        refused(post(est_server, "edge-ca", edge_csr(subject), id_pem, id_key), reason=b"not tied")
    # Subject attributes or SANs the identity does not have.
    refused(post(est_server, "edge-ca", edge_csr("/CN=edge-dev-2/O=Contoso"), id_pem, id_key), reason=b"attributes")
    refused(post(est_server, "edge-ca", edge_csr("/CN=edge-dev-2", "-addext", "subjectAltName=DNS:evil.example"),
                 id_pem, id_key), reason=b"subjectAltNames")  # fmt: skip
    # The bootstrap certificate is not an enrollment identity for edge-ca.
    refused(post(est_server, "edge-ca", edge_csr("/CN=edge-dev-2b"), boot_pem, boot_key), reason=b"not trusted")
    # A device certificate from a CA that edge-ca does not list (issuing): renewal-only, profile mismatch.
    device_key, device_csr = make_key_csr(tmp_path, "basicdev", "/CN=edge-dev-3")
    result = curl(est_server, "/.well-known/est/simpleenroll", data=est_body(device_csr), user="alice",
                  headers=EDGE_HEADERS)  # fmt: skip
    assert result.status == 200
    device_pem = tmp_path / "basicdev.pem"
    device_pem.write_bytes(servekit.pkcs7_certificates(result.body)[0].public_bytes(Encoding.PEM))
    before["issuing"] = est_server.inventory("issuing")
    refused(post(est_server, "edge-ca", edge_csr("/CN=edge-dev-3"), device_pem, device_key), reason=b"profile")
    # An EST identity on a label that does not list est-identity: renewal-only semantics, not trusted.
    _, other_csr = make_key_csr(tmp_path, "other", "/CN=edge-dev-2")
    refused(post(est_server, "other", other_csr, id_pem, id_key))
    # simplereenroll never accepts an identity as authority.
    result = curl(est_server, "/.well-known/est/edge-ca/simplereenroll", data=est_body(edge_csr("/CN=edge-dev-2")),
                  cert=id_pem, key=id_key, headers=EDGE_HEADERS)  # fmt: skip
    refused(result)
    assert inventories(est_server) == before

    # Good before revocation (default rule "{cn}" is in this label's identity_cn too).
    status, issued, _ = edge_enroll(est_server, "edge-ca", edge_csr("/CN=edge-dev-2"), None, id_pem, id_key)
    assert status == 200 and is_ca(issued[0])

    # Revoked by the CLI (another process): refused at once on every label that trusts it.
    est_server.kvpki("revoke", "--ca", "est-identity", format(identity.serial_number, "x"))
    before = inventories(est_server)
    refused(post(est_server, "edge-ca", edge_csr("/CN=aziot-edge CA edge-dev-2"), id_pem, id_key), reason=b"revoked")
    _, device_id_csr = make_key_csr(tmp_path, "devid2", "/CN=edge-dev-2", rsa=True)
    refused(post(est_server, "default", device_id_csr, id_pem, id_key), reason=b"revoked")
    assert inventories(est_server) == before


def test_label_ca_as_identity_ca_renews_by_profile(est_server: EstServer, tmp_path: Path) -> None:
    """With one CA for everything, a certificate of the label's profile renews, others act as identities."""
    device_key, device_csr = make_key_csr(tmp_path, "dev5", "/CN=edge-dev-5")
    result = curl(est_server, "/.well-known/est/simpleenroll", data=est_body(device_csr), user="alice",
                  headers=EDGE_HEADERS)  # fmt: skip
    device_pem = write_pem(tmp_path / "dev5.pem", servekit.pkcs7_certificates(result.body))
    edge_key, edge_csr = make_key_csr(tmp_path, "ca5", "/CN=edge-dev-5", *EDGE_CA_EXT)
    status, issued, _ = edge_enroll(est_server, "edge-ca-one-ca", edge_csr, None, device_pem, device_key)
    assert status == 200 and is_ca(issued[0])
    edge_pem = write_pem(tmp_path / "ca5.pem", issued)
    _, renew_csr = make_key_csr(tmp_path, "ca5b", "/CN=edge-dev-5", *EDGE_CA_EXT)
    status, renewed, _ = edge_enroll(est_server, "edge-ca-one-ca", renew_csr, None, edge_pem, edge_key)
    assert status == 200 and renewed[0].subject == issued[0].subject
    before = est_server.inventory("issuing")
    _, other_csr = make_key_csr(tmp_path, "ca5c", "/CN=edge-dev-6", *EDGE_CA_EXT)
    refused(post(est_server, "edge-ca-one-ca", other_csr, edge_pem, edge_key), reason=b"keep the subject")
    refused(post(est_server, "edge-ca-one-ca", other_csr, device_pem, device_key), reason=b"not tied")
    assert est_server.inventory("issuing") == before


def test_identity_config_validation(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    head = '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n[est.edge-ca]\nca = "issuing"\n'
    path.write_text(head + 'identity_cas = ["est-identity"]\n')
    label = load_serve_config(path).labels["edge-ca"]
    assert label.identity_cas == ("est-identity",) and label.identity_cn == ("{cn}",)
    assert not label.identity_profiles
    path.write_text(head + 'identity_cas = ["est-identity"]\nidentity_cn = "{cn} Edge CA"\n')
    assert load_serve_config(path).labels["edge-ca"].identity_cn == ("{cn} Edge CA",)
    for bad in ('identity_cn = "aziot-edge CA"', 'identity_cn = ["{cn}-{x}"]', "identity_cas = []"):
        path.write_text(head + 'identity_cas = ["est-identity"]\n' * ("identity_cas" not in bad) + bad + "\n")
        with pytest.raises(UsageError, match="identity_c"):
            load_serve_config(path)
    path.write_text(head + 'identity_profiles = ["device"]\n')
    with pytest.raises(UsageError, match="need identity_cas"):
        load_serve_config(path)
