"""The Key Vault signing budget as a limit: the per-vault governor, batch signing with --jobs, serve's 503.

Unit tests drive ``VaultGovernor`` with real threads (rate, thread safety) and a
fake clock (exact turns, deadline fail-fast).  The batch and serve tests run
against the Key Vault test server with its sliding-window throttle (429 above a
limit, as the vault does): the governed batch provokes no 429 at all, and a
request that would wait past its deadline is answered 503 with Retry-After
without spending a vault signature.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import itertools
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from kvpki_cli import deadline
from kvpki_cli.authority import CertificateAuthority, SigningRequest, init_ca
from kvpki_cli.config import Settings
from kvpki_cli.errors import UsageError
from kvpki_cli.keystores.azure import governor
from kvpki_cli.keystores.azure.governor import (
    BudgetExhausted,
    SignBudget,
    VaultGovernor,
    default_jobs,
    default_rate,
    governor_for,
)
from kvpki_cli.keystores.base import KeyType
from kvpki_cli.pki.csr import parse_csr
from kvpki_cli.pki.names import parse_san, parse_subject
from kvpki_cli.serve.passwd import set_user
from tests.conftest import Kvpki, make_env
from tests.kvserver.fixtures import azure_env
from tests.kvserver.server import KeyVaultTestServer


@pytest.fixture(autouse=True)
def fresh_governors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own governors (the test server's URL is the same all session)."""
    monkeypatch.setattr(governor, "_registry", {})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# ----------------------------------------------------------------- the governor itself
def test_turns_follow_the_rate_after_the_burst() -> None:
    clock = FakeClock()
    gov = VaultGovernor(burst_s=0.25, clock=clock, sleep=clock.sleep)
    waits = [gov.reserve(0.1) for _ in range(6)]  # nobody sleeps: every caller queues at the same instant
    # GCRA: 0.25 s of burst = turns at 0, 0, 0 (0.3 > 0.25 promised), then one every 0.1 s
    assert waits == pytest.approx([0.0, 0.0, 0.0, 0.05, 0.15, 0.25])
    clock.now += 10  # idle: the burst comes back, never more
    assert [gov.reserve(0.1) for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.05])


def test_wait_past_the_deadline_fails_fast_and_reserves_nothing() -> None:
    clock = FakeClock()
    gov = VaultGovernor(burst_s=0.0, clock=clock, sleep=clock.sleep)
    gov.reserve(1.0)
    gov.reserve(1.0)  # the next turn is 2 s away
    with pytest.raises(BudgetExhausted) as caught:
        gov.reserve(1.0, deadline=clock.now + 1.5)
    assert caught.value.retry_after == pytest.approx(2.0)
    assert caught.value.exit_code == 6
    assert gov.reserve(1.0, deadline=clock.now + 2.0) == pytest.approx(2.0)  # the refusal took no turn
    assert gov.stats().refused == 1 and gov.stats().granted == 3


def test_thread_deadline_applies_to_every_signature() -> None:
    budget = SignBudget(VaultGovernor(burst_s=0.0), rate=1.0)  # one signature per second
    budget.take()
    start = time.monotonic()
    with deadline.until(time.monotonic() + 0.2), pytest.raises(BudgetExhausted) as caught:
        budget.take()
    assert time.monotonic() - start < 0.1  # failed at once, did not sleep
    assert 0.7 < (caught.value.retry_after or 0) <= 1.0
    with deadline.until(None):
        assert deadline.current() is None


def test_a_429_stops_the_burst_and_honours_retry_after() -> None:
    clock = FakeClock()
    gov = VaultGovernor(burst_s=0.5, clock=clock, sleep=clock.sleep)
    gov.throttled(retry_after=3.0)
    assert gov.reserve(0.1) == pytest.approx(3.0)
    assert gov.stats().throttled == 1


def test_threads_share_one_rate() -> None:
    """16 threads, 150 signatures at 300/s: all granted, turns spaced at the rate, never bunched beyond the burst."""
    rate, total, threads = 300.0, 150, 16
    seen = threading.local()

    def clock() -> float:  # the real clock; remembers what the governor read (under its lock) on this thread
        seen.now = time.monotonic()
        return float(seen.now)

    gov = VaultGovernor(burst_s=0.05, clock=clock)
    turns: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            wait = gov.reserve(1 / rate)
            turn = seen.now + wait  # the turn the governor granted
            time.sleep(wait)
            with lock:
                turns.append(turn)

    start = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - start
    assert len(turns) == total and gov.stats().granted == total
    burst = int(0.05 * rate) + 1
    assert elapsed >= (total - burst) / rate * 0.95
    turns.sort()
    window = 0.2
    most = max(sum(1 for t in turns[i:] if t < turns[i] + window) for i in range(len(turns)))
    assert most <= burst + rate * window + 1


