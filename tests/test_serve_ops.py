"""Operations of `kvpki serve` (issue 9, item 4): /metrics, /healthz, JSON log lines.

/metrics is parsed with prometheus_client's own text parser (the format
Prometheus scrapes); counters must move after an enrollment, a bad CSR and a
rate-limit refusal, and the inventory gauges (CRL age, expiring certificates)
appear after the periodic computation.  /healthz answers 200, then 503 while
another process holds the SQLite inventory's write lock (or PostgreSQL is
stopped), then 200 again.  With ``log_format = "json"`` every log line is one
JSON object, hostile request text included.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import os
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvpki_cli.authority import CertificateAuthority, SigningRequest, init_ca
from kvpki_cli.config import Settings
from kvpki_cli.keystores.base import KeyType
from kvpki_cli.pki.csr import parse_csr
from kvpki_cli.pki.names import parse_san, parse_subject
from kvpki_cli.serve.logformat import JsonFormatter
from kvpki_cli.serve.logsafe import EscapingFilter
from kvpki_cli.serve.passwd import set_user
from kvpki_cli.textsafe import escape, first_unsafe
from tests import pg_fixture
from tests.kvserver.server import FaultRule, KeyVaultTestServer
from tests.test_rate_limits import Instance, base_env, csr_body, start_instances, stop_instances

OPS_LABELS = """
[est.limited]
ca = "issuing"
profile = "device"
users = ["alice", "edge"]
rate_limit = "2/1h"
"""
SERVER_EXTRA = 'log_format = "json"\nmetrics_interval = 0.5\n'


def get(instance: Instance, path: str, *, tls: bool = False) -> tuple[int, bytes]:
    if tls:
        context = ssl.create_default_context(cafile=str(instance.root_pem))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", instance.port, context=context, timeout=30
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", instance.http_port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def scrape(instance: Instance) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels), via the Prometheus text parser."""
    status, body = get(instance, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    home = tmp_path_factory.mktemp("ops")
    instances = start_instances(home, base_env(home), 1, OPS_LABELS, SERVER_EXTRA)
    yield instances[0]
    stop_instances(instances)


def test_metrics_counters_move_after_enrollment_and_refusals(ops: Instance) -> None:
    before = scrape(ops)
    assert ops.enroll("limited", "alice", csr_body("m-0"))[0] == 200
    assert ops.enroll("limited", "edge", b"bm90IGEgQ1NS")[0] == 400  # counts against edge's limit, not alice's
    assert ops.enroll("limited", "alice", csr_body("m-1"))[0] == 200
    assert ops.enroll("limited", "alice", csr_body("m-2"))[0] == 429
    after = scrape(ops)
    enrollments = "kvpki_est_enrollments_total"
    assert value(after, enrollments, label="limited", outcome="issued") - value(
        before, enrollments, label="limited", outcome="issued"
    ) == 2
    assert value(after, enrollments, label="limited", outcome="400") == value(
        before, enrollments, label="limited", outcome="400"
    ) + 1
    assert value(after, enrollments, label="limited", outcome="429") == 1
    assert value(after, "kvpki_est_rate_limited_total", label="limited", scope="identity") == 1
    assert value(after, "kvpki_signing_seconds_count", ca="issuing") >= 2
    assert value(after, "kvpki_signing_seconds_sum", ca="issuing") > 0
    assert ("kvpki_signing_queue_depth", ()) in after
    assert ("kvpki_vault_throttled_total", ()) in after  # present at 0 on a local-key server


def test_inventory_gauges_are_computed_periodically(ops: Instance) -> None:
    assert get(ops, "/crl/issuing.crl")[0] == 200  # stores a CRL
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(ops)
        age = samples.get(("kvpki_crl_age_seconds", (("ca", "issuing"),)))
        expiring = samples.get(("kvpki_certificates_expiring_30d", (("ca", "issuing"),)))
        if age is not None and expiring is not None:
            break
        assert time.monotonic() < deadline, samples
        time.sleep(0.2)
    assert 0 <= age < 600
    assert expiring == 0  # device certificates live a year
    assert value(samples, "kvpki_inventory_gauges_timestamp_seconds") > time.time() - 60


def test_metrics_are_not_served_on_the_https_port(ops: Instance) -> None:
    assert get(ops, "/metrics", tls=True)[0] == 404


def test_healthz_fails_while_the_sqlite_inventory_is_write_locked(ops: Instance) -> None:
    assert get(ops, "/healthz")[0] == 200
    assert get(ops, "/healthz", tls=True)[0] == 200
    time.sleep(1.1)  # past the cached answer
    holder = sqlite3.connect(ops.root_pem.parent / "inventory.sqlite3", timeout=10, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # what a stuck writer does: every enrollment would wait, then fail
    try:
        started = time.monotonic()
        status, body = get(ops, "/healthz")
        assert status == 503 and body == b"unavailable\n"
        assert time.monotonic() - started < 10
        assert get(ops, "/healthz", tls=True)[0] == 503
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    deadline = time.monotonic() + 10
    while get(ops, "/healthz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_healthz_fails_when_a_ca_key_is_missing(ops: Instance) -> None:
    key = ops.root_pem.parent / "cas" / "bootstrap" / "key.pem"
    if not key.exists():
        pytest.skip(f"unexpected local store layout: {key}")
    moved = key.with_name("key.pem.away")
    time.sleep(1.1)
    key.rename(moved)
    try:
        assert get(ops, "/healthz")[0] == 503
    finally:
        moved.rename(key)
    time.sleep(1.1)
    assert get(ops, "/healthz")[0] == 200
    assert "health: failing" in ops.log() and "health: ok again" in ops.log()


def test_json_log_lines_parse_and_stay_escaped(ops: Instance) -> None:
    assert ops.enroll("limited", "edge", csr_body("json-ok"))[0] == 200
    status, _ = get(ops, "/.well-known/est/%0a%1b%5B31mX/simpleenroll", tls=True)
    assert status in (404, 405)
    time.sleep(0.2)
    lines = ops.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "message"} <= set(entry) for entry in entries)
    issued = [e for e in entries if e.get("event") == "issued" and e.get("subject") == "CN=json-ok"]
    assert len(issued) == 1 and issued[0]["requester"] == "est-basic:edge" and issued[0]["label"] == "limited"
    assert any(e.get("message", "").startswith("rate limit") for e in entries)
    raw = ops.log()
    assert "\x1b" not in raw
    assert not any("\n" in e["message"] or "\x1b" in e["message"] for e in entries)


def restart_on_port(server: object, port: int) -> None:
    """Start the session's PostgreSQL again on the same port (the fixture would pick a new one)."""
    original = pg_fixture._free_port
    pg_fixture._free_port = lambda: port
    try:
        server.start(attempts=1)  # type: ignore[attr-defined]
    except RuntimeError:
        pg_fixture._free_port = original
        server.start()  # type: ignore[attr-defined]  # keep the session's server up for later tests
        pytest.skip("PostgreSQL could not restart on its old port; recovery not checked")
    finally:
        pg_fixture._free_port = original


def test_healthz_fails_while_postgresql_is_stopped(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: object
) -> None:
    url = postgres_server.create_database("health")  # type: ignore[attr-defined]
    home = tmp_path_factory.mktemp("ops-pg")
    instances = start_instances(home, base_env(home) | {"KVPKI_INVENTORY_URL": url}, 1, OPS_LABELS)
    try:
        (instance,) = instances
        assert get(instance, "/healthz")[0] == 200
        time.sleep(1.1)
        port = postgres_server.port  # type: ignore[attr-defined]
        postgres_server.stop()  # type: ignore[attr-defined]
        try:
            assert get(instance, "/healthz")[0] == 503
            assert get(instance, "/healthz", tls=True)[0] == 503
        finally:
            restart_on_port(postgres_server, port)
        deadline = time.monotonic() + 30
        while get(instance, "/healthz")[0] != 200:
            assert time.monotonic() < deadline, instance.log()
            time.sleep(0.3)
    finally:
        stop_instances(instances)




# ----------------------------------------------------------------------------- Key Vault CA, in process
def _vault_home(home: Path, kv: KeyVaultTestServer) -> Settings:
    settings = Settings(home)
    init_ca(settings, "tls", parse_subject("CN=TLS Root"), KeyType("ec-p256"))
    init_ca(
        settings, "vault", parse_subject("CN=Vault Root"), KeyType("ec-p256"),
        store="azure", store_settings={"vault_url": kv.url, "sign_rate": 50},
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    csr_der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )
    request = SigningRequest(csr_der, parse_csr(csr_der), profile="server", sans=[parse_san("DNS:localhost")])
    issued = CertificateAuthority.open(settings, "tls").issue(request)
    (home / "server.pem").write_bytes(issued.certificate.public_bytes(Encoding.PEM))
    (home / "server.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    set_user(home / "est-users", "alice", "alice-secret")
    (home / "serve.toml").write_text(
        '[server]\ntls_cert = "server.pem"\ntls_key = "server.key"\nusers_file = "est-users"\nhttp_port = 0\n'
        '[est.default]\nca = "vault"\nprofile = "device"\nusers = ["alice"]\n'
    )
    return settings


@pytest.fixture
def vault_ports(tmp_path: Path, kv: KeyVaultTestServer, kv_env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """(EST port without TLS, plain-HTTP port) of an in-process server whose CA key is in the test vault."""
    from kvpki_cli.serve.app import build_app
    from kvpki_cli.serve.config import load_serve_config

    apps = build_app(_vault_home(tmp_path, kv), load_serve_config(tmp_path / "serve.toml"))
    assert apps.http is not None
    loop = asyncio.new_event_loop()
    runners = [web.AppRunner(app, access_log=None, handle_signals=False) for app in (apps.https, apps.http)]
    ports: list[int] = []
    started = threading.Event()

    async def start() -> None:
        for runner in runners:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            ports.append(runner.addresses[0][1])
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(20)
    try:
        yield ports[0], ports[1]
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(20)
        apps.shutdown()


def _plain(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {
        "Content-Type": "application/pkcs10",
        "Authorization": "Basic " + base64.b64encode(b"alice:alice-secret").decode(),
    }
    try:
        connection.request(method, path, body=body, headers=headers if body is not None else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _plain(port, "GET", "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_vault_requests_throttles_and_retries_are_counted_and_healthz_follows_the_vault(
    vault_ports: tuple[int, int], kv: KeyVaultTestServer
) -> None:
    est, plain = vault_ports
    kv.set_faults(rules=[FaultRule(status=429, retry_after="0", path_contains="/sign", count=1)])
    status, body = _plain(est, "POST", "/.well-known/est/simpleenroll", csr_body("vault-1"))
    assert status == 200, body
    samples = _samples(plain)
    assert value(samples, "kvpki_vault_requests_total", status="429") >= 1
    assert value(samples, "kvpki_vault_requests_total", status="200") >= 1
    assert value(samples, "kvpki_vault_throttled_total") >= 1
    assert value(samples, "kvpki_vault_retries_total", reason="429") >= 1
    assert value(samples, "kvpki_est_enrollments_total", label="default", outcome="issued") == 1
    assert _plain(plain, "GET", "/healthz")[0] == 200

    kv.set_faults(rules=[FaultRule(status=503, path_contains="/sign", count=None)])  # the vault is down
    assert _plain(est, "POST", "/.well-known/est/simpleenroll", csr_body("vault-2"))[0] == 503
    assert value(_samples(plain), "kvpki_vault_requests_total", status="503") >= 1
    time.sleep(1.1)
    assert _plain(plain, "GET", "/healthz")[0] == 503
    assert _plain(est, "GET", "/healthz")[0] == 503

    kv.set_faults()
    assert _plain(est, "POST", "/.well-known/est/simpleenroll", csr_body("vault-3"))[0] == 200
    time.sleep(1.1)
    assert _plain(plain, "GET", "/healthz")[0] == 200


LOG_CASES = int(os.environ.get("KVPKI_FUZZ_CASES", "200"))


@settings(max_examples=LOG_CASES, deadline=None)
@given(message=st.text(), fields=st.dictionaries(st.text(max_size=8), st.one_of(st.text(), st.integers())))
def test_json_log_lines_stay_one_escaped_line_whatever_the_text(message: str, fields: dict[str, object]) -> None:
    """Any message and field text: one line, valid JSON, no unsafe character after decoding either."""
    record = logging.LogRecord("kvpki.serve", logging.INFO, __file__, 1, "%s", (message,), None)
    record.fields = fields
    EscapingFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and line.isascii()
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["message"] == escape(message)
    assert first_unsafe(entry["message"]) is None
    for key, value in entry.items():
        assert first_unsafe(key) is None
        assert not isinstance(value, str) or first_unsafe(value) is None
