"""`kvpki` processes on the azure store: round trips per process, faults, auth failures.

The CLI runs as a subprocess with the real DefaultAzureCredential ->
EnvironmentCredential against the Key Vault test server; its sitecustomize
network guard refuses any non-loopback connection.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Kvpki, make_env
from tests.kvserver.fixtures import azure_env
from tests.kvserver.server import FaultRule, KeyVaultTestServer


@pytest.fixture
def az(tmp_path: Path, kv: KeyVaultTestServer, azure_store_setup: Callable[[], Any]) -> Kvpki:
    setup = azure_store_setup()
    home = tmp_path / "home"
    home.mkdir()
    return Kvpki(home, make_env(home, setup.env), setup)


@pytest.fixture
def root(az: Kvpki, kv: KeyVaultTestServer) -> str:
    az.init_ca("root", "--subject", "CN=Azure Test Root")
    kv.clear_log()
    return "root"


def sign(az: Kvpki, csr: bytes, **env: str) -> subprocess.CompletedProcess[bytes]:
    runner = Kvpki(az.home, {**az.env, **env}, az.store) if env else az
    return runner.run("sign-csr", "--ca", "root", input=csr)


def test_warm_sign_csr_process_makes_exactly_one_vault_request(
    az: Kvpki, kv: KeyVaultTestServer, root: str, make_csr: Any
) -> None:
    for _ in range(2):
        kv.clear_log()
        result = sign(az, make_csr().csr_pem)
        assert result.returncode == 0, result.stderr
    assert [(e.method, e.kind) for e in kv.log] == [("POST", "vault")]
    assert kv.log[0].path.endswith("/sign") and kv.log[0].authorized
    assert kv.count("token") == 0 and kv.count("discovery") == 0
    assert len(az.inventory(root)) == 2


def test_three_429s_then_success_issues_one_certificate(
    az: Kvpki, kv: KeyVaultTestServer, root: str, make_csr: Any
) -> None:
    kv.set_faults(rules=[FaultRule(status=429, count=3, path_contains="/sign")])
    result = sign(az, make_csr().csr_pem)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"-----BEGIN CERTIFICATE-----") == 1
    assert [e.status for e in kv.log if e.path.endswith("/sign")] == [429, 429, 429, 200]
    assert len(az.inventory(root)) == 1


@pytest.mark.parametrize(
    "rule",
    [FaultRule(status=500, count=None), FaultRule(kind="drop", count=None)],
    ids=["persistent-500", "dropped-connection"],
)
def test_persistent_fault_exits_6_without_output_or_row(
    az: Kvpki, kv: KeyVaultTestServer, root: str, make_csr: Any, rule: FaultRule
) -> None:
    kv.set_faults(rules=[rule])
    start = time.monotonic()
    result = sign(az, make_csr().csr_pem, KVPKI_AZURE_DEADLINE="1.5")
    assert time.monotonic() - start < 15
    assert result.returncode == 6
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert stderr.count("\n") == 1 and stderr.startswith("kvpki: error: Key Vault sign"), stderr
    assert "Traceback" not in stderr
    kv.set_faults()
    assert az.inventory(root) == []


def test_wrong_credentials_fail_fast_with_a_clear_error(
    az: Kvpki, kv: KeyVaultTestServer, root: str, make_csr: Any
) -> None:
    (az.home / "cache" / "azure" / "tokens.json").unlink()  # otherwise the cached token still works
    start = time.monotonic()
    result = sign(az, make_csr().csr_pem, AZURE_CLIENT_SECRET="not-the-secret")
    elapsed = time.monotonic() - start
    stderr = result.stderr.decode()
    assert result.returncode == 6, stderr
    assert elapsed < 5
    assert result.stdout == b""
    assert stderr.count("\n") == 1 and "Azure authentication failed" in stderr and "AADSTS7000215" in stderr
    assert "not-the-secret" not in stderr and "Traceback" not in stderr
    assert kv.count("vault") == 0  # nothing reached the vault without a token


def test_missing_sign_permission_names_the_role(az: Kvpki, kv: KeyVaultTestServer, root: str, make_csr: Any) -> None:
    kv.deny("keys/sign")
    result = sign(az, make_csr().csr_pem)
    assert result.returncode == 6
    stderr = result.stderr.decode()
    assert "denied keys/sign" in stderr and "Key Vault Crypto User" in stderr, stderr
    assert kv.count("vault") == 1  # 403 is not retried


def test_token_never_appears_in_output_or_world_readable_files(
    az: Kvpki, kv: KeyVaultTestServer, root: str, make_csr: Any
) -> None:
    result = az.run("--debug", "sign-csr", "--ca", root, input=make_csr().csr_pem)
    assert result.returncode == 0
    tokens = list(kv.tokens)
    assert tokens
    for path in az.home.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o077:
            data = path.read_bytes()
            assert not any(token.encode() in data for token in tokens), path
    assert not any(token.encode() in result.stdout + result.stderr for token in tokens)


def test_cli_subprocesses_cannot_leave_loopback(kv: KeyVaultTestServer) -> None:
    env = {**make_env(Path("/nonexistent")), **azure_env(kv)}
    code = "import socket; socket.create_connection(('169.254.169.254', 80), timeout=2)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode != 0 and "netguard" in result.stderr
