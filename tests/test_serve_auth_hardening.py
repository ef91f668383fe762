"""EST authentication and authorization that hold under attack and careless edits (issue 7 items 11, 14, 16, 17).

- the users file: names that cannot break its format, atomic 0600 writes, a server that
  fails closed (401, never 500, logged once) on a broken edit and never keeps a removed user;
- no user enumeration by timing; 5xx bodies never carry paths or key-store/inventory text;
- labels issuing CA certificates refuse Basic users unless ``allow_password_for_ca``; CA
  profiles carry critical name constraints (``{cn}`` from the EST identity) that openssl enforces;
- per-label ``base64_line_length``; the documented examples follow the safe pattern.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import re
import shutil
import ssl
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpki_cli.errors import (
    AlreadyExists,
    BackendError,
    InvalidInput,
    KvpkiError,
    NotFound,
    PolicyViolation,
    UsageError,
)
from kvpki_cli.pki.profiles import BUILTIN_PROFILES
from kvpki_cli.serve import passwd
from kvpki_cli.serve.config import load_serve_config
from kvpki_cli.serve.passwd import UserDirectory, read_users, set_user
from kvpki_cli.serve.wire import HttpRefusal
from tests import servekit
from tests.helpers import pkilint_findings
from tests.servekit import KVPKI, PASSWORDS, EstServer, est_body, make_key_csr, openssl
from tests.test_serve_edge_identity import EDGE_CA_EXT, est_identity
from tests.test_serve_est import edge_enroll, verify_edge_chain, write_pem

REPO = Path(__file__).resolve().parent.parent
FUZZ_CASES = int(os.environ.get("KVPKI_FUZZ_CASES", "200"))
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# ---------------------------------------------------------------------------------------------
# Item 11: the users file
# ---------------------------------------------------------------------------------------------


def serve_passwd(path: Path, user: str, password: bytes | None, *extra: str) -> subprocess.CompletedProcess[bytes]:
    args = [*KVPKI, "serve-passwd", str(path), user, *extra]
    if password is not None:
        args.append("--password-stdin")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, input=password, capture_output=True, env=env, timeout=60)


@pytest.mark.parametrize(
    "user",
    [
        "carol\n",
        "carol\r",
        "car:ol",
        "carol ",
        " carol",
        "ca rol",
        "car\x1bol",
        "car\x7fol",
        "carol\u0085",
        "é",
        "a" * 65,
        "",
    ],
)
def test_serve_passwd_refuses_names_that_would_break_the_file(tmp_path: Path, user: str) -> None:
    path = tmp_path / "users"
    assert serve_passwd(path, "alice", b"alice-secret-1\n").returncode == 0
    before = path.read_bytes()
    result = serve_passwd(path, user, b"carol-secret-1\n")
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().startswith("kvpki: error: invalid user name") and result.stdout == b""
    assert path.read_bytes() == before  # nothing changed on failure
    assert serve_passwd(path, "bob", b"bob-secret-12\n").returncode == 0  # and the file still works
    assert set(read_users(path)) == {"alice", "bob"}


BREAKERS = ["\n", "\r", "\r\n", ":", " ", "\t", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u202e", "#", "é"]


def test_serve_passwd_refuses_undecodable_passwords_cleanly(tmp_path: Path) -> None:
    result = serve_passwd(tmp_path / "users", "alice", b"abc\xff\xfedefgh\n")
    assert result.returncode == 2 and result.stderr == b"kvpki: error: password must be valid UTF-8 text\n"
    assert not (tmp_path / "users").exists()


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    user=st.one_of(
        st.text(max_size=80),
        st.builds(  # a good name with a character that breaks line/field formats spliced in
            lambda name, bad, at: name[: at % (len(name) + 1)] + bad + name[at % (len(name) + 1) :],
            st.from_regex(r"[A-Za-z0-9_.@+-]{1,64}", fullmatch=True),
            st.sampled_from(BREAKERS) | st.characters(),
            st.integers(0, 64),
        ),
        st.builds(str.__add__, st.from_regex(r"[A-Za-z0-9_.@+-]{1,64}", fullmatch=True), st.sampled_from(BREAKERS)),
    )
)
def test_any_user_name_is_refused_or_round_trips(tmp_path: Path, user: str) -> None:
    """The class: whatever name is given, the file kvpki leaves behind parses and means what it says."""
    path = tmp_path / "fuzz-users"
    path.unlink(missing_ok=True)
    set_user(path, "anchor", "anchor-secret")
    before = path.read_bytes()
    original_hash = passwd.hash_password
    passwd.hash_password = lambda password, log_n=10: original_hash(password, log_n=10)  # fast, still valid
    try:
        set_user(path, user, "fuzz-password")
    except UsageError:
        assert path.read_bytes() == before
    else:
        assert re.fullmatch(r"[A-Za-z0-9_.@+-]{1,64}", user)
        assert set(read_users(path)) == {"anchor", user}
    finally:
        passwd.hash_password = original_hash


def test_users_file_is_replaced_atomically_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    old_umask = os.umask(0)
    try:
        set_user(path, "alice", "alice-secret-1")
        path.chmod(0o644)  # an operator's chmod does not survive the next edit
        set_user(path, "bob", "bob-secret-12")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        set_user(path, "carol", "carol-secret-1")
    assert synced, "the new file is fsynced before it replaces the old one"
    assert path.read_bytes() == before  # a crash before the rename leaves the old file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # and no stray temp file


def test_concurrent_serve_passwd_runs_keep_every_user(tmp_path: Path) -> None:
    path = tmp_path / "users"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    names = [f"user{i}" for i in range(8)]
    processes = [
        subprocess.Popen([*KVPKI, "serve-passwd", str(path), name, "--password-stdin"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for name in names
    ]  # fmt: skip
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"same-secret-1\n")
        process.stdin.close()
    assert [process.wait(60) for process in processes] == [0] * len(names)
    assert sorted(read_users(path)) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


def test_running_server_fails_closed_on_a_broken_users_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(passwd, "SCRYPT_LOG_N", 10)
    monkeypatch.setattr(UserDirectory, "STAT_INTERVAL", 0.0)
    path = tmp_path / "users"
    set_user(path, "alice", "alice-secret-1")
    set_user(path, "bob", "bob-secret-12")
    directory = UserDirectory(path)
    assert directory.verify("bob", "bob-secret-12") and directory.cached("bob", "bob-secret-12") is True
    # A hand edit removes bob and leaves a malformed line.
    kept = [line for line in path.read_text().splitlines() if not line.startswith("bob:")]
    path.write_text("\n".join([*kept, "carol", ":x"]) + "\n")
    caplog.set_level(logging.INFO, logger="kvpki.serve")
    for _ in range(20):
        assert directory.cached("bob", "bob-secret-12") is None  # the cached success is gone
        assert not directory.verify("bob", "bob-secret-12")  # removed user: never accepted
        assert not directory.verify("alice", "alice-secret-1")  # broken file: nobody, until fixed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "malformed" in errors[0].getMessage()
    set_user(path.with_name("fixed"), "alice", "alice-secret-1")
    os.replace(path.with_name("fixed"), path)
    assert directory.cached("alice", "alice-secret-1") is None and directory.verify("alice", "alice-secret-1")
    assert not directory.verify("bob", "bob-secret-12")


# ---------------------------------------------------------------------------------------------
# Item 14: timing and generic error bodies
# ---------------------------------------------------------------------------------------------


def _median_seconds(call: object, tries: int = 10) -> float:
    samples = []
    for _ in range(tries):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def test_unknown_user_costs_the_same_scrypt_work_as_a_wrong_password(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "alice-secret-1")
    directory = UserDirectory(path)
    assert directory.cached("nobody", "x") is None  # unknown users take the slow path too
    known = _median_seconds(lambda: directory.verify("alice", "wrong-password"))
    unknown = _median_seconds(lambda: directory.verify("nobody", "wrong-password"))
    assert known > 0.005  # scrypt really runs (ln=14: tens of ms)
    assert 0.5 < unknown / known < 2, (unknown, known)


SECRET_DETAIL = "/var/lib/kvpki/cas/other/key.pem is encrypted: set KVPKI_LOCAL_PASSPHRASE"


def _all_error_classes() -> list[type[KvpkiError]]:
    seen, todo = [], [KvpkiError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


@pytest.mark.parametrize("error_class", _all_error_classes(), ids=lambda c: c.__name__)
def test_error_bodies_are_generic_unless_the_client_caused_them(
    error_class: type[KvpkiError], caplog: pytest.LogCaptureFixture
) -> None:
    """The class: every core error type, with a message naming a server path."""
    caplog.set_level(logging.INFO, logger="kvpki.serve")
    refusal = HttpRefusal.from_error(error_class(SECRET_DETAIL), retry_after=7)
    client_mistake = issubclass(error_class, (InvalidInput, PolicyViolation))
    if client_mistake:
        assert refusal.status in (400, 403) and refusal.reason == SECRET_DETAIL
    else:
        assert refusal.status >= 500
        assert "/" not in refusal.reason and "KVPKI" not in refusal.reason and "key" not in refusal.reason
        assert SECRET_DETAIL in caplog.text  # the detail goes to the server log
    if issubclass(error_class, BackendError):
        assert refusal.status == 503 and refusal.headers["Retry-After"] == "7"
    assert UsageError in _all_error_classes() and NotFound in _all_error_classes()
    assert AlreadyExists in _all_error_classes()


def test_retry_after_stays_sane_for_odd_backend_hints() -> None:
    for hint, expected in ((3.4, "3"), (float("inf"), "10"), (1e300, "10"), (-5.0, "10"), (0.0, "10")):
        assert HttpRefusal.from_error(BackendError("x", retry_after=hint), 10).headers["Retry-After"] == expected


# ---------------------------------------------------------------------------------------------
# A server of our own: passphrase-protected CA "other", name-constrained edge-ca, wrapped label
# ---------------------------------------------------------------------------------------------

SERVE_TOML = """
[server]
host = "127.0.0.1"
port = {port}
http_port = {http_port}
tls_cert = "server-chain.pem"
tls_key = "server.key"
users_file = "est-users"

