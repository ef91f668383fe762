"""OCSP nonces must not let anyone spend a Key Vault CA's signing budget.

Without a delegated responder each echoed nonce is a CA-key (vault) signature.
Per CA at most ``ocsp_nonce_burst`` of them at once, refilled at
``ocsp_nonce_rate``; beyond that the nonce is ignored and the cached, nonce-less
response served.  A responder (a local key) keeps echoing every nonce.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from kvpki_cli.errors import UsageError
from kvpki_cli.serve.config import load_serve_config
from kvpki_cli.serve.ratelimit import Rate
from tests.conftest import Kvpki
from tests.helpers import openssl
from tests.kvserver.server import KeyVaultTestServer
from tests.test_ocsp_responder import az, issue, pem, post, request_der, serve, vault_signs  # noqa: F401

REQUESTS = 100


def nonce_of(answer: ocsp.OCSPResponse) -> bytes | None:
    try:
        return answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


def hundred_nonce_requests(url: str, cert: x509.Certificate, ca: x509.Certificate) -> list[tuple[bytes, bytes, bytes]]:
    """(request, response, nonce) of 100 POSTs for one serial, each with a fresh nonce."""
    exchanges = []
    for _ in range(REQUESTS):
        nonce = os.urandom(16)
        der = request_der(cert, ca, nonce)
        exchanges.append((der, post(url, der), nonce))
    return exchanges


def openssl_verifies(tmp_path: Path, ca_pem: Path, der: bytes, body: bytes) -> str:
    (tmp_path / "req.der").write_bytes(der)
    (tmp_path / "resp.der").write_bytes(body)
    out = openssl("ocsp", "-reqin", str(tmp_path / "req.der"), "-respin", str(tmp_path / "resp.der"),
                  "-CAfile", str(ca_pem), "-issuer", str(ca_pem), "-resp_text")  # fmt: skip
    assert b"Response verify OK" in out.stderr, out.stderr
    assert b"Nonce Verify error" not in out.stderr and b"Cert Status: good" in out.stdout
    return out.stderr.decode()


def test_nonce_echoes_signed_by_a_vault_ca_key_are_capped(az: Kvpki, kv: KeyVaultTestServer, tmp_path: Path) -> None:  # noqa: F811
    ca = x509.load_pem_x509_certificate(az.init_ca("fleet", "--subject", "CN=Fleet CA,O=kvpki"))
    (cert,) = issue(az, "fleet", 1)
    ca_pem = pem(tmp_path / "ca.pem", ca)
    with serve(az, "fleet", 'ocsp_nonce_rate = "2/1s"\nocsp_nonce_burst = 8') as server:
        kv.clear_log()
        started = time.monotonic()
        exchanges = hundred_nonce_requests(server.url("fleet"), cert, ca)
        elapsed = time.monotonic() - started
        signs = vault_signs(kv)
        log = server.log.read_text()
    echoed = capped = 0
    for der, body, nonce in exchanges:
        answer = ocsp.load_der_ocsp_response(body)
        assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
        got = nonce_of(answer)
        assert got in (nonce, None)  # echoed, or none at all: never another request's nonce
        echoed += got == nonce
        capped += got is None
        stderr = openssl_verifies(tmp_path, ca_pem, der, body)
        assert ("WARNING: no nonce in response" in stderr) == (got is None)
    budget = 8 + 2 * elapsed
    assert 8 <= echoed <= budget and capped == REQUESTS - echoed and capped > 0
    assert signs <= budget + 1  # the echoes, plus one nonce-less response signed once and then cached
    assert signs == echoed + 1
    assert log.count("nonce requests beyond") == 1  # logged once per minute, not per request


def test_a_delegated_responder_echoes_every_nonce_for_free(az: Kvpki, kv: KeyVaultTestServer, tmp_path: Path) -> None:  # noqa: F811
    ca = x509.load_pem_x509_certificate(az.init_ca("fleet", "--subject", "CN=Fleet CA,O=kvpki"))
    (cert,) = issue(az, "fleet", 1)
    az.ok("init-ocsp-responder", "--ca", "fleet")
    ca_pem = pem(tmp_path / "ca.pem", ca)
    with serve(az, "fleet", 'ocsp_nonce_rate = "1/1h"\nocsp_nonce_burst = 1') as server:
        kv.clear_log()
        exchanges = hundred_nonce_requests(server.url("fleet"), cert, ca)
        assert vault_signs(kv) == 0
        assert "nonce requests beyond" not in server.log.read_text()
    for _der, body, nonce in exchanges:
        assert nonce_of(ocsp.load_der_ocsp_response(body)) == nonce
    for der, body, _ in exchanges[:: REQUESTS // 5]:
        assert "WARNING" not in openssl_verifies(tmp_path, ca_pem, der, body)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('ocsp_nonce_rate = "0/1s"', "ocsp_nonce_rate"),
        ('ocsp_nonce_rate = "fast"', "ocsp_nonce_rate"),
        ("ocsp_nonce_rate = 5", "ocsp_nonce_rate"),
        ("ocsp_nonce_burst = 0", "ocsp_nonce_burst"),
        ('ocsp_nonce_burst = "20"', "ocsp_nonce_burst"),
        ('ocsp_nonce_budget = "5/1s"', "unknown setting 'ocsp_nonce_budget'"),
    ],
)
def test_nonce_budget_settings_are_validated(tmp_path: Path, line: str, error: str) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\ntls_cert = "t.pem"\ntls_key = "t.key"\n{line}\n')
    with pytest.raises(UsageError, match=error):
        load_serve_config(config)


def test_nonce_budget_defaults_and_values(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[server]\ntls_cert = "t.pem"\ntls_key = "t.key"\n')
    loaded = load_serve_config(config)
    assert (loaded.ocsp_nonce_rate, loaded.ocsp_nonce_burst) == (Rate(5, 1), 20)
    settings = 'ocsp_nonce_rate = "60/1m"\nocsp_nonce_burst = 3\n'
    config.write_text(f'[server]\ntls_cert = "t.pem"\ntls_key = "t.key"\n{settings}')
    loaded = load_serve_config(config)
    assert (loaded.ocsp_nonce_rate, loaded.ocsp_nonce_burst) == (Rate(60, 60), 3)
