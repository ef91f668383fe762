"""A live `kvpki serve` for tests: throwaway KVPKI_HOME, CAs, TLS certificate, users, labels.

The server runs as a subprocess (the real CLI) on 127.0.0.1 and a free port; its
stderr goes to a log file the tests can read.  Every certificate it uses is
issued by kvpki itself (server certificate with SAN IP:127.0.0.1 and DNS:localhost).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import openssl

REPO = Path(__file__).resolve().parent.parent
KVPKI = [sys.executable, "-m", "kvpki_cli"]
PASSWORDS = {"alice": "alice-secret-1", "edge": "edge-secret-22", "mallory": "mallory-pass-3"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EstServer:
    """Paths and helpers around one running server."""

    home: Path
    env: dict[str, str]
    port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def root_pem(self) -> Path:
        return self.home / "root.pem"

    def kvpki(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([*KVPKI, *args], input=input, capture_output=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kvpki {' '.join(args)} failed: {result.stderr.decode()}")
        return result

    def inventory(self, ca: str = "issuing") -> list[dict[str, object]]:
        return json.loads(self.kvpki("list", "--ca", ca, "--json").stdout)  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text()


def _write_config(home: Path, port: int, http_port: int) -> None:
    (home / "config.toml").write_text(f'[defaults]\nbase_url = "http://127.0.0.1:{http_port}"\n')
    (home / "serve.toml").write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
http_port = {http_port}
tls_cert = "server-chain.pem"
tls_key = "server.key"
users_file = "est-users"
realm = "kvpki test"
signing_concurrency = 4
max_body_bytes = 65536

[est.default]
ca = "issuing"
profile = "device"
users = ["alice", "edge"]
client_cas = ["bootstrap.pem"]
identity_cas = ["est-identity"]    # IoT Edge device-ID enrollment with its EST identity certificate

[est.edge-ca]
ca = "issuing"
profile = "edge-ca"
users = ["edge"]
allow_password_for_ca = true       # the explicit opt-in (tests/test_serve_auth_hardening.py checks the refusal)
identity_cas = ["est-identity"]
identity_profiles = ["device"]
identity_cn = ["{{cn}}", "aziot-edge CA {{cn}}"]

[est.est-id]
ca = "est-identity"
profile = "device"
client_cas = ["bootstrap.pem"]

[est.edge-ca-one-ca]
ca = "issuing"
profile = "edge-ca"
identity_cas = ["issuing"]         # one CA for everything: the recorded profile decides renewal vs. authority
identity_profiles = ["device"]

[est.other]
ca = "issuing"
profile = "device"
users = ["mallory"]
"""
    )


def _prepare(home: Path, env: dict[str, str], port: int, http_port: int) -> None:
    def run(*args: str, input: bytes | None = None) -> bytes:
        result = subprocess.run([*KVPKI, *args], input=input, capture_output=True, env=env, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"kvpki {' '.join(args)} failed: {result.stderr.decode()}")
        return result.stdout

    _write_config(home, port, http_port)
    (home / "root.pem").write_bytes(run("init-ca", "--name", "root", "--subject", "CN=Test Root,O=kvpki"))
    run("init-ca", "--name", "issuing", "--parent", "root", "--subject", "CN=Test Issuing CA,O=kvpki")
    (home / "bootstrap.pem").write_bytes(run("init-ca", "--name", "bootstrap", "--subject", "CN=Bootstrap CA"))
    run("init-ca", "--name", "est-identity", "--parent", "root", "--subject", "CN=Test EST Identity CA,O=kvpki")
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(home / "server.key"), "-subj", "/CN=localhost", "-out", str(home / "server.csr"),
    )  # fmt: skip
    chain = run(
        "sign-csr", str(home / "server.csr"), "--ca", "issuing", "--profile", "server",
        "--san", "IP:127.0.0.1", "--san", "DNS:localhost", "--chain",
    )  # fmt: skip
    (home / "server-chain.pem").write_bytes(chain)
    for user, password in PASSWORDS.items():
        run("serve-passwd", str(home / "est-users"), user, "--password-stdin", input=password.encode() + b"\n")