[est.default]
ca = "issuing"
profile = "device"
users = ["alice", "edge"]

[est.wrapped]
ca = "issuing"
profile = "device"
users = ["alice"]
base64_line_length = 64

[est.est-id]
ca = "est-identity"
profile = "device"
client_cas = ["bootstrap.pem"]

[est.edge-ca]
ca = "issuing"
profile = "edge-ca"
identity_cas = ["est-identity"]
identity_profiles = ["device"]
identity_cn = ["aziot-edge CA {{cn}}"]
"""
PROFILES_TOML = """
[profiles.edge-ca]
permitted_dns = ["{cn}.local"]
"""


def start_server(home: Path, env: dict[str, str], config: Path) -> subprocess.Popen[bytes]:
    log_path = home / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*KVPKI, "serve", "--config", str(config)], stdout=log, stderr=log, env=env, cwd=home
        )
    deadline = time.monotonic() + 20
    while "listening on https" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"kvpki serve did not start: {log_path.read_text()}")
        time.sleep(0.05)
    return process


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EstServer]:
    home = tmp_path_factory.mktemp("hardening")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(REPO), "NO_PROXY": "*", "no_proxy": "*"})
    port, http_port = servekit.free_port(), servekit.free_port()
    servekit._prepare(home, env, port, http_port)
    with (home / "config.toml").open("a") as config:
        config.write(PROFILES_TOML)
    subprocess.run(
        [*KVPKI, "init-ca", "--name", "other", "--subject", "CN=Other CA"],
        env={**env, "KVPKI_LOCAL_PASSPHRASE": "only the operator knows"}, check=True, capture_output=True,
    )  # fmt: skip
    (home / "serve.toml").write_text(SERVE_TOML.format(port=port, http_port=http_port))
    process = start_server(home, env, home / "serve.toml")
    try:
        yield EstServer(home, env, port, http_port, process, home / "serve.log")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def https(server: EstServer) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(server.root_pem))
    return http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, user: str | None = None,
    password: str | None = None,
) -> tuple[int, bytes, http.client.HTTPResponse]:  # fmt: skip
    headers = {"Content-Type": "application/pkcs10"} if body is not None else {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password or PASSWORDS.get(user, '')}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read(), response


def test_unavailable_ca_answers_generic_503_without_paths(server: EstServer) -> None:
    """CA "other" has a passphrase the server was not given: CRL and OCSP fail, and say nothing inside."""
    ocsp_request = build_ocsp_request(server)
    for conn in (https(server), http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)):
        for method, path, body, content_type in (
            ("GET", "/crl/other.crl", None, None),
            ("POST", "/ocsp/other", ocsp_request, "application/ocsp-request"),
            ("GET", "/ocsp/other/" + base64.b64encode(ocsp_request).decode(), None, None),
        ):
            conn.request(method, path, body, {"Content-Type": content_type} if content_type else {})
            response = conn.getresponse()
            answer = response.read()
            assert response.status == 503, (path, response.status, answer)
            assert response.getheader("Retry-After")
            assert b"/" not in answer and b"key" not in answer.lower() and b"KVPKI" not in answer, answer
    assert "KVPKI_LOCAL_PASSPHRASE" in server.log()  # the operator sees why


def build_ocsp_request(server: EstServer) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509 import ocsp

    from kvpki_cli.serve.ocsp import _key_bits

    def sha1(data: bytes) -> bytes:
        digest = hashes.Hash(hashes.SHA1())
        digest.update(data)
        return digest.finalize()

    other = x509.load_pem_x509_certificate((server.home / "cas" / "other" / "chain.pem").read_bytes())
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        sha1(other.subject.public_bytes()), sha1(_key_bits(other)), 1234, hashes.SHA1()
    )
    return builder.build().public_bytes(Encoding.DER)


def test_live_basic_auth_does_not_reveal_which_users_exist(server: EstServer) -> None:
    conn = https(server)
    _, csr = make_key_csr(server.home, "timing", "/CN=timing-dev")
    body = est_body(csr)

    def attempt(user: str) -> None:
        status, _, _ = request(conn, "POST", "/.well-known/est/simpleenroll", body, user, "not-the-password")
        assert status == 401

    attempt("alice")  # warm up the connection
    known = _median_seconds(lambda: attempt("alice"))
    unknown = _median_seconds(lambda: attempt("no-such-user"))
    assert unknown / known > 0.5, (unknown, known)


def test_live_users_file_edit_removes_users_at_once_and_a_broken_file_fails_closed(server: EstServer) -> None:
    users = server.home / "est-users"
    original = users.read_bytes()
    conn = https(server)
    _, csr = make_key_csr(server.home, "reload", "/CN=reload-dev")
    body = est_body(csr)
    enroll = "/.well-known/est/simpleenroll"
    try:
        assert request(conn, "POST", enroll, body, "edge")[0] == 200  # edge's success is now cached
        # A broken edit that also removes edge: refused cleanly, with no 500 and one log line.
        lines = [line for line in original.decode().splitlines() if not line.startswith("edge:")]
        users.write_text("\n".join(lines) + "\ncarol\n:$scrypt$garbage\n")
        time.sleep(1.2)
        statuses = {request(conn, "POST", enroll, body, name)[0] for name in ("edge", "alice") for _ in range(3)}
        assert statuses == {401}, statuses
        time.sleep(1.2)
        assert request(conn, "POST", enroll, body, "alice")[0] == 401
        assert server.log().count("refusing every password") == 1
        # Fixed with serve-passwd: alice is back, edge stays removed.
        users.write_text("\n".join(lines) + "\n")
        server.kvpki("serve-passwd", str(users), "zoe", "--password-stdin", input=b"zoe-secret-1\n")
        time.sleep(1.2)
        assert request(conn, "POST", enroll, body, "alice")[0] == 200
        assert request(conn, "POST", enroll, body, "edge")[0] == 401
    finally:
        users.write_bytes(original)
        users.chmod(0o600)
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------------------------------------
# Item 16: CA labels and name constraints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["edge-ca", "sub-ca", "gateway-ca"])
def test_ca_label_with_basic_users_is_refused_at_start(server: EstServer, tmp_path: Path, profile: str) -> None:
    config = server.home / f"risky-{profile}.toml"  # next to serve.toml: its relative paths resolve
    base = (server.home / "serve.toml").read_text()
    risky = f'\n[est.fleet-ca]\nca = "issuing"\nprofile = "{profile}"\nusers = ["edge"]\n'
    env = dict(server.env)
    if profile == "gateway-ca":  # a configured profile based on a CA profile is a CA profile too
        extra = '[profiles.gateway-ca]\nbase = "edge-ca"\n'
        (tmp_path / "config.toml").write_text((server.home / "config.toml").read_text() + extra)
        env["KVPKI_CONFIG"] = str(tmp_path / "config.toml")
    config.write_text(base + risky)
    command = [*KVPKI, "serve", "--config", str(config), "--port", "0"]
    result = subprocess.run(command, env=env, capture_output=True, timeout=60)
    assert result.returncode == 2, result.stderr
    stderr = result.stderr.decode()
    assert stderr.startswith("kvpki: error: serve config: [est.fleet-ca]") and "allow_password_for_ca" in stderr
    assert stderr.count("\n") == 1 and result.stdout == b""


def test_allow_password_for_ca_is_an_explicit_boolean(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    head = '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
    head += '[est.edge-ca]\nca = "issuing"\nprofile = "edge-ca"\nusers = ["x"]\n'
    path.write_text(head + 'allow_password_for_ca = "yes"\n')
    with pytest.raises(UsageError, match="allow_password_for_ca must be true or false"):
        load_serve_config(path)
    path.write_text(head)
    label = load_serve_config(path).labels["edge-ca"]
    with pytest.raises(UsageError, match=r"\[est.edge-ca\]"):
        label.check_profile("edge-ca", is_ca=True)
    label.check_profile("device", is_ca=False)
    path.write_text(head + "allow_password_for_ca = true\n")
    load_serve_config(path).labels["edge-ca"].check_profile("edge-ca", is_ca=True)


def name_constraints(cert: x509.Certificate) -> x509.Extension[x509.NameConstraints]:
    return cert.extensions.get_extension_for_class(x509.NameConstraints)


def sign_leaf(directory: Path, ca_pem: Path, ca_key: Path, name: str, san: str) -> Path:
    """A serverAuth leaf signed with openssl by a CA we hold the key of (what a rogue Edge CA would mint)."""
    key, _ = make_key_csr(directory, f"leaf-{name}", f"/CN={name}")
    csr = directory / f"leaf-{name}.csr"
    openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    ext = directory / f"leaf-{name}.ext"
    ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
    out = directory / f"leaf-{name}.pem"
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_key), "-set_serial", "7",
            "-days", "10", "-extfile", str(ext), "-out", str(out))  # fmt: skip
    return out


def verify(server: EstServer, leaf: Path, chain: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return openssl("verify", "-CAfile", str(server.root_pem), "-untrusted", str(chain), "-purpose", "sslserver",
                   *extra, str(leaf), check=False)  # fmt: skip


@needs_curl
def test_edge_ca_from_est_identity_is_name_constrained_to_its_device(server: EstServer, tmp_path: Path) -> None:
    id_pem, id_key, _ = est_identity(server, tmp_path, "gw-7")
    edge_key, edge_csr = make_key_csr(tmp_path, "edge", "/CN=aziot-edge CA gw-7", *EDGE_CA_EXT)
    status, issued, cacerts = edge_enroll(server, "edge-ca", edge_csr, None, id_pem, id_key)
    assert status == 200
    edge_ca = issued[0]
    verify_edge_chain(server, tmp_path, edge_ca, cacerts)
    ext = name_constraints(edge_ca)
    assert ext.critical
    assert ext.value.permitted_subtrees == [x509.DNSName("gw-7.local")]  # {cn} = the identity's CN
    assert {str(n.value) for n in ext.value.excluded_subtrees or []} == {"0.0.0.0/0", "::/0"}
    edge_pem = write_pem(tmp_path / "edge.pem", [edge_ca])
    assert pkilint_findings(edge_pem) == ""
    chain = write_pem(tmp_path / "chain.pem", [edge_ca, *cacerts])

    inside = sign_leaf(tmp_path, edge_pem, edge_key, "inside", "DNS:edgehub.gw-7.local")
    assert verify(server, inside, chain).returncode == 0
    # The EST server's own host name (and address): what a stolen credential must not be able to mint.
    for name, san, host in (("est", "DNS:localhost", "localhost"), ("other", "DNS:gw-8.local", "gw-8.local")):
        leaf = sign_leaf(tmp_path, edge_pem, edge_key, name, san)
        result = verify(server, leaf, chain, "-verify_hostname", host)
        assert result.returncode != 0 and b"subtree violation" in result.stdout + result.stderr
    leaf = sign_leaf(tmp_path, edge_pem, edge_key, "ip", "IP:127.0.0.1")
    result = verify(server, leaf, chain, "-verify_ip", "127.0.0.1")
    assert result.returncode != 0 and b"excluded subtree violation" in result.stdout + result.stderr

    # Self-renewal of the Edge CA (its certificate as TLS client certificate) keeps the constraints.
    _, renew_csr = make_key_csr(tmp_path, "edge2", "/CN=aziot-edge CA gw-7", *EDGE_CA_EXT)
    status, renewed, _ = edge_enroll(server, "edge-ca", renew_csr, None, edge_pem, edge_key)
    assert status == 200 and name_constraints(renewed[0]).value == ext.value
    # So does `kvpki renew`, although the Edge CA's own CN ("aziot-edge CA gw-7") makes no DNS name.
    (tmp_path / "edge2.der").write_bytes(renew_csr)
    pem = server.kvpki("renew", str(edge_pem), str(tmp_path / "edge2.der"), "--ca", "issuing").stdout
    assert name_constraints(x509.load_pem_x509_certificate(pem)).value == ext.value


def test_cli_name_constraints_refuse_a_cn_that_is_no_dns_name(server: EstServer, tmp_path: Path) -> None:
    before = len(server.inventory())
    _, csr = make_key_csr(tmp_path, "bad", "/CN=aziot-edge CA gw-9", *EDGE_CA_EXT)
    result = server.kvpki("sign-csr", "-", "--ca", "issuing", "--profile", "edge-ca", input=csr, check=False)
    assert result.returncode == 4 and b"does not make a DNS name" in result.stderr and result.stdout == b""
    assert len(server.inventory()) == before
    _, csr = make_key_csr(tmp_path, "good", "/CN=gw-9", *EDGE_CA_EXT)
    cert = x509.load_pem_x509_certificate(
        server.kvpki("sign-csr", "-", "--ca", "issuing", "--profile", "edge-ca", input=csr).stdout
    )
    assert name_constraints(cert).value.permitted_subtrees == [x509.DNSName("gw-9.local")]


@pytest.mark.parametrize(
    "setting",
    ['permitted_dns = ["{cn}"]', 'permitted_dns = ["x.{cn}.{cn}.com"]', 'permitted_dns = [".local"]',
     'permitted_dns = "a.local"', 'permitted_ip = ["10.0.0.1/8"]', 'permitted_dns = ["evil\\n.local"]'],
)  # fmt: skip
def test_bad_name_constraint_settings_are_usage_errors(server: EstServer, tmp_path: Path, setting: str) -> None:
    (tmp_path / "config.toml").write_text(f"[profiles.edge-ca]\n{setting}\n")
    _, csr = make_key_csr(tmp_path, "c", "/CN=gw-1", *EDGE_CA_EXT)
    env = {**server.env, "KVPKI_CONFIG": str(tmp_path / "config.toml")}
    result = subprocess.run([*KVPKI, "sign-csr", "-", "--ca", "issuing", "--profile", "edge-ca"], input=csr,
                            env=env, capture_output=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and b"profile edge-ca" in result.stderr, result.stderr


def test_device_profiles_cannot_carry_name_constraints(server: EstServer, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[profiles.device]\npermitted_dns = ["a.local"]\n')
    env = {**server.env, "KVPKI_CONFIG": str(tmp_path / "config.toml")}
    _, csr = make_key_csr(tmp_path, "d", "/CN=dev-1")
    result = subprocess.run([*KVPKI, "sign-csr", "-", "--ca", "issuing"], input=csr, env=env, capture_output=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 2 and b"not a CA profile" in result.stderr


def test_init_ca_sub_ca_profile_constraints_apply(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[profiles.sub-ca]\npermitted_dns = ["plant.example.com"]\n'
                                      'permitted_ip = ["10.20.0.0/16"]\n')  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPKI_")}
    env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(REPO)})
    run = lambda *a: subprocess.run([*KVPKI, *a], env=env, capture_output=True, timeout=60, check=True)  # noqa: E731
    run("init-ca", "--name", "root", "--subject", "CN=Root")
    chain = run("init-ca", "--name", "plant", "--parent", "root", "--subject", "CN=Plant CA").stdout
    cert = x509.load_pem_x509_certificates(chain)[0]
    ext = name_constraints(cert)
    assert ext.critical and ext.value.permitted_subtrees == [
        x509.DNSName("plant.example.com"),
        x509.IPAddress(__import__("ipaddress").ip_network("10.20.0.0/16")),
    ]
    assert ext.value.excluded_subtrees is None  # an explicit IP subtree replaces the "no IPs" default
    path = tmp_path / "plant.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    assert pkilint_findings(path) == ""


# ---------------------------------------------------------------------------------------------
# Item 17: per-label base64 line length, revoke message; documented examples
# ---------------------------------------------------------------------------------------------


def test_base64_line_length_is_per_label(server: EstServer) -> None:
    conn = https(server)
    status, one_line, _ = request(conn, "GET", "/.well-known/est/cacerts")
    assert status == 200 and b"\n" not in one_line
    status, wrapped, _ = request(conn, "GET", "/.well-known/est/wrapped/cacerts")
    lines = wrapped.split(b"\n")
    assert status == 200 and len(lines) > 2 and all(len(line) == 64 for line in lines[:-2]) and lines[-1] == b""
    assert base64.b64decode(b"".join(lines)) == base64.b64decode(one_line)
    _, csr = make_key_csr(server.home, "wrapped", "/CN=wrapped-dev")
    status, body, _ = request(conn, "POST", "/.well-known/est/wrapped/simpleenroll", est_body(csr), "alice")
    assert status == 200 and body.count(b"\n") > 1 and max(len(line) for line in body.split(b"\n")) == 64


def test_base64_line_length_label_setting_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    head = '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\nbase64_line_length = 64\n'
    path.write_text(head + '[est.a]\nca = "x"\n[est.b]\nca = "x"\nbase64_line_length = 0\n')
    labels = load_serve_config(path).labels
    assert (labels["a"].base64_line_length, labels["b"].base64_line_length) == (64, 0)
    for bad in ("63", "80", "true", '"64"'):
        path.write_text(head + f'[est.a]\nca = "x"\nbase64_line_length = {bad}\n')
        with pytest.raises(UsageError, match=r"\[est.a\] base64_line_length"):
            load_serve_config(path)


def test_revoke_says_serve_re_signs_and_crl_publishes(server: EstServer, tmp_path: Path) -> None:
    _, csr = make_key_csr(tmp_path, "rv", "/CN=revoke-me")
    pem = server.kvpki("sign-csr", "-", "--ca", "issuing", input=csr).stdout
    (tmp_path / "rv.pem").write_bytes(pem)
    stderr = server.kvpki("revoke", "--cert", str(tmp_path / "rv.pem"), "--ca", "issuing").stderr.decode()
    assert "kvpki serve" in stderr and "re-signs" in stderr and "kvpki crl" in stderr


@pytest.mark.skipif(shutil.which("pki") is None, reason="strongSwan pki is not installed")
def test_strongswan_enroll_as_documented_trusts_the_issued_certificate(server: EstServer, tmp_path: Path) -> None:
    """The documented --cacert set (TLS root + the --estca chain) makes strongSwan trust what it gets."""
    url, root = server.url, str(server.root_pem)

    def pki(*args: str) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(["pki", *args], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        return result

    pki("--estca", "--url", url, "--cacert", root, "--caout", str(tmp_path / "ca.pem"), "--outform", "pem")
    _, csr = make_key_csr(tmp_path, "ss", "/CN=strongswan-doc-1")
    (tmp_path / "ss.der").write_bytes(csr)
    enroll = ["--est", "--url", url, "--in", str(tmp_path / "ss.der"), "--userpass", "alice:alice-secret-1"]
    root_only = pki(*enroll, "--cacert", root)
    documented = pki(*enroll, "--cacert", root, "--cacert", str(tmp_path / "ca.pem"),
                     "--cacert", str(tmp_path / "ca-1.pem"))  # fmt: skip
    assert b"Issued certificate is not trusted" in root_only.stderr  # what the old README example got
    assert b"Issued certificate is trusted" in documented.stderr


def _toml_blocks(text: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/serve.md"])
def test_documented_serve_configs_follow_the_safe_pattern(doc: str, tmp_path: Path) -> None:
    text = (REPO / doc).read_text()
    blocks = [b for b in _toml_blocks(text) if "[est." in b]
    assert blocks
    for block in blocks:
        if "[server]" not in block:
            block = '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n' + block
        path = tmp_path / "serve.toml"
        path.write_text(block)
        for label in load_serve_config(path).labels.values():
            profile = BUILTIN_PROFILES.get(label.profile)
            assert profile is not None, label.profile
            if profile.is_ca:  # the safe pattern: no shared password can mint a CA
                assert not label.users and not label.allow_password_for_ca, (doc, label.name)
            label.check_profile(label.profile, profile.is_ca)
    # The CA profile examples carry name constraints, and the docs say how to keep TLS trust apart.
    assert "permitted_dns" in text and "allow_password_for_ca" in text
    assert re.search(r"separate.{0,80}TLS|TLS.{0,80}separate", text, flags=re.S | re.I)
    for command in re.findall(r"pki --est (?:[^\n]|\\\n)*", text):
        assert command.count("--cacert") >= 2, command  # root and the issuing CA (strongSwan checks the result)
