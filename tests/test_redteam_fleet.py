"""Red team of the fleet features (issues 8 and 9): hostile values at every new boundary.

Each test names the attack; a refusal is a documented exit code or a 4xx, never exit 1,
a 500, a hang, a leaked token or an unbounded metric/inventory field.
"""

from __future__ import annotations

import base64
import http.client
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from kvpki_cli.errors import UsageError
from kvpki_cli.fileutil import read_secret_file
from kvpki_cli.textsafe import MAX_REQUESTER, requester_text
from tests import servekit
from tests.conftest import KVPKI, Kvpki

est_server = servekit.est_server  # the module-scoped live server fixture


# --------------------------------------------------------------------------- files that hang


def test_passphrase_file_regular_pipe_and_late_fifo_writer_work(tmp_path: Path) -> None:
    regular = tmp_path / "pass"
    regular.write_bytes(b"secret\n")
    assert read_secret_file(regular, 64) == b"secret\n"
    read_end, write_end = os.pipe()  # what `<(cat pass)` hands over as /dev/fd/N
    os.write(write_end, b"piped\n")
    os.close(write_end)
    try:
        assert read_secret_file(Path(f"/dev/fd/{read_end}"), 64, timeout=5) == b"piped\n"
    finally:
        os.close(read_end)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def late_writer() -> None:
        time.sleep(0.3)
        with fifo.open("wb") as handle:
            handle.write(b"late\n")

    writer = threading.Thread(target=late_writer)
    writer.start()
    try:
        assert read_secret_file(fifo, 64, timeout=10) == b"late\n"
    finally:
        writer.join()


@pytest.mark.parametrize("kind", ["fifo-without-writer", "device", "directory", "oversized-pipe"])
def test_passphrase_file_that_would_hang_or_flood_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    keep: list[int] = []
    if kind == "fifo-without-writer":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        read_end, write_end = os.pipe()
        os.write(write_end, b"x" * 200)
        keep += [read_end, write_end]
        path = Path(f"/dev/fd/{read_end}")
    started = time.monotonic()
    try:
        with pytest.raises(OSError):
            read_secret_file(path, 64, timeout=0.5)
    finally:
        for fd in keep:
            os.close(fd)
    assert time.monotonic() - started < 5


def _kvpki_env(home: Path, **extra: str) -> dict[str, str]:
    from tests.conftest import make_env

    env = make_env(home)
    env.update(extra)
    return env


