"""Small pure pieces of `kvpki serve`: password file, base64 wrapping, config validation, start-up imports."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpki_cli.errors import UsageError
from kvpki_cli.serve.config import load_serve_config
from kvpki_cli.serve.passwd import UserDirectory, check_password, read_users, set_user
from kvpki_cli.serve.wire import b64, certs_only_body

REPO = Path(__file__).resolve().parent.parent


def test_users_file_is_salted_scrypt_0600_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "users"
    result = subprocess.run(
        [sys.executable, "-m", "kvpki_cli", "serve-passwd", str(path), "alice", "--password-stdin"],
        input=b"correct horse\n",
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    set_user(path, "bob", "correct horse")
    users = read_users(path)
    assert users["alice"].startswith("$scrypt$ln=14,r=8,p=1$")
    assert users["alice"] != users["bob"]  # per-user salt
    assert "correct horse" not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert check_password("correct horse", users["alice"]) and not check_password("wrong", users["alice"])
    directory = UserDirectory(path)
    assert directory.cached("alice", "correct horse") is None  # needs the slow check first
    assert directory.verify("alice", "correct horse") and not directory.verify("alice", "nope")
    assert directory.cached("alice", "correct horse") is True
    assert directory.cached("alice", "nope") is None
    assert directory.cached("nobody", "x") is None  # unknown users pay the scrypt cost too
    set_user(path, "bob", None)
    assert "bob" not in read_users(path)
    with pytest.raises(UsageError):
        set_user(path, "carol", "short")


def test_base64_is_unwrapped_by_default_and_wraps_for_libest() -> None:
    data = os.urandom(200)
    assert b"\n" not in b64(data, 0)
    wrapped = b64(data, 64)
    lines = wrapped.split(b"\n")
    assert all(len(line) == 64 for line in lines[:-2]) and lines[-1] == b""
    assert base64.b64decode(b"".join(wrapped.split())) == data
    with pytest.raises(ValueError):
        certs_only_body([], 0)


def test_config_errors_are_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\nbase64_line_length = 63\n')
    with pytest.raises(UsageError, match="base64_line_length"):
        load_serve_config(path)
    path.write_text('[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n[est.default]\nprofile = "device"\n')
    with pytest.raises(UsageError, match="needs ca"):
        load_serve_config(path)
    path.write_text('[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n[est.a]\nca = "x"\nuser = ["typo"]\n')
    with pytest.raises(UsageError, match="unknown setting"):
        load_serve_config(path)
    path.write_text('[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n[est.a]\nca = "x"\nclient_cas = ["b.pem"]\n')
    config = load_serve_config(path)
    assert config.tls_cert == tmp_path / "c.pem" and config.labels["a"].client_cas == (tmp_path / "b.pem",)


def test_other_commands_do_not_import_aiohttp(tmp_path: Path) -> None:
    code = "import sys; from kvpki_cli.cli import cli; print('aiohttp' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=60)
    assert result.stdout.strip() == b"False"


def test_key_store_throttling_maps_to_503_with_retry_after() -> None:
    from kvpki_cli.errors import BackendError, InvalidInput, PolicyViolation
    from kvpki_cli.serve.wire import HttpRefusal

    throttled = HttpRefusal.from_error(BackendError("vault throttled", retry_after=2.4), retry_after=10)
    assert (throttled.status, throttled.headers) == (503, {"Retry-After": "2"})
    assert HttpRefusal.from_error(BackendError("down"), retry_after=10).headers == {"Retry-After": "10"}
    assert HttpRefusal.from_error(InvalidInput("bad CSR"), retry_after=10).status == 400
    assert HttpRefusal.from_error(PolicyViolation("CA:TRUE"), retry_after=10).status == 403
