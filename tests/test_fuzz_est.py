"""Fuzzing the EST handler: generated and mutated CSRs, in every body encoding, through a real aiohttp
server in this process (the app ``kvpki serve`` builds, on plain HTTP at 127.0.0.1).

The property: no request gets a 500; a 200 adds exactly one inventory row and a refusal none; every
server log line is one line with no control characters.  Default 1,000 requests (KVPKI_FUZZ_CASES
scales it).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import logging
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpki_cli.authority import CertificateAuthority, SigningRequest, init_ca
from kvpki_cli.config import Settings
from kvpki_cli.keystores.base import KeyType
from kvpki_cli.pki.csr import parse_csr
from kvpki_cli.pki.names import parse_san, parse_subject
from kvpki_cli.serve.app import build_app
from kvpki_cli.serve.config import load_serve_config
from kvpki_cli.serve.passwd import set_user
from kvpki_cli.textsafe import first_unsafe
from tests import csrforge as f
from tests import fuzzkit
from tests.fuzzkit import DEFAULT_EST_CASES, fuzz_cases

PASSWORD = "alice-fuzz-secret"
ALLOWED = {200, 400, 401, 403, 404, 405, 413, 415}
PATHS = ("/.well-known/est/simpleenroll", "/.well-known/est/srv/simpleenroll", "/.well-known/est/simplereenroll")


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Server:
    port: int
    rows: sqlite3.Connection
    log: LogLines

    def row_count(self) -> int:
        return int(self.rows.execute("SELECT count(*) FROM certificates WHERE ca = 'issuing'").fetchone()[0])

    def post(self, path: str, body: bytes, content_type: str, auth: str | None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": content_type, "Content-Transfer-Encoding": "base64"}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


def _write_server_files(home: Path, settings_: Settings) -> Path:
    """A TLS certificate (build_app loads one even though this test speaks plain HTTP), users, serve.toml."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = f.csr(key, f.name((f.OID_CN, f.UTF8, b"localhost")))
    issuing = CertificateAuthority.open(settings_, "issuing")
    request = SigningRequest(csr, parse_csr(csr), profile="server", sans=[parse_san("DNS:localhost")])
    issued = issuing.issue(request)
    (home / "server.pem").write_bytes(
        b"".join(c.public_bytes(Encoding.PEM) for c in [issued.certificate, *issued.chain])
    )
    (home / "server.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    set_user(home / "est-users", "alice", PASSWORD)
    (home / "serve.toml").write_text(
        '[server]\ntls_cert = "server.pem"\ntls_key = "server.key"\nusers_file = "est-users"\n'
        '[est.default]\nca = "issuing"\nprofile = "device"\nusers = ["alice"]\n'
        '[est.srv]\nca = "issuing"\nprofile = "server"\nusers = ["alice"]\n'
    )
    return home / "serve.toml"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("est-fuzz")
    settings_ = Settings(home)
    init_ca(settings_, "root", parse_subject("CN=EST Fuzz Root"), KeyType("ec-p256"))
    init_ca(settings_, "issuing", parse_subject("CN=EST Fuzz Issuing"), KeyType("ec-p256"), parent="root")
    apps = build_app(settings_, load_serve_config(_write_server_files(home, settings_)))
    log = LogLines()
    logging.getLogger("kvpki.serve").addHandler(log)
    logging.getLogger("kvpki.serve").setLevel(logging.INFO)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = web.AppRunner(apps.https, access_log=None, handle_signals=False)
    port: list[int] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port.append(runner.addresses[0][1])
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(20)
    rows = sqlite3.connect(home / "inventory.sqlite3")
    try:
        yield Server(port[0], rows, log)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(20)
        apps.workers.shutdown()
        logging.getLogger("kvpki.serve").removeHandler(log)
        rows.close()


def _body(der: bytes, encoding: int, rng: random.Random) -> bytes:
    """The ways clients (and attackers) send a CSR: base64 (lines or not), PEM with text before it, raw DER."""
    encoded = base64.b64encode(der)
    if encoding == 0:
        return b"".join(encoded[i : i + 64] + b"\n" for i in range(0, len(encoded), 64))
    if encoding == 1:
        return encoded
    if encoding == 2:
        return b"subject=x\n-----BEGIN CERTIFICATE REQUEST-----\n" + encoded + b"\n-----END CERTIFICATE REQUEST-----\n"
    if encoding == 3:
        return der
    return fuzzkit.mutate(encoded, rng)  # broken base64


def test_est_never_answers_500_and_refusals_record_nothing(server: Server) -> None:
    requests = fuzz_cases(DEFAULT_EST_CASES)
    fuzzkit.key_pool()
    statuses: Counter[int] = Counter()

    @settings(max_examples=requests // 2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(csr=fuzzkit.generated_csrs(), seed=st.integers(0, 2**32))
    def run(csr: fuzzkit.Generated, seed: int) -> None:
        rng = random.Random(seed)
        for der in (csr.der, *csr.mutants(rng, 1)):  # two requests per example: generated, then a mutant
            path = rng.choice(PATHS)
            content_type = rng.choice(("application/pkcs10",) * 8 + ("text/plain", "application/pkcs10; charset=x"))
            auth = rng.choice((f"alice:{PASSWORD}",) * 30 + (None, "alice:wrong", "ghost\n:x\x1b[2J"))
            before = server.row_count()
            status = server.post(path, _body(der, rng.randrange(5), rng), content_type, auth)
            statuses[status] += 1
            assert status in ALLOWED, (status, path, der.hex())
            assert server.row_count() == before + (1 if status == 200 else 0), (status, path)

    start = time.monotonic()
    run()
    print(f"EST: {sum(statuses.values())} requests in {time.monotonic() - start:.1f}s: {dict(statuses)}")
    assert sum(statuses.values()) >= requests
    assert statuses[200] > 0 and statuses[400] > 0 and statuses[403] > 0
    for line in server.log.lines:
        assert first_unsafe(line) is None, f"unescaped control character in log line {line!r}"