def test_one_governor_per_vault_url() -> None:
    assert governor_for("https://v.vault.azure.net/") is governor_for("https://V.vault.azure.net")
    assert governor_for("https://v.vault.azure.net") is not governor_for("https://w.vault.azure.net")


def test_default_rate_follows_the_documented_limits() -> None:
    ec_key = ec.generate_private_key(ec.SECP384R1()).public_key()
    rsa_keys = {bits: rsa.RSAPublicNumbers(65537, (1 << (bits - 1)) | 1).public_key() for bits in (2048, 3072)}
    assert default_rate(ec_key, hsm=True) == pytest.approx(190.0)  # 95% of 2,000 per 10 s
    assert default_rate(ec_key, hsm=False) == pytest.approx(380.0)
    assert default_rate(rsa_keys[2048], hsm=True) == pytest.approx(190.0)
    assert default_rate(rsa_keys[3072], hsm=True) == pytest.approx(47.5)
    assert default_rate(rsa_keys[3072], hsm=False) == pytest.approx(95.0)
    assert default_jobs(190.0) == 19 and default_jobs(10.0) == 4 and default_jobs(380.0) == 32


@pytest.mark.parametrize("value", ["fast", 0, -5, True])
def test_sign_rate_setting_is_validated(tmp_path: Path, value: object) -> None:
    (tmp_path / "config.toml").write_text(f"[ca.root.store_settings]\nsign_rate = {value!r}\n".lower())
    with pytest.raises(UsageError, match="sign_rate"):
        Settings.load(tmp_path).ca("root", must_exist=False)


# -------------------------------------------------------------- batch sign-csr --jobs
def _csr_pem(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    return csr.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)


@pytest.fixture
def az(tmp_path: Path, kv: KeyVaultTestServer) -> Kvpki:
    from tests.conftest import StoreSetup
    from tests.kvserver.fixtures import azure_init_args

    home = tmp_path / "home"
    home.mkdir()
    setup = StoreSetup("azure", init_args=lambda ca: azure_init_args(kv), env=azure_env(kv))
    return Kvpki(home, make_env(home, setup.env), setup)


def test_batch_with_jobs_stays_under_the_vault_limit(tmp_path: Path, az: Kvpki, kv: KeyVaultTestServer) -> None:
    """60 CSRs, 8 jobs, sign_rate 20/s; the vault throttles above 50 per 2 s: no 429, all issued and valid."""
    az.init_ca("root", "--subject", "CN=Governed Root")
    (az.home / "config.toml").write_text("[ca.root.store_settings]\nsign_rate = 20\n")
    csr_dir = tmp_path / "csrs"
    csr_dir.mkdir()
    paths = []
    for i in range(60):
        path = csr_dir / f"dev{i:03d}.csr"
        path.write_bytes(_csr_pem(f"dev{i:03d}"))
        paths.append(str(path))
    kv.set_faults(latency_ms=5)
    kv.set_throttle(limit=50, window_s=2.0)  # 20/s x 2 s + the 0.25 s burst = 46: just inside
    kv.clear_log()
    out = tmp_path / "out"
    start = time.monotonic()
    result = az.run("sign-csr", "--ca", "root", "--out-dir", str(out), "--jobs", "8", *paths)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    signs = [e for e in kv.log if e.path.endswith("/sign")]
    assert [e.status for e in signs].count(429) == 0
    assert len(signs) == 60
    assert elapsed >= (60 - 6) / 20 * 0.9  # the governor, not the 8 threads, set the pace
    stamps = sorted(e.at for e in signs)
    assert max(sum(1 for t in stamps[i:] if t < stamps[i] + 2.0) for i in range(len(stamps))) <= 50
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(az.ok("get-ca", "--ca", "root"))
    files = sorted(out.glob("*.pem"))
    assert len(files) == 60 and len(az.inventory("root")) == 60
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_pem), *map(str, files)], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count(": OK") == 60


