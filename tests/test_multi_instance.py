"""Several `kvpki serve` instances on one PostgreSQL inventory (issue 8, goal 4).

Three real `kvpki serve` processes share a KVPKI_HOME and a real PostgreSQL
(tests/pg_fixture.py).  Client threads spread enrollments over them while
revocations (the CLI, and direct inventory writes as another process would make)
happen during the run.  Checked: no duplicate serials, no lost rows, every
revocation in all three instances' OCSP answers within 1 s, every CRL an instance
served is the one stored in the inventory (signed by exactly one process), one CA
signature per revocation state, and identical CRL bytes from all three (and from
`kvpki crl`) at the end.

``KVPKI_MULTI_ENROLLMENTS`` sets the enrollment count (default 2,000, the issue's
figure: about 20 s on a loaded 2-core machine); the test prints its measurements.
"""

from __future__ import annotations

import base64
import http.client
import os
import random
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from kvpki_cli.authority import CertificateAuthority, SigningRequest, init_ca
from kvpki_cli.config import Settings
from kvpki_cli.crl_publish import published_crl
from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import StoredCrl
from kvpki_cli.keystores.base import KeyType
from kvpki_cli.pki.csr import parse_csr
from tests import servekit
from tests.helpers import ec_csr_pem

ENROLLMENTS = int(os.environ.get("KVPKI_MULTI_ENROLLMENTS", "2000"))
REVOCATIONS = 50
CLI_REVOCATIONS = 5  # of the 50, made by `kvpki revoke` processes; the rest by direct inventory writes
INSTANCES = 3
CLIENT_THREADS = 6
OCSP_DEADLINE_S = 1.0


@dataclass
class Instance:
    port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Fleet:
    home: Path
    env: dict[str, str]
    url: str
    instances: list[Instance]
    issuer: x509.Certificate = field(init=False)

    def kvpki(self, *args: str) -> bytes:
        result = subprocess.run([*servekit.KVPKI, *args], capture_output=True, env=self.env, timeout=120)
        assert result.returncode == 0, f"kvpki {' '.join(args)}: {result.stderr.decode()}"
        return result.stdout


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_server: object) -> Iterator[Fleet]:
    url = postgres_server.create_database("multi")  # type: ignore[attr-defined]
    home = tmp_path_factory.mktemp("multi")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(servekit.REPO), "KVPKI_INVENTORY_URL": url})
    env.update({"NO_PROXY": "*", "no_proxy": "*"})
    ports = [(servekit.free_port(), servekit.free_port()) for _ in range(INSTANCES)]
    servekit._prepare(home, env, *ports[0])
    template = (home / "serve.toml").read_text()
    instances = []
    for index, (port, http_port) in enumerate(ports):
        config = home / f"serve-{index}.toml"
        config.write_text(
            re.sub(r"(?m)^http_port = \d+$", f"http_port = {http_port}",
                   re.sub(r"(?m)^port = \d+$", f"port = {port}", template))
        )  # fmt: skip
        log_path = home / f"serve-{index}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*servekit.KVPKI, "serve", "--config", str(config)], stdout=log, stderr=log, env=env, cwd=home
            )
        instances.append(Instance(port, http_port, process, log_path))
    try:
        deadline = time.monotonic() + 60
        for instance in instances:
            while "listening on https" not in instance.log_path.read_text():
                if instance.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"kvpki serve did not start: {instance.log_path.read_text()}")
                time.sleep(0.05)
        fleet = Fleet(home, env, url, instances)
        fleet.issuer = x509.load_der_x509_certificate(http_get(instances[0], "/ca/issuing.crt"))
        yield fleet
    finally:
        for instance in instances:
            instance.process.terminate()
        for instance in instances:
            try:
                instance.process.wait(10)
            except subprocess.TimeoutExpired:
                instance.process.kill()