@pytest.mark.parametrize("target", ["serve-config", "passphrase-file"])
def test_cli_given_a_fifo_exits_2_instead_of_hanging(local_kvpki: Kvpki, tmp_path: Path, target: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if target == "serve-config":
        args, env = ["serve", "--config", str(fifo)], _kvpki_env(local_kvpki.home)
    else:
        local_kvpki.init_ca("root", "--subject", "CN=R")
        args = ["crl", "--ca", "root"]
        env = _kvpki_env(local_kvpki.home, KVPKI_LOCAL_PASSPHRASE_FILE=str(fifo))
        from kvpki_cli import fileutil

        assert fileutil.SECRET_PIPE_TIMEOUT_S <= 10  # the subprocess waits at most this long for a writer
    result = subprocess.run([*KVPKI, *args], capture_output=True, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == b"" and result.stderr.decode().count("\n") == 1
    assert b"pipe" in result.stderr or b"regular file" in result.stderr


@pytest.mark.parametrize("fifo_as", ["tls_cert", "tls_key", "ocsp_cert", "ocsp_key"])
def test_serve_config_files_that_are_fifos_exit_2(local_kvpki: Kvpki, tmp_path: Path, fifo_as: str) -> None:
    kvpki = local_kvpki
    (tmp_path / "file.pem").write_bytes(kvpki.init_ca("root", "--subject", "CN=R"))  # parses; never served
    os.mkfifo(tmp_path / "fifo")
    names = ("tls_cert", "tls_key", "ocsp_cert", "ocsp_key")
    files = {name: "fifo" if name == fifo_as else "file.pem" for name in names}
    (tmp_path / "serve.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 1\ntls_cert = "{files["tls_cert"]}"\ntls_key = "{files["tls_key"]}"\n'
        f'[est.default]\nca = "root"\nprofile = "device"\nclient_cas = []\n'
        + (f'[ocsp.root]\ncert = "{files["ocsp_cert"]}"\nkey = "{files["ocsp_key"]}"\n' if "ocsp" in fifo_as else "")
    )
    result = subprocess.run([*KVPKI, "serve", "--config", str(tmp_path / "serve.toml")], capture_output=True,
                            env=_kvpki_env(kvpki.home), timeout=60, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr and b"regular file" in result.stderr


# --------------------------------------------------------------------------- DPS: where the token goes


@pytest.mark.parametrize(
    "url",
    [
        "http://my-dps.azure-devices-provisioning.net",  # plain HTTP: token in clear
        "https://evil.example",  # any other host gets a DPS-audience bearer token
        "https://my-dps.azure-devices-provisioning.net.evil.example",
        "https://evil.example#.azure-devices-provisioning.net",
        "https://evil.example?x=.azure-devices-provisioning.net",
        "https://my-dps.azure-devices-provisioning.net@evil.example",
        "https://evil.example\\@my-dps.azure-devices-provisioning.net",
        "https://a.b.azure-devices-provisioning.net",  # one DPS name label only
        "https://azure-devices-provisioning.net",
        "https://my-dps.azure-devices-provisioning.net:99999",  # invalid port: no traceback
        "https://my-dps.azure-devices-provisioning.net:x",
        "https://my-dps.azure-devices-provisioning.net/enrollments",
        "https://[::1",
        "https://\u0430zure.azure-devices-provisioning.net",  # Cyrillic a
        "https://127.0.0.1",  # loopback too: only with an explicit allowance
    ],
)
def test_dps_url_refuses_every_host_but_dps(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvpki_cli.dps import check_dps_url

    monkeypatch.delenv("KVPKI_DPS_ALLOWED_HOSTS", raising=False)
    with pytest.raises(UsageError):
        check_dps_url(url)


@pytest.mark.parametrize(
    ("url", "allowed", "expected"),
    [
        ("https://my-dps.azure-devices-provisioning.net", "", "https://my-dps.azure-devices-provisioning.net"),
        ("https://My-DPS.Azure-Devices-Provisioning.NET/", "", "https://my-dps.azure-devices-provisioning.net"),
        ("https://my-dps.azure-devices-provisioning.net:443", "", "https://my-dps.azure-devices-provisioning.net:443"),
        ("https://127.0.0.1:8443", "127.0.0.1", "https://127.0.0.1:8443"),
        ("https://dps-emulator.local", "other, DPS-EMULATOR.local", "https://dps-emulator.local"),
    ],
)
def test_dps_url_accepts_dps_and_explicitly_allowed_hosts(
    url: str, allowed: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvpki_cli.dps import check_dps_url

    monkeypatch.setenv("KVPKI_DPS_ALLOWED_HOSTS", allowed)
    assert check_dps_url(url) == expected


def test_revoke_with_foreign_dps_host_changes_nothing(local_kvpki: Kvpki, make_csr) -> None:  # type: ignore[no-untyped-def]
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=R")
    cert = x509.load_pem_x509_certificate(kvpki.ok("sign-csr", "--ca", "root", input=make_csr("/CN=dev-1").csr_pem))
    serial = format(cert.serial_number, "x")
    result = kvpki.run("revoke", serial, "--ca", "root", "--dps", "https://collector.example")
    assert result.returncode == 2 and b"KVPKI_DPS_ALLOWED_HOSTS" in result.stderr and result.stdout == b""
    assert [row["status"] for row in kvpki.inventory("root")] == ["valid"]  # checked before revoking


# --------------------------------------------------------------------------- requester: escaped and bounded


@pytest.mark.parametrize(
    "requester",
    ["cli:alice", "A" * MAX_REQUESTER, "B" * (MAX_REQUESTER + 1), "x\n" * 5000, "\x1b[31m" * 300, "é" * 100_000],
)
def test_requester_text_is_escaped_and_bounded(requester: str) -> None:
    text = requester_text(requester)
    assert len(text) <= MAX_REQUESTER and text.isprintable()
    if len(requester) <= MAX_REQUESTER and requester.isprintable():
        assert text == requester


def test_inventory_requester_of_every_command_is_capped(local_kvpki: Kvpki, make_csr) -> None:  # type: ignore[no-untyped-def]
    """KVPKI_REQUESTER of 20 kB with an escape sequence: sign-csr, init-ocsp-responder, dps-verification."""
    kvpki = local_kvpki
    kvpki.init_ca("root", "--subject", "CN=R")
    kvpki.env = {**kvpki.env, "KVPKI_REQUESTER": "ops\x1b[2J\n" + "R" * 20_000}
    kvpki.ok("sign-csr", "--ca", "root", input=make_csr("/CN=dev-2").csr_pem)
    kvpki.ok("init-ocsp-responder", "--ca", "root")
    kvpki.ok("dps-verification", "--ca", "root", "--code", "ABC123")
    rows = [row for row in kvpki.inventory("root") if row["profile"] != "root-ca"]
    assert len(rows) == 3
    for row in rows:
        requester = str(row["requester"])
        assert len(requester) <= MAX_REQUESTER and requester.isprintable(), row["profile"]
        assert requester.startswith("ops\\x1b[2J\\x0a")


# --------------------------------------------------------------------------- serve: OCSP, partition CRLs, metrics


def _get(server: servekit.EstServer, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        headers = {"Content-Type": "application/ocsp-request"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(servekit_encoding())


def servekit_encoding(pem: bool = False):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM if pem else Encoding.DER


@pytest.fixture(scope="module")
def issued(est_server: servekit.EstServer) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """(leaf of issuing, issuing CA certificate, root CA certificate)."""
    _key, csr = servekit.make_key_csr(est_server.home, "ocsp-leaf", "/CN=ocsp-leaf")
    csr_pem = x509.load_der_x509_csr(csr).public_bytes(servekit_encoding(pem=True))
    pem = est_server.kvpki("sign-csr", "--ca", "issuing", input=csr_pem).stdout
    leaf = x509.load_pem_x509_certificate(pem)
    chain = x509.load_pem_x509_certificates(est_server.kvpki("get-ca", "--ca", "issuing", "--chain").stdout)
    return leaf, chain[0], chain[-1]


HOSTILE_OCSP_PATHS = [
    "/ocsp/issuing/%00%00",
    "/ocsp/issuing/%ZZ",
    "/ocsp/issuing/" + "A" * 7000,
    "/ocsp/issuing/" + "%41" * 2700,
    "/ocsp/issuing/////",
    "/ocsp/issuing/..%2F..%2Fetc%2Fpasswd",
    "/ocsp/issuing/%E2%80%AE%0A",
    "/ocsp/issuing/MA==",
    "/ocsp/issuing/" + base64.b64encode(b"\x30\x82\xff\xff" + b"\x00" * 100).decode(),
    "/ocsp/%2E%2E/MA==",
    "/ocsp/ISSUING/MA==",
    "/ocsp/" + "x" * 5000 + "/MA==",
]


def test_ocsp_get_with_hostile_paths_is_never_a_5xx(est_server: servekit.EstServer) -> None:
    for path in HOSTILE_OCSP_PATHS:
        status, body = _get(est_server, path)
        assert status < 500, (path[:80], status, body[:200])
        if status == 200:  # an OCSP answer: unsuccessful (malformed), nothing signed
            assert ocsp.load_der_ocsp_response(body).response_status != ocsp.OCSPResponseStatus.SUCCESSFUL
    status, _ = _get(est_server, "/ocsp/issuing/" + "A" * 40_000)  # beyond aiohttp's request line limit
    assert 400 <= status < 500
    assert "Traceback" not in est_server.log()


@pytest.mark.parametrize("encoding", ["standard", "urlsafe", "unpadded", "percent", "encoded-ca-name"])
def test_ocsp_cache_never_answers_one_ca_for_another(est_server: servekit.EstServer, issued, encoding: str) -> None:  # type: ignore[no-untyped-def]
    """A cached good answer for issuing's serial must not be served on /ocsp/root (or vice versa)."""
    leaf, issuing, _root = issued
    der = _ocsp_request(leaf, issuing)
    text = {
        "standard": base64.b64encode(der).decode(),
        "urlsafe": base64.urlsafe_b64encode(der).decode(),
        "unpadded": base64.urlsafe_b64encode(der).decode().rstrip("="),
        "percent": "".join(f"%{b:02X}" for b in base64.b64encode(der)),
        "encoded-ca-name": base64.b64encode(der).decode(),
    }[encoding]
    ca_segment = "%69ssuing" if encoding == "encoded-ca-name" else "issuing"  # the same CA, percent-encoded
    status, body = _get(est_server, f"/ocsp/{ca_segment}/{text}")  # fills the cache under issuing
    assert status == 200
    good = ocsp.load_der_ocsp_response(body)
    assert good.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and good.serial_number == leaf.serial_number
    for path in (f"/ocsp/root/{text}", f"/ocsp/est-identity/{text}", f"/ocsp/bootstrap/{text}"):
        status, body = _get(est_server, path)
        assert status == 200
        assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED, path
    status, body = _get(est_server, "/ocsp/root", "POST", der)
    assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_ocsp_nonce_is_echoed_not_taken_from_the_cache(est_server: servekit.EstServer, issued) -> None:  # type: ignore[no-untyped-def]
    leaf, issuing, _root = issued
    _get(est_server, "/ocsp/issuing", "POST", _ocsp_request(leaf, issuing))  # a cached nonce-less answer
    for nonce in (b"\x01" * 16, b"\x02" * 32):
        status, body = _get(est_server, "/ocsp/issuing", "POST", _ocsp_request(leaf, issuing, nonce))
        answer = ocsp.load_der_ocsp_response(body)
        assert status == 200 and answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    for nonce in (b"", b"\x03" * 33, b"\x04" * 4000):  # outside RFC 8954's 1-32 octets: no error, no 5xx
        status, body = _get(est_server, "/ocsp/issuing", "POST", _ocsp_request(leaf, issuing, nonce))
        assert status == 200 and ocsp.load_der_ocsp_response(body).response_status in (
            ocsp.OCSPResponseStatus.SUCCESSFUL, ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        )  # fmt: skip


@pytest.mark.parametrize(
    "k",
    ["-1", "00", "01", "1e3", "0x1", "+1", " 1", "1 ", "\u0663", "\uff11", "9" * 10, "9" * 400, "1.5", "", ".", "1/2"],
)
def test_partition_crl_with_hostile_numbers_is_404(est_server: servekit.EstServer, k: str) -> None:
    from urllib.parse import quote

    status, body = _get(est_server, f"/crl/issuing/{quote(k)}.crl")
    assert status == 404, (k, status, body[:200])
    assert b"Traceback" not in body and str(est_server.home).encode() not in body


def test_metrics_labels_are_bounded_whatever_the_client_sends(est_server: servekit.EstServer) -> None:
    """Unknown labels, operations, users and methods from the URL never become metric label values."""
    secret = "zz-attacker-label"
    for i in range(40):
        servekit.curl(est_server, f"/.well-known/est/{secret}{i}/simpleenroll", data=b"x",
                      headers=("Content-Type: application/pkcs10",))  # fmt: skip
        servekit.curl(est_server, f"/.well-known/est/default/{secret}op{i}", data=b"x")
    servekit.curl(est_server, "/.well-known/est/default/simpleenroll", data=b"garbage", user=f"{secret}user",
                  headers=("Content-Type: application/pkcs10",))  # fmt: skip
    status, body = _get(est_server, "/metrics")
    assert status == 200
    text = body.decode()
    assert secret not in text
    labels = {line.split('label="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'label="' in line}
    assert labels <= {"default", "edge-ca", "est-id", "edge-ca-one-ca", "other"}
    outcomes = {line.split('outcome="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'outcome="' in line}
    assert outcomes and all(o == "issued" or (o.isdigit() and 400 <= int(o) <= 599) for o in outcomes)


# --------------------------------------------------------------------------- Key Vault governor: sign_rate


@pytest.mark.parametrize("value", [1e-300, 5e-324, 0.001, 0, -1, 1e6, float("inf"), float("nan"), True, "x"])
def test_absurd_sign_rate_is_a_usage_error_not_an_overflow(value: object) -> None:
    """sign_rate = 1e-300 was accepted: the second signature slept 1e300 s (OverflowError, exit 1)."""
    from kvpki_cli.config import _rate
    from kvpki_cli.keystores.azure.store import _as_rate

    assert _rate(value) is not None
    if not isinstance(value, bool):
        with pytest.raises(UsageError, match="sign_rate"):
            _as_rate(value)


def test_slowest_allowed_sign_rate_sleeps_within_range() -> None:
    from kvpki_cli.config import MIN_SIGN_RATE, _rate
    from kvpki_cli.keystores.azure.governor import SignBudget, VaultGovernor

    assert _rate(MIN_SIGN_RATE) is None
    slept: list[float] = []
    budget = SignBudget(VaultGovernor(clock=lambda: 1000.0, sleep=slept.append), MIN_SIGN_RATE)
    for _ in range(5):
        budget.take()
    assert slept and max(slept) < 1000  # a few hundred seconds at most, within time.sleep's range


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 500])
def test_dps_error_details_are_bounded(status: int) -> None:
    """A hostile DPS (or allowed emulator) answers with megabyte-long error fields: still one short line."""
    from kvpki_cli.dps import _error
    from kvpki_cli.keystores.azure.http import Response

    huge = "\x1b[2J" + "E" * 1_000_000
    body = {"errorCode": huge, "message": huge, "trackingId": huge}
    error = _error("my-dps.azure-devices-provisioning.net", Response(status, {"x-ms-error-code": huge}, body))
    assert len(str(error)) < 1000
    from kvpki_cli.messages import error_line

    line = error_line(str(error))
    assert line.count("\n") == 1 and "\x1b" not in line


# --------------------------------------------------------------------------- EST: time checks with TLS's relaxed


def _ca(subject: str, not_before_days: float, not_after_days: float):  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name.from_rfc4514_string(subject)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(now + timedelta(days=not_before_days)).not_valid_after(now + timedelta(days=not_after_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


VALIDITIES = {"valid": (-10, 10), "expired-10d": (-40, -10), "expired-40d": (-70, -40), "not-yet-valid": (1, 30)}


def _leaf(ca_key, ca_cert, validity: str) -> x509.Certificate:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives.asymmetric import ec

    start, end = VALIDITIES[validity]
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=dev")).issuer_name(ca_cert.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=start)).not_valid_after(now + timedelta(days=end))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip


class _FakeRequest:
    """What Authenticator.identify reads: the TLS peer certificate and the headers."""

    def __init__(self, cert: x509.Certificate) -> None:
        der = cert.public_bytes(servekit_encoding())

        class _Ssl:
            def getpeercert(self, binary_form: bool = False) -> bytes:
                return der

        class _Transport:
            def get_extra_info(self, name: str) -> object:
                return _Ssl() if name == "ssl_object" else None

        self.transport = _Transport()
        self.headers: dict[str, str] = {}


@pytest.fixture(scope="module")
def relaxed_auth():  # type: ignore[no-untyped-def]
    """An Authenticator where label "win" has a 30-day window (so TLS checks no time) and "nowin" none."""
    from datetime import timedelta

    from kvpki_cli.serve.auth import Authenticator
    from kvpki_cli.serve.config import LabelConfig
    from kvpki_cli.serve.passwd import UserDirectory

    cas = {name: _ca(f"CN={name}", -100, 100) for name in ("issuing", "bootstrap", "idca")}
    labels = {
        name: LabelConfig(name, "issuing", "device", identity_cas=("idca",), renew_after_expiry=window)
        for name, window in (("win", timedelta(days=30)), ("nowin", None))
    }
    auth = Authenticator(
        UserDirectory(None), "t", {name: cas["issuing"][1] for name in labels},
        {name: [cas["bootstrap"][1]] for name in labels}, {"idca": cas["idca"][1]},
        {"win": timedelta(days=30)}, [cert for _key, cert in cas.values()],
    )  # fmt: skip
    assert auth.time_relaxed
    return auth, labels, cas


def _accepted(auth, label, cert: x509.Certificate, reenroll: bool) -> bool:  # type: ignore[no-untyped-def]
    """identify, then the time checks est.py applies to what it returned (renewal window, identity validity)."""
    import asyncio
    from datetime import UTC, datetime

    from kvpki_cli.authority import check_renewal_time
    from kvpki_cli.errors import PolicyViolation
    from kvpki_cli.serve.auth import currently_valid
    from kvpki_cli.serve.wire import HttpRefusal

    try:
        identity = asyncio.run(auth.identify(_FakeRequest(cert), label, reenroll))
    except HttpRefusal:
        return False
    if identity.renewing is not None and identity.authority is None:
        try:
            check_renewal_time(identity.renewing, datetime.now(UTC), label.renew_after_expiry)
        except PolicyViolation:
            return False
        return True
    if identity.authority is not None:
        return currently_valid(identity.authority)
    return True


@pytest.mark.parametrize("validity", list(VALIDITIES))
@pytest.mark.parametrize("issuer", ["issuing", "bootstrap", "idca"])
@pytest.mark.parametrize("label_name", ["win", "nowin"])
@pytest.mark.parametrize("op", ["simpleenroll", "simplereenroll"])
def test_only_renewal_within_a_window_accepts_a_certificate_out_of_its_validity(
    relaxed_auth, op: str, label_name: str, issuer: str, validity: str  # type: ignore[no-untyped-def]
) -> None:
    auth, labels, cas = relaxed_auth
    cert = _leaf(*cas[issuer], validity)
    in_window = issuer == "issuing" and validity == "expired-10d" and label_name == "win"
    if op == "simplereenroll":
        expected = issuer == "issuing" and (validity == "valid" or in_window)
    else:
        expected = validity == "valid" or in_window
    assert _accepted(auth, labels[label_name], cert, op == "simplereenroll") == expected


@pytest.mark.parametrize("ca_validity", [(-100, -1), (1, 100)])  # expired, not yet valid
@pytest.mark.parametrize("role", ["bootstrap", "idca", "issuing"])
def test_no_certificate_under_a_ca_out_of_its_validity_is_accepted(relaxed_auth, role: str, ca_validity) -> None:  # type: ignore[no-untyped-def]
    from kvpki_cli.serve.auth import Authenticator
    from kvpki_cli.serve.passwd import UserDirectory

    _auth, labels, cas = relaxed_auth
    cas = dict(cas)
    cas[role] = _ca(f"CN={role}", *ca_validity)  # same name, now out of its validity
    auth = Authenticator(
        UserDirectory(None), "t", {name: cas["issuing"][1] for name in labels},
        {name: [cas["bootstrap"][1]] for name in labels}, {"idca": cas["idca"][1]},
        {"win": labels["win"].renew_after_expiry}, [cert for _key, cert in cas.values()],
    )  # fmt: skip
    cert = _leaf(*cas[role], "valid")
    for label in labels.values():
        for reenroll in (False, True):
            assert not _accepted(auth, label, cert, reenroll), (label.name, reenroll)


# --------------------------------------------------------------------------- new CLI options, absurd values

ABSURD_OPTIONS = [
    ("sign-csr", "--ca", "root", "--jobs", "0"),
    ("sign-csr", "--ca", "root", "--jobs", "-1"),
    ("sign-csr", "--ca", "root", "--jobs", "99999999999999999999"),
    ("crl", "--ca", "root", "--partition", "-1"),
    ("crl", "--ca", "root", "--partition", "99999999999999999999999"),
    ("list", "--ca", "root", "--expiring", "99999999y"),
    ("list", "--ca", "root", "--expiring", "-1d"),
    ("list", "--ca", "root", "--expiring", "0d"),
    ("init-ocsp-responder", "--ca", "root", "--validity", "0d"),
    ("init-ocsp-responder", "--ca", "root", "--validity", "9999999y"),
    ("init-ocsp-responder", "--ca", "root", "--validity", "1s"),
    ("dps-verification", "--ca", "root", "--code", "a\nb"),
    ("dps-verification", "--ca", "root", "--code", "x" * 65),
    ("dps-verification", "--ca", "root", "--code", "x", "--validity", "999999y"),
    ("renew", "--renew-after-expiry", "99999999y", "cert.pem", "--ca", "root"),
    ("renew", "--renew-after-expiry", "0d", "cert.pem", "--ca", "root"),
    ("report", "--ca", "nope"),
]


@pytest.fixture(scope="module")
def absurd_home(tmp_path_factory: pytest.TempPathFactory) -> Kvpki:
    from tests.conftest import StoreSetup, make_env

    home = tmp_path_factory.mktemp("absurd")
    kvpki = Kvpki(home, make_env(home), StoreSetup("local"))
    (home / "cert.pem").write_bytes(kvpki.init_ca("root", "--subject", "CN=R"))
    return kvpki


@pytest.mark.parametrize("argv", ABSURD_OPTIONS, ids=lambda argv: " ".join(argv)[:60])
def test_new_options_with_absurd_values_exit_2_to_5_in_one_line(absurd_home: Kvpki, argv: tuple[str, ...]) -> None:
    result = absurd_home.run(*argv, input=b"")
    assert result.returncode in (2, 3, 4, 5), result.stderr
    assert result.stdout == b"" and b"Traceback" not in result.stderr
    assert [line for line in result.stderr.decode().splitlines() if line.startswith("kvpki: error:")]
