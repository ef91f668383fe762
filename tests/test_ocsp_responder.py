"""Delegated OCSP responder (`kvpki init-ocsp-responder`) and OCSP that spends no CA signatures.

Checked with outside tools: openssl (`ocsp` POST, `-reqout` + curl GET + `-respin`,
`verify -purpose ocsphelper`), pkilint on the responder certificate and on
responses, and the Key Vault test server's request log for CA-key signatures.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import KVPKI, Kvpki, StoreSetup, make_env
from tests.helpers import ec_csr_pem, openssl, pkilint_findings
from tests.kvserver.server import KeyVaultTestServer
from tests.servekit import free_port

FUZZ_STEPS = int(os.environ.get("KVPKI_FUZZ_CASES", "40"))


@dataclass
class Served:
    home: Path
    port: int
    log: Path

    def url(self, ca: str) -> str:
        return f"http://127.0.0.1:{self.port}/ocsp/{ca}"


@contextmanager
def serve(kv: Kvpki, ca: str, server_extra: str = "") -> Iterator[Served]:
    """`kvpki serve` for ``ca`` with a plain-HTTP port (self-signed TLS certificate from openssl)."""
    home = kv.home
    if not (home / "tls.pem").exists():
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-keyout", str(home / "tls.key"), "-out", str(home / "tls.pem"), "-subj", "/CN=localhost")  # fmt: skip
    port, tls_port = free_port(), free_port()
    while tls_port == port:
        tls_port = free_port()
    (home / "serve.toml").write_text(
        f'[server]\nport = {tls_port}\nhttp_port = {port}\ntls_cert = "tls.pem"\ntls_key = "tls.key"\n'
        f'{server_extra}\n[est.default]\nca = "{ca}"\n'
    )
    log = home / "serve.log"
    with log.open("wb") as handle:
        process = subprocess.Popen([*KVPKI, "serve", "--config", str(home / "serve.toml")], stdout=handle,
                                   stderr=handle, env=kv.env, cwd=home)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b"listening on https" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"kvpki serve did not start: {log.read_text()}")
            time.sleep(0.05)
        yield Served(home, port, log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def issue(kv: Kvpki, ca: str, count: int) -> list[x509.Certificate]:
    csr_dir, out_dir = kv.home / f"csr-{ca}", kv.home / f"out-{ca}-{time.monotonic_ns()}"
    csr_dir.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = csr_dir / f"dev{time.monotonic_ns()}-{i}.csr"
        path.write_bytes(ec_csr_pem(f"dev-{i}"))
        paths.append(str(path))
    kv.ok("sign-csr", *paths, "--ca", ca, "--out-dir", str(out_dir))
    return [x509.load_pem_x509_certificate(p.read_bytes()) for p in sorted(out_dir.iterdir())]


def request_der(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def post(url: str, der: bytes) -> bytes:
    req = urllib.request.Request(url, data=der, headers={"Content-Type": "application/ocsp-request"})
    with urllib.request.urlopen(req, timeout=10) as response:
        return response.read()  # type: ignore[no-any-return]


def get(
    url: str, der: bytes, *, urlsafe: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    if urlsafe:
        encoded = base64.urlsafe_b64encode(der).decode().rstrip("=")
    else:
        encoded = urllib.parse.quote(base64.b64encode(der).decode(), safe="")
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/{encoded}", headers=headers or {}), timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def status_of(body: bytes) -> ocsp.OCSPCertStatus:
    answer = ocsp.load_der_ocsp_response(body)
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return answer.certificate_status


def pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


# ---------------------------------------------------------------- the responder certificate


def test_init_ocsp_responder_issues_a_delegated_responder_kept_locally(local_kvpki: Kvpki, tmp_path: Path) -> None:
    kv = local_kvpki
    root = x509.load_pem_x509_certificate(kv.init_ca("root", "--subject", "CN=Test Root,O=kvpki"))
    kv.init_ca("issuing", "--parent", "root", "--subject", "CN=Test Issuing CA,O=kvpki")
    issuing = x509.load_pem_x509_certificate(kv.ok("get-ca", "--ca", "issuing"))
    result = kv.run("init-ocsp-responder", "--ca", "issuing", "--validity", "7d", check=True)
    cert = x509.load_pem_x509_certificate(result.stdout)

    assert cert.issuer == issuing.subject
    cert.verify_directly_issued_by(issuing)
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.OCSP_SIGNING]
    )
    cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=6, hours=23) < lifetime <= timedelta(days=7)

    directory = kv.home / "cas" / "issuing" / "ocsp-responder" / format(cert.serial_number, "x")
    assert stat.S_IMODE((directory / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (directory / "cert.pem").read_bytes() == result.stdout
    (row,) = [r for r in kv.inventory("issuing") if r["serial"] == format(cert.serial_number, "x")]
    assert row["profile"] == "ocsp-responder" and row["status"] == "valid"

    path = pem(tmp_path / "responder.pem", cert)
    assert pkilint_findings(path) == ""
    verify = openssl("verify", "-purpose", "ocsphelper", "-CAfile", str(pem(tmp_path / "root.pem", root)),
                     "-untrusted", str(pem(tmp_path / "issuing.pem", issuing)), str(path))  # fmt: skip
    assert b"OK" in verify.stdout

    unknown = kv.run("init-ocsp-responder", "--ca", "nosuch")
    assert unknown.returncode == 5 and unknown.stdout == b""
    assert unknown.stderr.decode().count("\n") == 1


# ---------------------------------------------------------------- Key Vault: zero CA signatures


@pytest.fixture
def az(tmp_path: Path, kv: KeyVaultTestServer, azure_store_setup: Callable[[], Any]) -> Kvpki:
    setup: StoreSetup = azure_store_setup()
    home = tmp_path / "home"
    home.mkdir()
    return Kvpki(home, make_env(home, setup.env), setup)


def vault_signs(kv: KeyVaultTestServer) -> int:
    return sum(1 for entry in kv.log if entry.kind == "vault" and entry.path.rstrip("/").endswith("/sign"))


def fifty_requests(url: str, ca: x509.Certificate, certs: list[x509.Certificate]) -> list[ocsp.OCSPResponse]:
    """50 requests for 10 certificates: POST and GET (standard and URL-safe base64), every fifth with a nonce."""
    answers = []
    for i in range(50):
        cert = certs[i % 10]
        nonce = os.urandom(16) if i % 5 == 4 else None
        der = request_der(cert, ca, nonce)
        answer = ocsp.load_der_ocsp_response(post(url, der) if i % 2 else get(url, der, urlsafe=i % 4 == 0)[2])
        assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert answer.serial_number == cert.serial_number
        if nonce is not None:  # echoed (ocsp_nonces = "echo", the default)
            assert answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
        answers.append(answer)
    return answers


def test_ocsp_on_key_vault_ca_spends_no_vault_signature(az: Kvpki, kv: KeyVaultTestServer, tmp_path: Path) -> None:
    """Without a responder every new answer is a vault signature; with one, 50 requests and a revocation cost 0."""
    ca = x509.load_pem_x509_certificate(az.init_ca("fleet", "--subject", "CN=Fleet CA,O=kvpki"))
    certs = issue(az, "fleet", 10)
    with serve(az, "fleet") as server:
        kv.clear_log()
        fifty_requests(server.url("fleet"), ca, certs)
        assert vault_signs(kv) == 18  # baseline: 8 certificates asked without a nonce once each + 10 nonce requests

    kv.clear_log()
    responder = x509.load_pem_x509_certificate(az.ok("init-ocsp-responder", "--ca", "fleet"))
    assert vault_signs(kv) == 1  # issuing the responder is the one CA signature
    ca_pem = pem(tmp_path / "ca.pem", ca)
    with serve(az, "fleet") as server:
        kv.clear_log()
        url = server.url("fleet")
        key_id = responder.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        for answer in fifty_requests(url, ca, certs):
            assert answer.certificates == [responder] and answer.responder_key_hash == key_id
        cert_path = pem(tmp_path / "dev0.pem", certs[0])
        out = openssl("ocsp", "-issuer", str(ca_pem), "-cert", str(cert_path), "-url", url, "-CAfile", str(ca_pem),
                      "-respout", str(tmp_path / "good.der"))  # fmt: skip
        assert b"Response verify OK" in out.stderr and f"{cert_path}: good".encode() in out.stdout
        assert pkilint_findings(tmp_path / "good.der", "ocsp") == ""

        az.ok("revoke", format(certs[0].serial_number, "x"), "--ca", "fleet", "--reason", "keyCompromise")
        der = request_der(certs[0], ca)
        assert status_of(get(url, der)[2]) == ocsp.OCSPCertStatus.REVOKED
        assert status_of(post(url, request_der(certs[1], ca))) == ocsp.OCSPCertStatus.GOOD
        out = openssl("ocsp", "-issuer", str(ca_pem), "-cert", str(cert_path), "-url", url, "-CAfile", str(ca_pem),
                      "-respout", str(tmp_path / "revoked.der"))  # fmt: skip
        assert b"Response verify OK" in out.stderr and f"{cert_path}: revoked".encode() in out.stdout
        assert b"Reason: keyCompromise" in out.stdout
        assert pkilint_findings(tmp_path / "revoked.der", "ocsp") == ""
        assert vault_signs(kv) == 0, [(e.method, e.path) for e in kv.log]


# ---------------------------------------------------------------- caching, GET, status changes


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kvpki, Served, x509.Certificate, Path]]:
    """Local store: root -> issuing, a responder, and serve with ``ocsp_nonces = "ignore"`` (RFC 5019)."""
    home = tmp_path_factory.mktemp("ocsp") / "home"
    home.mkdir()
    kv = Kvpki(home, make_env(home), StoreSetup("local"))
    root = x509.load_pem_x509_certificate(kv.init_ca("root", "--subject", "CN=Test Root,O=kvpki"))
    kv.init_ca("issuing", "--parent", "root", "--subject", "CN=Test Issuing CA,O=kvpki")
    kv.ok("init-ocsp-responder", "--ca", "issuing")
    issuer = x509.load_pem_x509_certificate(kv.ok("get-ca", "--ca", "issuing"))
    pem(home / "issuing.pem", issuer)
    pem(home / "root.pem", root)
    with serve(kv, "issuing", 'ocsp_nonces = "ignore"\nocsp_validity = "1h"') as server:
        yield kv, server, issuer, home


def test_get_and_post_share_one_signature_with_rfc5019_headers(
    fleet: tuple[Kvpki, Served, x509.Certificate, Path], tmp_path: Path
) -> None:
    kv, server, issuer, home = fleet
    (cert,) = issue(kv, "issuing", 1)
    url = server.url("issuing")
    der = request_der(cert, issuer)
    first = post(url, der)
    status, headers, body = get(url, der)
    assert status == 200 and body == first  # the POST's signature, from the shared cache
    assert get(url, der, urlsafe=True)[2] == first  # URL-safe base64 without padding
    assert post(url, request_der(cert, issuer, os.urandom(8))) == first  # nonce ignored (RFC 5019)

    answer = ocsp.load_der_ocsp_response(body)
    cache_control = headers["Cache-Control"].split(", ")
    assert cache_control[1:] == ["public", "no-transform", "must-revalidate"]
    max_age = int(cache_control[0].removeprefix("max-age="))
    assert 1700 <= max_age <= 1800  # half of ocsp_validity: then the server signs a new response
    assert headers["ETag"] == '"' + hashlib.sha1(body).hexdigest() + '"'
    assert parsedate_to_datetime(headers["Last-Modified"]) == answer.this_update_utc
    assert parsedate_to_datetime(headers["Expires"]) == answer.next_update_utc
    assert answer.next_update_utc - answer.this_update_utc == timedelta(hours=1)
    not_modified = get(url, der, headers={"If-None-Match": headers["ETag"]})
    assert not_modified[0] == 304 and not_modified[2] == b""

    # openssl: the request it writes, sent as GET by curl, verified by openssl against the CA chain
    cert_path, req, resp = pem(tmp_path / "c.pem", cert), tmp_path / "req.der", tmp_path / "resp.der"
    chain = ["-issuer", str(home / "issuing.pem"), "-CAfile", str(home / "root.pem"),
             "-verify_other", str(home / "issuing.pem")]  # fmt: skip
    out = openssl("ocsp", *chain, "-cert", str(cert_path), "-url", url, "-no_nonce", "-reqout", str(req))
    assert b"Response verify OK" in out.stderr and f"{cert_path}: good".encode() in out.stdout
    encoded = urllib.parse.quote(base64.b64encode(req.read_bytes()).decode(), safe="")
    subprocess.run(["curl", "-sSf", "-o", str(resp), f"{url}/{encoded}"], check=True, timeout=30)
    assert resp.read_bytes() == first
    check = openssl("ocsp", *chain, "-respin", str(resp), "-cert", str(cert_path))
    assert b"Response verify OK" in check.stderr and f"{cert_path}: good".encode() in check.stdout
    assert pkilint_findings(resp, "ocsp") == ""


def test_status_changes_pass_the_cache_and_each_serial_status_is_signed_once(
    fleet: tuple[Kvpki, Served, x509.Certificate, Path], tmp_path: Path
) -> None:
    """Random requests (POST/GET, std/URL-safe) and CLI revocations: every answer is the inventory's
    status at once, and each (serial, status) has exactly one signed response."""
    kv, server, issuer, _ = fleet
    rng = random.Random(int(os.environ.get("KVPKI_FUZZ_SEED", "8")))
    certs = issue(kv, "issuing", 6)
    url = server.url("issuing")
    revoked: set[int] = set()
    bodies: dict[tuple[int, ocsp.OCSPCertStatus], set[bytes]] = {}
    for step in range(FUZZ_STEPS):
        cert = rng.choice(certs)
        if step % 10 == 9 and len(revoked) < len(certs) - 1:
            victim = rng.choice([c for c in certs if c.serial_number not in revoked])
            kv.ok("revoke", format(victim.serial_number, "x"), "--ca", "issuing")
            revoked.add(victim.serial_number)
            cert = victim  # ask right after the revocation
        der = request_der(cert, issuer)
        body = post(url, der) if rng.random() < 0.5 else get(url, der, urlsafe=rng.random() < 0.5)[2]
        expected = ocsp.OCSPCertStatus.REVOKED if cert.serial_number in revoked else ocsp.OCSPCertStatus.GOOD
        assert status_of(body) == expected, f"step {step}"
        bodies.setdefault((cert.serial_number, expected), set()).add(body)
    assert all(len(signed) == 1 for signed in bodies.values()), {k: len(v) for k, v in bodies.items()}
    assert any(status == ocsp.OCSPCertStatus.REVOKED for _, status in bodies)


def test_unknown_serial_and_malformed_requests_are_not_cached(
    fleet: tuple[Kvpki, Served, x509.Certificate, Path],
) -> None:
    _, server, issuer, _ = fleet
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        hashlib.sha1(issuer.subject.public_bytes()).digest(),
        ocsp.OCSPRequestBuilder().add_certificate(issuer, issuer, hashes.SHA1()).build().issuer_key_hash,
        0x1234567, hashes.SHA1(),
    ).build().public_bytes(serialization.Encoding.DER)  # fmt: skip
    status, headers, body = get(server.url("issuing"), request)
    assert status == 200 and status_of(body) == ocsp.OCSPCertStatus.UNKNOWN
    assert headers["Cache-Control"] == "no-cache"
    assert get(server.url("issuing"), b"\x30\x03abc")[0] == 200
    assert get(server.url("issuing"), b"x")[0] == 200  # malformed: an unsuccessful OCSP response
    assert get(server.url("nosuch"), request)[0] == 404


# ---------------------------------------------------------------- renewal


def test_responder_is_renewed_once_with_a_third_of_its_life_left(
    local_kvpki: Kvpki, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvpki_cli import ocsp_responder
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings
    from kvpki_cli.pki.ocsp import Responder
    from kvpki_cli.serve.ocsp import build_answer

    kv = local_kvpki
    kv.init_ca("root", "--subject", "CN=Test Root")
    (cert,) = issue(kv, "root", 1)
    old = x509.load_pem_x509_certificate(kv.ok("init-ocsp-responder", "--ca", "root", "--validity", "3h"))
    ca = CertificateAuthority.open(Settings.load(kv.home), "root")
    start = datetime.now(UTC)

    assert ocsp_responder.refresh(ca).certificate == old  # type: ignore[union-attr]
    monkeypatch.setattr(ocsp_responder, "utcnow", lambda: start + timedelta(hours=1, minutes=45))
    assert ocsp_responder.refresh(ca).certificate == old  # type: ignore[union-attr]  # 1h20m of 3h05m left

    monkeypatch.setattr(ocsp_responder, "utcnow", lambda: start + timedelta(hours=2, minutes=5))
    renewed = ocsp_responder.refresh(ca)
    assert renewed is not None and renewed.certificate.serial_number != old.serial_number
    assert renewed.key.public_key() != old.public_key()  # a new key
    assert renewed.certificate.not_valid_after_utc - old.not_valid_after_utc > timedelta(hours=1)
    assert ocsp_responder.refresh(ca).certificate == renewed.certificate  # type: ignore[union-attr]  # once
    rows = [r for r in kv.inventory("root") if r["profile"] == "ocsp-responder"]
    assert len(rows) == 2

    # a response never outlives the certificate of the responder that signed it
    old_key = ocsp_responder.load_key(kv.home / "cas" / "root" / "ocsp-responder" / format(old.serial_number, "x"))
    near_end = Responder(old, old_key)
    der = request_der(cert, ca.certificate)
    answer = ocsp.load_der_ocsp_response(build_answer(ca, der, near_end, timedelta(days=1)).body)
    assert answer.next_update_utc == old.not_valid_after_utc

    monkeypatch.setattr(ocsp_responder, "utcnow", lambda: start + timedelta(hours=3, minutes=30))
    assert ocsp_responder.refresh(ca).certificate == renewed.certificate  # type: ignore[union-attr]
    monkeypatch.setattr(ocsp_responder, "utcnow", lambda: start + timedelta(hours=4, minutes=30))
    assert ocsp_responder.refresh(ca).certificate != renewed.certificate  # type: ignore[union-attr]
    remaining = [p.name for p in (kv.home / "cas" / "root" / "ocsp-responder").iterdir() if p.is_dir()]
    assert format(old.serial_number, "x") not in remaining  # expired responders are removed


def test_expired_responder_is_replaced_and_failed_renewal_keeps_the_current_one(
    local_kvpki: Kvpki, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvpki_cli import ocsp_responder
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings
    from kvpki_cli.errors import BackendError

    kv = local_kvpki
    kv.init_ca("root", "--subject", "CN=Test Root")
    old = x509.load_pem_x509_certificate(kv.ok("init-ocsp-responder", "--ca", "root", "--validity", "3h"))
    ca = CertificateAuthority.open(Settings.load(kv.home), "root")
    start = datetime.now(UTC)

    def vault_down(*args: object) -> None:
        raise BackendError("key store throttled")

    monkeypatch.setattr(ocsp_responder, "utcnow", lambda: start + timedelta(hours=2, minutes=30))
    with monkeypatch.context() as patched:
        patched.setattr(ca.keystore, "signer", vault_down)
        assert ocsp_responder.refresh(ca).certificate == old  # type: ignore[union-attr]  # retried later
    monkeypatch.setattr(ocsp_responder, "utcnow", lambda: start + timedelta(hours=5))  # serve was down
    assert ocsp_responder.current_responder(ca) is None
    fresh = ocsp_responder.refresh(ca)
    assert fresh is not None and fresh.certificate.not_valid_after_utc - (start + timedelta(hours=5)) > timedelta(
        days=6
    )  # the default 7d lifetime


def test_serve_picks_up_a_responder_created_while_it_runs(local_kvpki: Kvpki) -> None:
    """The maintenance task of `serve` (every minute; here 50 ms) switches from the CA key to a new responder."""
    import asyncio

    from kvpki_cli.config import Settings
    from kvpki_cli.serve.ocsp import OcspResponder, Responders
    from kvpki_cli.serve.workers import CaWorkers

    kv = local_kvpki
    kv.init_ca("root", "--subject", "CN=Test Root")
    workers = CaWorkers(Settings.load(kv.home), 1)
    responders = Responders({})
    responder = OcspResponder({"root"}, workers, {}, timedelta(hours=1), 10, "echo", responders)

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(responder.maintain(interval=0.05))
        await asyncio.sleep(0.2)
        assert responders.get("root") is None  # no responder yet: the CA key signs
        pem_bytes = await asyncio.to_thread(kv.ok, "init-ocsp-responder", "--ca", "root")
        for _ in range(100):
            if responders.get("root") is not None:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        current = responders.get("root")
        assert current is not None and current.certificate == x509.load_pem_x509_certificate(pem_bytes)

    try:
        asyncio.run(scenario())
    finally:
        workers.shutdown()


def test_failed_init_ocsp_responder_leaves_nothing(local_kvpki: Kvpki, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvpki_cli import ocsp_responder
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings
    from kvpki_cli.errors import BackendError

    local_kvpki.init_ca("root", "--subject", "CN=Test Root")
    ca = CertificateAuthority.open(Settings.load(local_kvpki.home), "root")

    def locked(*args: object) -> None:
        raise BackendError("database is locked")

    monkeypatch.setattr(ca.inventory, "record_issued", locked)
    with pytest.raises(BackendError):
        ocsp_responder.issue_responder(ca, timedelta(days=7), "pytest")
    root = local_kvpki.home / "cas" / "root" / "ocsp-responder"
    assert [p for p in root.iterdir() if p.is_dir()] == []
    assert ocsp_responder.current_responder(ca) is None and ocsp_responder.refresh(ca) is None