@pytest.fixture(scope="module")
def est_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EstServer]:
    """A running `kvpki serve`: CAs root -> issuing, root -> est-identity, a bootstrap CA; five labels."""
    home = tmp_path_factory.mktemp("serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(REPO), "NO_PROXY": "*", "no_proxy": "*"})
    port, http_port = free_port(), free_port()
    _prepare(home, env, port, http_port)
    server = start_serve(home, env, port, http_port)
    try:
        yield server
    finally:
        stop_serve(server)


def start_serve(
    home: Path, env: dict[str, str], port: int, http_port: int, preexec_fn: Callable[[], None] | None = None
) -> EstServer:
    """Start `kvpki serve --config home/serve.toml` and wait (20 s at most) until it listens."""
    log_path = home / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*KVPKI, "serve", "--config", str(home / "serve.toml")], stdout=log, stderr=log, env=env, cwd=home,
            preexec_fn=preexec_fn,
        )  # fmt: skip
    server = EstServer(home, env, port, http_port, process, log_path)
    deadline = time.monotonic() + 20
    while "listening on https" not in server.log():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"kvpki serve did not start: {server.log()}")
        time.sleep(0.05)
    return server


def stop_serve(server: EstServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    raw_headers: str
    body: bytes
    curl_rc: int = 0


def curl(
    server: EstServer,
    path: str,
    *,
    data: bytes | None = None,
    user: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    headers: tuple[str, ...] = (),
    method: str | None = None,
) -> HttpResult:
    """One request with curl, the way a script or a device would send it."""
    work = server.home / "curl"
    work.mkdir(exist_ok=True)
    tag = f"{time.monotonic_ns()}"
    body_path, header_path = work / f"{tag}.body", work / f"{tag}.hdr"
    args = ["curl", "-sS", "--cacert", str(server.root_pem), "-o", str(body_path), "-D", str(header_path)]
    args += ["-w", "%{http_code}", "--max-time", "30"]
    if data is not None:
        data_path = work / f"{tag}.req"
        data_path.write_bytes(data)
        args += ["--data-binary", f"@{data_path}"]
    if user:
        args += ["-u", f"{user}:{PASSWORDS.get(user, 'wrong-password')}"]
    if cert and key:
        args += ["--cert", str(cert), "--key", str(key)]
    if method:
        args += ["-X", method]
    for header in headers:
        args += ["-H", header]
    result = subprocess.run([*args, server.url + path], capture_output=True, timeout=60)
    raw = header_path.read_text() if header_path.exists() else ""
    parsed = {}
    for line in raw.splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            parsed[name.strip().lower()] = value.strip()
    status = int(result.stdout or b"0")
    body = body_path.read_bytes() if body_path.exists() else b""
    return HttpResult(status, parsed, raw, body, result.returncode)


def est_body(csr_der: bytes) -> bytes:
    """What IoT Edge sends: base64 wrapped at 64 characters with LF."""
    import base64

    encoded = base64.b64encode(csr_der)
    return b"".join(encoded[i : i + 64] + b"\n" for i in range(0, len(encoded), 64))


EDGE_HEADERS = ("Content-Type: application/pkcs10", "content-transfer-encoding: base64")


def make_key_csr(directory: Path, name: str, subject: str, *extra: str, rsa: bool = False) -> tuple[Path, bytes]:
    """An openssl key and DER CSR (``extra`` adds e.g. ``-addext`` options)."""
    key = directory / f"{name}.key"
    newkey = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    out = openssl("req", "-new", *newkey, "-nodes", "-keyout", str(key), "-subj", subject, "-outform", "DER", *extra)
    return key, out.stdout


def pkcs7_certificates(body: bytes) -> list[Any]:
    """Decode an EST response the way IoT Edge does (strip whitespace, base64, DER PKCS#7)."""
    import base64

    from cryptography.hazmat.primitives.serialization import pkcs7

    return list(pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(body.split()))))