def test_batch_jobs_default_comes_from_the_store(az: Kvpki, kv: KeyVaultTestServer, tmp_path: Path) -> None:
    """Without --jobs the azure store signs concurrently: at 100 ms vault latency 24 signatures overlap."""
    az.init_ca("root", "--subject", "CN=Governed Root")
    paths = []
    for i in range(24):
        path = tmp_path / f"d{i}.csr"
        path.write_bytes(_csr_pem(f"d{i}"))
        paths.append(str(path))
    kv.set_faults(latency_ms=100)
    kv.clear_log()
    result = az.run("sign-csr", "--ca", "root", "--out-dir", str(tmp_path / "o"), *paths)
    assert result.returncode == 0, result.stderr
    answered = sorted(e.at for e in kv.log if e.path.endswith("/sign") and e.status == 200)
    assert len(answered) == 24
    # One at a time, consecutive answers would be >= 100 ms apart (each request waits out the latency);
    # overlapping requests answer closer together, however slow the machine is.
    close = sum(1 for a, b in itertools.pairwise(answered) if b - a < 0.09)
    assert close >= 12, f"only {close} of 23 answer gaps under the vault latency: signing was not concurrent"


# ----------------------------------------------------------------------------- serve
def _serve_home(home: Path, kv: KeyVaultTestServer) -> Settings:
    settings = Settings(home)
    init_ca(settings, "tls", parse_subject("CN=TLS Root"), KeyType("ec-p256"))
    init_ca(
        settings,
        "vault",
        parse_subject("CN=Vault Root"),
        KeyType("ec-p256"),
        store="azure",
        store_settings={"vault_url": kv.url, "sign_rate": 0.4},  # one signature per 2.5 s
    )
    key = ec.generate_private_key(ec.SECP256R1())
    csr_der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )
    request = SigningRequest(csr_der, parse_csr(csr_der), profile="server", sans=[parse_san("DNS:localhost")])
    issued = CertificateAuthority.open(settings, "tls").issue(request)
    (home / "server.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in [issued.certificate]))
    (home / "server.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    set_user(home / "est-users", "alice", "alice-secret")
    (home / "serve.toml").write_text(
        '[server]\ntls_cert = "server.pem"\ntls_key = "server.key"\nusers_file = "est-users"\n'
        "request_timeout = 0.3\nretry_after = 30\n"
        '[est.default]\nca = "vault"\nprofile = "device"\nusers = ["alice"]\n'
    )
    return settings


@pytest.fixture
def est_port(tmp_path: Path, kv: KeyVaultTestServer, kv_env: dict[str, str]) -> Iterator[int]:
    from kvpki_cli.serve.app import build_app
    from kvpki_cli.serve.config import load_serve_config

    settings = _serve_home(tmp_path, kv)
    governor._registry.clear()  # init-ca's own signature does not count against the test
    apps = build_app(settings, load_serve_config(tmp_path / "serve.toml"))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(apps.https, access_log=None, handle_signals=False)
    port: list[int] = []
    started = threading.Event()

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port.append(runner.addresses[0][1])
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(20)
    try:
        yield port[0]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(20)
        apps.workers.shutdown()
        apps.publishing.shutdown()


def _enroll(port: int, cn: str) -> tuple[int, dict[str, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    body = base64.b64encode(csr.sign(key, hashes.SHA256()).public_bytes(Encoding.DER))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {
        "Content-Type": "application/pkcs10",
        "Authorization": "Basic " + base64.b64encode(b"alice:alice-secret").decode(),
    }
    try:
        connection.request("POST", "/.well-known/est/simpleenroll", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def test_serve_answers_503_with_retry_after_when_the_queue_passes_the_deadline(
    est_port: int, kv: KeyVaultTestServer
) -> None:
    kv.clear_log()
    status, _ = _enroll(est_port, "first")
    assert status == 200
    start = time.monotonic()
    status, headers = _enroll(est_port, "second")  # its turn is ~2.25 s away; its deadline 0.3 s
    assert status == 503
    assert time.monotonic() - start < 1.5  # refused at once, not after waiting for its turn
    assert 1 <= int(headers["retry-after"]) <= 3  # the governor's wait, not the configured 30
    assert sum(1 for e in kv.log if e.path.endswith("/sign")) == 1  # the refused request cost no signature
    time.sleep(float(headers["retry-after"]))
    assert _enroll(est_port, "third")[0] == 200  # the client that honours Retry-After gets its certificate
