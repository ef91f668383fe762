"""Other members of issue 7's bug classes, found by attacking the merged result (one test per class).

- Hostile input: URI SANs that are not RFC 3986/5280 URIs (no host, bad port, broken IPv6
  literal, bad percent escapes), ``xn--`` labels that are not Punycode, IPv6 zone ids, Key Vault
  URLs with a bad port or host, NaN/inf deadlines: clear refusals (exit 2/3/4), never exit 1.
- Server log: a malformed HTTP request (bad method, over-long line, bad Content-Length) is one
  escaped log line, never an aiohttp traceback quoting the attacker's bytes.
- Fail closed without hanging: a FIFO or an oversized file in place of the users file.
- Nothing half-done: ``init-ca`` killed at any step leaves either nothing the parent has not
  recorded or a state that a re-run names in one line; a sub-CA never works unrecorded.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import KVPKI, Kvpki
from tests.servekit import EstServer, est_server  # noqa: F401  (module fixture)

# --------------------------------------------------------------------------- SAN syntax, one boundary

BAD_URIS = [
    "http:///",  # authority without a host
    "http://user@/",
    "http://[::1",  # unclosed IPv6 literal
    "http://[zz]/",
    "http://%00/",
    "http://a..b/",
    "http://a:99999999/",  # not a port
    "file:///etc/passwd",  # RFC 5280: an authority must hold a host name or address
    "http://a.example/%zz",  # broken percent escape
    "http://a.example/<x>",  # not an RFC 3986 character
    "http:",
]
GOOD_URIS = [
    "https://device.example.com/x?y=1#z",
    "https://device.example.com:8443/",
    "http://[2001:db8::1]:443/",
    "http://192.0.2.1/",
    "spiffe://trust.example/ns/prod/sa/device-1",
    "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
    "https://u:p@device.example.com/",
]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_malformed_uri_sans_are_refused(uri: str) -> None:
    from kvpki_cli.errors import KvpkiError
    from kvpki_cli.pki.names import check_sans
    from kvpki_cli.pki.profiles import load_profiles

    with pytest.raises(KvpkiError, match="not an absolute URI"):
        check_sans([x509.UniformResourceIdentifier(uri)], load_profiles({})["device"])


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_wellformed_uri_sans_still_pass(uri: str) -> None:
    from kvpki_cli.pki.names import check_sans
    from kvpki_cli.pki.profiles import load_profiles

    check_sans([x509.UniformResourceIdentifier(uri)], load_profiles({})["device"])


@pytest.mark.parametrize(
    ("san", "codes"),
    [
        ("URI:http:///", {4}),
        ("URI:http://[::1", {4}),
        ("URI:http://a:99999999/", {4}),
        ("IP:fe80::1%eth0", {3}),  # a zone id means nothing off this host and was silently dropped
        ("DNS:xn--zz.example.com", {4}),  # not Punycode: pkilint invalid_domain_name_syntax
        ("email:a@xn--zz.example.com", {4}),
    ],
)
def test_cli_refuses_malformed_sans_without_a_row(local_kvpki: Kvpki, make_csr, san: str, codes: set[int]) -> None:
    local_kvpki.init_ca("rt", "--subject", "CN=Redteam CA")
    result = local_kvpki.run("sign-csr", "--ca", "rt", "--san", san, "-", input=make_csr().csr_pem)
    assert result.returncode in codes, result.stderr
    assert result.stdout == b""
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert local_kvpki.inventory("rt") == []
    idn = "DNS:xn--bcher-kva.example"
    good = local_kvpki.run("sign-csr", "--ca", "rt", "--san", idn, "-", input=make_csr().csr_pem)
    assert good.returncode == 0, good.stderr


# --------------------------------------------------------------------------- Azure settings fail closed


@pytest.mark.parametrize(
    "url",
    [
        "https://v.vault.azure.net:99999",  # crashed with ValueError (exit 1)
        "https://[::1",  # crashed with ValueError (exit 1)
        "https://\udcff",  # thirty seconds of retries on a host that cannot exist
        "https://u:p@v.vault.azure.net",
        "https://v.vault.azure.net/path?q",
    ],
)
def test_bad_vault_urls_are_usage_errors(url: str) -> None:
    from kvpki_cli.errors import UsageError
    from kvpki_cli.keystores.azure.store import AzureSettings

    with pytest.raises(UsageError, match="vault_url"):
        AzureSettings.from_mapping("ca", {"vault_url": url})
    AzureSettings.from_mapping("ca", {"vault_url": "https://127.0.0.1:8443"})
    AzureSettings.from_mapping("ca", {"vault_url": "https://v.vault.azure.net/"})


def test_vault_url_with_bad_port_is_exit_2(local_kvpki: Kvpki) -> None:
    result = local_kvpki.run(
        "init-ca", "--name", "az", "--subject", "CN=x", "--store", "azure", "--vault-url", "https://v.vault.azure.net:99999"
    )
    assert result.returncode == 2, result.stderr
    assert b"internal error" not in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_azure_deadline_env_nan_and_inf_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from kvpki_cli.errors import UsageError
    from kvpki_cli.keystores.azure.store import DEADLINE_ENV, AzureSettings

    monkeypatch.setenv(DEADLINE_ENV, value)
    with pytest.raises(UsageError, match="deadline"):
        AzureSettings.from_mapping("ca", {"vault_url": "https://v.vault.azure.net"})


# --------------------------------------------------------------------------- init-ca killed at every step


@pytest.mark.parametrize("point", ["init-ca:key", "init-ca:recorded", "init-ca:chain"])
def test_init_ca_killed_at_any_step_never_leaves_an_unrecorded_working_ca(
    local_kvpki: Kvpki, make_csr, point: str
) -> None:
    local_kvpki.init_ca("root", "--subject", "CN=Root")
    env = dict(local_kvpki.env, KVPKI_TEST_CRASH_AT=point)
    crashed = subprocess.run(
        [*KVPKI, "init-ca", "--name", "sub", "--parent", "root",
         "--subject", "CN=Sub"],
        env=env, capture_output=True, cwd=local_kvpki.home, timeout=60,
    )  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr  # the hook really killed it at that step
    rows = local_kvpki.inventory("root")
    # The CA never works half-built: no ca.json yet, so sign-csr says it does not exist.
    assert local_kvpki.run("sign-csr", "--ca", "sub", "-", input=make_csr().csr_pem).returncode == 5
    if point == "init-ca:recorded":  # recorded before ca.json makes it usable, so it can be revoked
        assert [row["subject"] for row in rows] == ["CN=Sub"]
    else:  # nothing usable yet and nothing recorded
        assert rows == []
    rerun = local_kvpki.run("init-ca", "--name", "sub", "--parent", "root", "--subject", "CN=Sub")
    assert rerun.returncode == 7
    message = rerun.stderr.decode()
    assert len(message.strip().splitlines()) == 1 and "interrupted" in message and "move that directory" in message
    (local_kvpki.home / "cas" / "sub").rename(local_kvpki.home / "sub.interrupted")
    local_kvpki.init_ca("sub", "--parent", "root", "--subject", "CN=Sub")
    assert len(local_kvpki.inventory("root")) == len(rows) + 1


# --------------------------------------------------------------------------- users file read fails closed, fast


def _read_in_thread(path: Path) -> BaseException | dict[str, str] | None:
    from kvpki_cli.serve.passwd import read_users

    outcome: list[BaseException | dict[str, str]] = []

    def target() -> None:
        try:
            outcome.append(read_users(path))
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(5)
    return outcome[0] if outcome else None


@pytest.mark.parametrize("kind", ["fifo", "oversize", "directory"])
def test_users_file_that_is_not_a_small_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    from kvpki_cli.errors import UsageError
    from kvpki_cli.serve.passwd import MAX_USERS_BYTES

    path = tmp_path / "est-users"
    if kind == "fifo":
        os.mkfifo(path)  # open() without O_NONBLOCK waits for a writer: the whole server hung
    elif kind == "oversize":
        path.write_bytes(b"a:" + b"x" * MAX_USERS_BYTES + b"\n")
    else:
        path.mkdir()
    outcome = _read_in_thread(path)
    assert outcome is not None, "reading the users file blocked"
    assert isinstance(outcome, UsageError)


# --------------------------------------------------------------------------- live server


def _raw(server: EstServer, payload: bytes, *, tls: bool = True) -> bytes:
    sock = socket.create_connection(("127.0.0.1", server.port if tls else server.http_port), timeout=10)
    if tls:
        context = ssl.create_default_context(cafile=str(server.root_pem))
        context.check_hostname = False
        sock = context.wrap_socket(sock)
    with sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


MALFORMED_REQUESTS = [
    b"FOO\x1b[31m /x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /crl/\xff\n.crl HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 200 + b"\r\n",
]


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_malformed_http_requests_log_one_escaped_line_and_no_traceback(est_server: EstServer, tls: bool) -> None:  # noqa: F811
    before = len(est_server.log())
    for payload in MALFORMED_REQUESTS:
        answer = _raw(est_server, payload, tls=tls)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0], answer[:100]
    deadline = time.monotonic() + 5
    while est_server.log()[before:].count("Error handling request") < 3:  # aiohttp logs most of them
        assert time.monotonic() < deadline, est_server.log()[before:]
        time.sleep(0.05)
    time.sleep(0.3)
    new = est_server.log()[before:]
    assert "Traceback" not in new and "\x1b" not in new
    for line in new.splitlines():
        assert line.startswith("kvpki serve: "), line  # no continuation lines a reader could take for entries


def test_fifo_users_file_does_not_hang_the_server(est_server: EstServer) -> None:  # noqa: F811
    users = est_server.home / "est-users"
    saved = users.read_bytes()
    users.unlink()
    os.mkfifo(users)
    try:
        time.sleep(1.2)  # the server stats the file at most once a second
        body = b"MIIB"  # not a CSR: the password check comes first
        request = (
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Basic " + base64.b64encode(b"alice:alice-secret-1") + b"\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: 4\r\n\r\n" + body
        )
        started = time.monotonic()
        answer = _raw(est_server, request)
        assert answer.split(b"\r\n", 1)[0].endswith(b"401 Unauthorized"), answer[:200]
        assert time.monotonic() - started < 3
        cacerts = _raw(est_server, b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 200 " in cacerts.split(b"\r\n", 1)[0]
        assert "is not a regular file" in est_server.log()
    finally:
        users.unlink()
        tmp = users.with_suffix(".restore")
        tmp.write_bytes(saved)
        tmp.chmod(0o600)
        tmp.rename(users)
        time.sleep(1.2)


def test_client_error_filter_unit() -> None:
    """The filter alone: an aiohttp protocol error becomes one line; other errors keep their traceback."""
    from aiohttp.http_exceptions import BadHttpMessage

    from kvpki_cli.serve.logsafe import ClientErrorFilter, EscapingFilter

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys

            message = "Error handling request"
            return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, message, (), sys.exc_info())

    bad = record(BadHttpMessage("Invalid method encountered:\n\n  b'FOO\\x1b'\n  ^"))
    assert ClientErrorFilter().filter(bad) and EscapingFilter().filter(bad)
    assert bad.exc_info is None and "\n" not in bad.getMessage() and "BadHttpMessage" in bad.getMessage()
    bug = record(RuntimeError("a real bug"))
    assert ClientErrorFilter().filter(bug)
    assert bug.exc_info is not None


def test_a_ca_key_gone_from_under_the_server_is_503_generic_not_500(est_server: EstServer) -> None:  # noqa: F811
    """The server's own state failing (here: a CA key moved away) is 'unavailable', never a bug's 500,
    and the body names no path (the log does)."""
    key = est_server.home / "cas" / "bootstrap" / "key.pem"
    moved = key.with_suffix(".moved")
    key.rename(moved)
    try:
        answer = _raw(est_server, b"GET /crl/bootstrap.crl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", tls=False)
    finally:
        moved.rename(key)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].endswith(b"503 Service Unavailable"), answer[:200]
    assert b"retry-after:" in head.lower()
    assert b"/" not in body and b"key" not in body.lower(), body
    assert str(key) in est_server.log()


@pytest.mark.parametrize("fast", [True, False], ids=["fastpath", "click"])
def test_success_lines_escape_paths_like_errors(local_kvpki: Kvpki, make_csr, tmp_path: Path, fast: bool) -> None:
    """'issued N certificate(s) into DIR' printed the directory raw: an ESC or a newline in it reached the terminal."""
    local_kvpki.init_ca("rt", "--subject", "CN=Redteam CA")
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr().csr_pem)
    out_dir = tmp_path / "out\x1b[31m\nforged: line"
    env = dict(local_kvpki.env, **({} if fast else {"KVPKI_NO_FASTPATH": "1"}))
    result = subprocess.run(
        [*KVPKI, "sign-csr", "--ca", "rt", "--out-dir", str(out_dir), str(csr)],
        env=env, capture_output=True, cwd=local_kvpki.home, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"\x1b" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (out_dir / "d.pem").exists()


# --------------------------------------------------------------------------- serve config fails closed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("prot = 9443", "unknown setting 'prot' (did you mean port?)"),  # was ignored: listened on 8443
        ('realm = "a\\nWWW-Authenticate: x"', "realm must be printable ASCII"),
        ('realm = "\\u001b[31m"', "realm must be printable ASCII"),
        ("[ocsp]\nx = 1", "[ocsp.x] must be a table"),  # crashed with AttributeError (exit 1)
        ('[ocsp.x]\ncert = "c.pem"\nkey = "k.pem"\nkye = "k"', "[ocsp.x] must be a table with cert and key only"),
        ("[est]\nx = 1", "[est.x] must be a table"),
    ],
)
def test_serve_config_unknown_or_unsafe_server_settings_are_usage_errors(
    tmp_path: Path, extra: str, message: str
) -> None:
    from kvpki_cli.errors import UsageError
    from kvpki_cli.serve.config import load_serve_config

    path = tmp_path / "serve.toml"
    path.write_text(f'[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n{extra}\n')
    with pytest.raises(UsageError) as caught:
        load_serve_config(path)
    assert message in str(caught.value)


@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
def test_client_ca_file_that_never_ends_is_refused_not_a_hang(tmp_path: Path, source: str) -> None:
    from kvpki_cli.errors import UsageError
    from kvpki_cli.serve.app import _load_certificates

    path = Path(source)
    if source == "fifo":
        path = tmp_path / "fifo.pem"
        os.mkfifo(path)
    outcome: list[BaseException | object] = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(_load_certificates, path)), daemon=True)
    thread.start()
    thread.join(5)
    assert outcome, "loading the client CA file hung"
    assert isinstance(outcome[0], UsageError) and "not a regular file" in str(outcome[0])


def _catch(function, *args):  # type: ignore[no-untyped-def]
    try:
        return function(*args)
    except BaseException as exc:  # handed back to the test
        return exc


# --------------------------------------------------------------------------- a failing stdout after a commit


@pytest.mark.parametrize("command", ["revoke", "init-ca", "init-ocsp-responder"])
def test_failing_stdout_after_any_commit_names_what_was_done(local_kvpki: Kvpki, make_csr, command: str) -> None:
    """Item 7 beyond sign-csr: revoke, init-ca and init-ocsp-responder commit, then print; a full disk
    said only 'cannot write to stdout' although the revocation / CA / responder stood."""
    local_kvpki.init_ca("rt", "--subject", "CN=Redteam CA")
    issued = local_kvpki.ok("sign-csr", "--ca", "rt", "-", input=make_csr().csr_pem)
    serial = f"{x509.load_pem_x509_certificate(issued).serial_number:x}"
    args = {
        "revoke": ["revoke", serial, "--ca", "rt"],
        "init-ca": ["init-ca", "--name", "made", "--subject", "CN=Made"],
        "init-ocsp-responder": ["init-ocsp-responder", "--ca", "rt"],
    }[command]
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [*KVPKI, *args], stdout=full, stderr=subprocess.PIPE, env=local_kvpki.env, cwd=local_kvpki.home, timeout=60
        )
    lines = [line for line in result.stderr.decode().splitlines() if not line.startswith("kvpki: warning:")]
    assert result.returncode == 6 and len(lines) == 1, result.stderr
    assert "output failed after" in lines[0]
    recover = lines[0].rsplit(": ", 1)[1].split()
    assert recover[0] == "kvpki"
    again = local_kvpki.run(*recover[1:])
    assert again.returncode == 0, again.stderr  # what the line names really happened and can be seen again
    if command == "revoke":
        assert b'"status": "revoked"' in again.stdout


@pytest.mark.parametrize("subject", ["FOO=x", "CN=a,BAR=b"])
def test_unknown_subject_attribute_names_the_problem(subject: str) -> None:
    """It said "invalid subject 'FOO=x': " and nothing more."""
    from kvpki_cli.errors import InvalidInput
    from kvpki_cli.pki.names import parse_subject

    with pytest.raises(InvalidInput, match="unknown attribute type"):
        parse_subject(subject)