def http_get(instance: Instance, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", instance.http_port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body)
        return body
    finally:
        connection.close()


class OcspClient:
    """Keep-alive OCSP POSTs to one instance's plain-HTTP port."""

    def __init__(self, instance: Instance, issuer: x509.Certificate) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", instance.http_port, timeout=30)
        self.issuer = issuer

    def status(self, certificate: x509.Certificate) -> ocsp.OCSPCertStatus:
        request = ocsp.OCSPRequestBuilder().add_certificate(certificate, self.issuer, hashes.SHA1()).build()
        headers = {"Content-Type": "application/ocsp-request"}
        self.connection.request("POST", "/ocsp/issuing", request.public_bytes(Encoding.DER), headers)
        response = self.connection.getresponse()
        body = response.read()
        assert response.status == 200
        parsed = ocsp.load_der_ocsp_response(body)
        assert parsed.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        return parsed.certificate_status


def make_csrs(count: int) -> list[bytes]:
    csrs = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"multi-{index:05d}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        csrs.append(csr.public_bytes(Encoding.DER))
    return csrs


class Enroller:
    """One client thread's keep-alive TLS connections, one per instance, Basic-authenticated."""

    def __init__(self, fleet: Fleet) -> None:
        context = ssl.create_default_context(cafile=str(fleet.home / "root.pem"))
        self.connections = [
            http.client.HTTPSConnection("127.0.0.1", instance.port, context=context, timeout=60)
            for instance in fleet.instances
        ]
        secret = base64.b64encode(f"alice:{servekit.PASSWORDS['alice']}".encode()).decode()
        self.headers = {"Content-Type": "application/pkcs10", "Authorization": f"Basic {secret}"}

    def enroll(self, instance: int, csr_der: bytes) -> x509.Certificate:
        connection = self.connections[instance]
        connection.request("POST", "/.well-known/est/simpleenroll", base64.b64encode(csr_der), self.headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        (certificate,) = servekit.pkcs7_certificates(body)
        assert isinstance(certificate, x509.Certificate)
        return certificate


def crl_number(der: bytes) -> int:
    return x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_three_instances_one_postgresql(fleet: Fleet) -> None:
    csrs = make_csrs(ENROLLMENTS)
    issued: list[x509.Certificate] = []
    issued_lock = threading.Lock()
    enrolled_all = threading.Event()
    served_crls: list[bytes] = []
    delays: list[float] = []
    revoked: dict[int, x509.Certificate] = {}
    inventory = open_inventory(fleet.url, fleet.home)

    progress = threading.Condition()
    revocations_done = 0

    def revoked_at_least(count: int) -> bool:
        return revocations_done >= count

    def client(thread: int) -> None:
        """Enrollments run at most one slice ahead of the revocations, so both interleave all along."""
        enroller = Enroller(fleet)
        for index in range(thread, ENROLLMENTS, CLIENT_THREADS):
            due = index * (REVOCATIONS + 2) // ENROLLMENTS - 1
            with progress:
                assert progress.wait_for(partial(revoked_at_least, due), timeout=120), "the revoker stopped"
            certificate = enroller.enroll(index % INSTANCES, csrs[index])
            with issued_lock:
                issued.append(certificate)

    def revoker() -> None:
        """Spread over the run: check 'good' everywhere (cached), revoke, time until all say 'revoked'."""
        ocsp_clients = [OcspClient(instance, fleet.issuer) for instance in fleet.instances]
        nonlocal revocations_done
        rng = random.Random(8)
        for number in range(REVOCATIONS):
            target = (number + 1) * ENROLLMENTS // (REVOCATIONS + 2)
            while len(issued) < target and not enrolled_all.is_set():
                time.sleep(0.01)
            with issued_lock:
                candidates = [c for c in issued if c.serial_number not in revoked]
            certificate = rng.choice(candidates)
            assert all(c.status(certificate) == ocsp.OCSPCertStatus.GOOD for c in ocsp_clients)
            serial = format(certificate.serial_number, "x")
            if number % (REVOCATIONS // CLI_REVOCATIONS) == 0:
                fleet.kvpki("revoke", serial, "--ca", "issuing", "--reason", "keyCompromise")
            else:
                inventory.revoke("issuing", serial, datetime.now(UTC), "keyCompromise")
            committed = time.monotonic()
            revoked[certificate.serial_number] = certificate
            waiting = set(range(INSTANCES))
            while waiting:
                for index in sorted(waiting):
                    if ocsp_clients[index].status(certificate) == ocsp.OCSPCertStatus.REVOKED:
                        delays.append(time.monotonic() - committed)
                        waiting.discard(index)
                assert time.monotonic() - committed < 10, f"revocation of {serial} not visible on {waiting}"
            with ThreadPoolExecutor(INSTANCES) as pool:  # all instances fetch the new CRL at once
                served_crls.extend(pool.map(lambda i: http_get(i, "/crl/issuing.crl"), fleet.instances))
            with progress:
                revocations_done += 1
                progress.notify_all()

    start = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS + 1) as pool:
        revoking = pool.submit(revoker)
        clients = [pool.submit(client, thread) for thread in range(CLIENT_THREADS)]
        for future in clients:
            future.result()
        enrolled = time.monotonic() - start
        revoked_while_enrolling = len(revoked)
        enrolled_all.set()
        revoking.result()
    elapsed = time.monotonic() - start

    # 0 duplicate serials, 0 lost rows: what clients got is exactly what the inventory holds.
    serials = [c.serial_number for c in issued]
    assert len(serials) == ENROLLMENTS and len(set(serials)) == ENROLLMENTS
    rows = inventory.list_certificates("issuing", None, datetime.now(UTC))
    recorded = {int(r.serial, 16): r for r in rows if r.requester == "est-basic:alice"}
    assert set(recorded) == set(serials)
    assert all(recorded[c.serial_number].der == c.public_bytes(Encoding.DER) for c in issued)
    assert {s for s, r in recorded.items() if r.status == "revoked"} == set(revoked)

    # Every revocation in every instance's OCSP answers within 1 s.
    assert len(delays) == REVOCATIONS * INSTANCES
    assert max(delays) < OCSP_DEADLINE_S, f"slowest OCSP visibility {max(delays):.3f} s"

    # Identical CRL bytes from all three instances, and from `kvpki crl` (the stored one, not re-signed).
    finals = [http_get(instance, "/crl/issuing.crl") for instance in fleet.instances]
    assert finals[0] == finals[1] == finals[2]
    final = x509.load_der_x509_crl(finals[0])
    assert final.is_signature_valid(fleet.issuer.public_key())  # type: ignore[arg-type]
    assert {entry.serial_number for entry in final} == set(revoked)
    assert fleet.kvpki("crl", "--ca", "issuing", "--format", "der", "--next-update", "1d") == finals[0]

    # One CA signature per CRL change: every CRL number ever taken (one per signature) is a stored CRL,
    # each stored CRL records a different revocation state, and instances served only stored bytes.
    stored = inventory._query(  # type: ignore[attr-defined]
        "SELECT number, revocations, der FROM kvpki_crls WHERE ca = %s ORDER BY number", ("issuing",)
    )
    taken = inventory._query("SELECT last FROM kvpki_crl_numbers WHERE ca = %s", ("issuing",))[0][0]  # type: ignore[attr-defined]
    numbers = [row[0] for row in stored]
    assert numbers == list(range(1, taken + 1)), f"signed {taken} CRLs, stored {numbers}"
    assert len({row[1] for row in stored}) == len(stored), "two CRLs signed for one revocation state"
    assert len(stored) <= REVOCATIONS + 1
    by_number = {row[0]: bytes(row[2]) for row in stored}
    for der in [*served_crls, *finals]:
        assert by_number[crl_number(der)] == der
    fetches_per_state = len(served_crls) / len(stored)
    inventory.close()

    print(
        f"\n{ENROLLMENTS} enrollments over {INSTANCES} instances in {enrolled:.1f} s"
        f" ({ENROLLMENTS / enrolled:.0f}/s, {CLIENT_THREADS} client threads); whole run {elapsed:.1f} s;"
        f" {REVOCATIONS} revocations ({CLI_REVOCATIONS} by `kvpki revoke`, {revoked_while_enrolling} while enrolling):"
        f" OCSP on all instances after"
        f" max {max(delays) * 1000:.0f} ms, median {sorted(delays)[len(delays) // 2] * 1000:.0f} ms;"
        f" {len(stored)} CRLs signed for {len(served_crls)} instance CRL fetches"
        f" ({fetches_per_state:.1f} fetches per signature)"
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def inventory_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inventory.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


def test_processes_share_one_stored_crl(inventory_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Racing publishers (own connections, as separate processes have) sign once per revocation state."""
    monkeypatch.setenv("KVPKI_INVENTORY_URL", inventory_url)
    settings = Settings(tmp_path / "home")
    init_ca(settings, "root", x509.Name.from_rfc4514_string("CN=Shared CRL Root"), KeyType("ec-p256"))
    ca = CertificateAuthority.open(settings, "root")
    csrs = [ec_csr_pem(f"dev-{i}") for i in range(4)]
    serials = [
        format(item.certificate.serial_number, "x")
        for item in ca.issue_many([SigningRequest(pem, parse_csr(pem)) for pem in csrs])
    ]
    signatures = 0

    def publish(_: int) -> StoredCrl:
        """Another process: its own CA object and inventory connection (SQLite's may not cross threads)."""
        inventory = open_inventory(inventory_url, settings.home)
        try:
            return published_crl(CertificateAuthority.open(settings, "root", inventory), day)
        finally:
            inventory.close()

    real_crl_der = CertificateAuthority.crl_der

    def counting_crl_der(self: CertificateAuthority, next_update: timedelta, *scope: int | None) -> bytes:
        nonlocal signatures
        signatures += 1  # under the lock: no race on the counter
        return real_crl_der(self, next_update, *scope)

    monkeypatch.setattr(CertificateAuthority, "crl_der", counting_crl_der)
    day = timedelta(days=1)
    for round_number, serial in enumerate([None, *serials[:2]]):
        if serial is not None:
            ca.revoke(serial, "keyCompromise")
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(publish, range(6)))
        assert len({r.der for r in results}) == 1
        assert signatures == round_number + 1
    # The operator's command: the stored CRL while current; a new one for --new or another validity.
    first = published_crl(ca, day, exact_validity=True)
    assert published_crl(ca, day, exact_validity=True) == first and signatures == 3
    forced = published_crl(ca, day, exact_validity=True, new=True)
    assert forced.number > first.number and signatures == 4
    week = published_crl(ca, timedelta(days=7), exact_validity=True)
    assert week.number > forced.number and signatures == 5
    assert publish(0) == week  # serve takes whichever current CRL is stored
    assert {e.serial_number for e in x509.load_der_x509_crl(week.der)} == {int(s, 16) for s in serials[:2]}
