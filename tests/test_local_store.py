"""The embedded local key store: file modes, encryption at rest, refusing unsafe key files."""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import Kvpki, openssl


def test_key_file_is_0600_and_unencrypted_warning(local_kvpki: Kvpki) -> None:
    result = local_kvpki.run("init-ca", "--name", "plain", "--subject", "CN=Plain", check=True)
    assert result.stderr.decode().count("\n") == 1 and "unencrypted" in result.stderr.decode()
    key_path = local_kvpki.home / "cas" / "plain" / "key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in key_path.read_bytes()


def test_group_readable_key_is_refused(local_kvpki: Kvpki, make_csr) -> None:
    local_kvpki.init_ca("loose", "--subject", "CN=Loose")
    key_path = local_kvpki.home / "cas" / "loose" / "key.pem"
    os.chmod(key_path, 0o640)
    result = local_kvpki.run("sign-csr", "--ca", "loose", input=make_csr().csr_pem)
    assert result.returncode == 6 and result.stdout == b""
    assert "readable by group or others" in result.stderr.decode()
    assert local_kvpki.inventory("loose") == []


def test_passphrase_encrypts_key(local_kvpki: Kvpki, make_csr, tmp_path) -> None:
    env = dict(local_kvpki.env, KVPKI_LOCAL_PASSPHRASE="correct horse battery staple")
    local_kvpki.env = env
    result = local_kvpki.run(
        "init-ca", "--name", "sealed", "--subject", "CN=Sealed", "--key-type", "rsa-2048", check=True
    )
    assert b"unencrypted" not in result.stderr
    pem = (local_kvpki.home / "cas" / "sealed" / "key.pem").read_bytes()
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in pem
    key = serialization.load_pem_private_key(pem, password=b"correct horse battery staple")
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert local_kvpki.run("sign-csr", "--ca", "sealed", input=make_csr().csr_pem).returncode == 0
    # wrong or missing passphrase: backend failure, nothing issued; a passphrase file works too
    local_kvpki.env = dict(env, KVPKI_LOCAL_PASSPHRASE="wrong")
    wrong = local_kvpki.run("sign-csr", "--ca", "sealed", input=make_csr().csr_pem)
    assert wrong.returncode == 6 and b"wrong passphrase" in wrong.stderr and wrong.stdout == b""
    local_kvpki.env = {k: v for k, v in env.items() if k != "KVPKI_LOCAL_PASSPHRASE"}
    missing = local_kvpki.run("sign-csr", "--ca", "sealed", input=make_csr().csr_pem)
    assert missing.returncode == 6 and b"encrypted" in missing.stderr
    phrase = tmp_path / "phrase"
    phrase.write_text("correct horse battery staple\n")
    local_kvpki.env = dict(local_kvpki.env, KVPKI_LOCAL_PASSPHRASE_FILE=str(phrase))
    assert local_kvpki.run("sign-csr", "--ca", "sealed", input=make_csr().csr_pem).returncode == 0
    assert len(local_kvpki.inventory("sealed")) == 2


# --- issue 7 item 15: a strong KDF that openssl still reads, one whitespace rule for every passphrase source ---

PHRASE = "correct horse battery staple"


def _kdf_parameters(pem: bytes) -> dict[str, str]:
    """What openssl (not kvpki) says about the key file's encryption."""
    text = openssl("asn1parse", input=pem).stdout.decode()
    iterations = re.search(r"OBJECT\s+:PBKDF2.*?INTEGER\s+:([0-9A-F]+)", text, re.S)
    assert iterations, text
    return {
        "iterations": str(int(iterations.group(1), 16)),
        "prf": "hmacWithSHA256" if ":hmacWithSHA256" in text else "other",
        "cipher": "aes-256-cbc" if ":aes-256-cbc" in text else "other",
    }


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_encrypted_key_uses_strong_pbkdf2_and_openssl_reads_it(local_kvpki: Kvpki, key_type: str) -> None:
    local_kvpki.env = dict(local_kvpki.env, KVPKI_LOCAL_PASSPHRASE=PHRASE)
    local_kvpki.init_ca("strong", "--subject", "CN=Strong", "--key-type", key_type)
    key_path = local_kvpki.home / "cas" / "strong" / "key.pem"
    pem = key_path.read_bytes()
    params = _kdf_parameters(pem)
    assert int(params["iterations"]) >= 600_000 and params["prf"] == "hmacWithSHA256"
    assert params["cipher"] == "aes-256-cbc"
    # openssl decrypts it with the passphrase and gets the key whose public half is in the CA certificate
    public = openssl("pkey", "-in", str(key_path), "-passin", f"pass:{PHRASE}", "-pubout").stdout
    chain = (local_kvpki.home / "cas" / "strong" / "chain.pem").read_bytes()
    assert openssl("x509", "-noout", "-pubkey", input=chain).stdout == public
    assert openssl("pkey", "-in", str(key_path), "-passin", "pass:wrong", "-noout", check=False).returncode != 0


def _reencrypt_legacy(key_path: Path, old: bytes | None, new: bytes) -> None:
    """Rewrite the key as kvpki 0.1.0 did: BestAvailableEncryption (PBKDF2, 2,048 iterations)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=old)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(new)
    )
    key_path.write_bytes(pem)
    os.chmod(key_path, 0o600)


def test_keys_written_by_older_versions_still_load(local_kvpki: Kvpki, make_csr) -> None:
    local_kvpki.init_ca("legacy", "--subject", "CN=Legacy")
    key_path = local_kvpki.home / "cas" / "legacy" / "key.pem"
    _reencrypt_legacy(key_path, None, PHRASE.encode())
    assert int(_kdf_parameters(key_path.read_bytes())["iterations"]) == 2048
    local_kvpki.env = dict(local_kvpki.env, KVPKI_LOCAL_PASSPHRASE=PHRASE)
    assert local_kvpki.run("sign-csr", "--ca", "legacy", input=make_csr().csr_pem).returncode == 0
    # kvpki 0.1.0 took the environment variable verbatim: such a key still opens with the same value
    _reencrypt_legacy(key_path, PHRASE.encode(), f"  {PHRASE}\n".encode())
    local_kvpki.env["KVPKI_LOCAL_PASSPHRASE"] = f"  {PHRASE}\n"
    assert local_kvpki.run("sign-csr", "--ca", "legacy", input=make_csr().csr_pem).returncode == 0


WHITESPACE = [f"{PHRASE}\n", f"{PHRASE}\r\n", f"  {PHRASE}  ", f"\t{PHRASE}\n\n", PHRASE]


@pytest.mark.parametrize("written", WHITESPACE)
@pytest.mark.parametrize("create_with", ["env", "file"])
def test_env_and_file_passphrases_follow_one_whitespace_rule(
    local_kvpki: Kvpki, make_csr, tmp_path: Path, written: str, create_with: str
) -> None:
    """Surrounding whitespace is stripped from both sources: a key made with either opens with the other."""
    base = {k: v for k, v in local_kvpki.env.items() if not k.startswith("KVPKI_LOCAL_PASSPHRASE")}
    phrase_file = tmp_path / "phrase"
    phrase_file.write_text(written)
    by_env = dict(base, KVPKI_LOCAL_PASSPHRASE=written)
    by_file = dict(base, KVPKI_LOCAL_PASSPHRASE_FILE=str(phrase_file))
    local_kvpki.env = by_env if create_with == "env" else by_file
    local_kvpki.init_ca("ws", "--subject", "CN=Whitespace")
    key_path = local_kvpki.home / "cas" / "ws" / "key.pem"
    # the stored key opens with the bare passphrase (openssl, no whitespace) ...
    openssl("pkey", "-in", str(key_path), "-passin", f"pass:{PHRASE}", "-noout")
    # ... and kvpki opens it from the other source too
    for env in (by_env, by_file, dict(base, KVPKI_LOCAL_PASSPHRASE=PHRASE)):
        local_kvpki.env = env
        result = local_kvpki.run("sign-csr", "--ca", "ws", input=make_csr().csr_pem)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("blank", ["   ", "\n", " \t\r\n"])
def test_blank_passphrases_are_refused_from_both_sources(local_kvpki: Kvpki, tmp_path: Path, blank: str) -> None:
    phrase_file = tmp_path / "blank"
    phrase_file.write_text(blank)
    for extra in ({"KVPKI_LOCAL_PASSPHRASE": blank}, {"KVPKI_LOCAL_PASSPHRASE_FILE": str(phrase_file)}):
        local_kvpki.env = dict(local_kvpki.env, **extra)
        result = local_kvpki.run("init-ca", "--name", "blank", "--subject", "CN=Blank")
        assert result.returncode == 2 and b"is empty" in result.stderr and result.stdout == b""
        assert not (local_kvpki.home / "cas" / "blank" / "key.pem").exists()
        for key in extra:
            local_kvpki.env.pop(key)


def _imported_modules_of_sign(local_kvpki: Kvpki, csr: Path) -> list[str]:
    code = (
        "import sys\nfrom kvpki_cli.entry import _run\n"
        f"_run(['sign-csr', '--ca', 'lean', {str(csr)!r}])\n"
        "sys.stderr.write(repr(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=local_kvpki.env, cwd=local_kvpki.home, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith(b"-----BEGIN CERTIFICATE"), result.stderr
    return ast.literal_eval(result.stderr.decode())  # type: ignore[no-any-return]


@pytest.mark.parametrize("encrypted", [False, True])
def test_sign_csr_loads_no_serialization_package(local_kvpki: Kvpki, make_csr, tmp_path: Path, encrypted: bool) -> None:
    """Decrypting the key needs cryptography's loader only, not its serialization package or the KDF writer."""
    if encrypted:
        local_kvpki.env = dict(local_kvpki.env, KVPKI_LOCAL_PASSPHRASE=PHRASE)
    local_kvpki.init_ca("lean", "--subject", "CN=Lean")
    csr = tmp_path / "lean.csr"
    csr.write_bytes(make_csr().csr_pem)
    modules = _imported_modules_of_sign(local_kvpki, csr)
    assert "cryptography.hazmat.primitives.serialization" not in modules
    assert "kvpki_cli.keystores.pkcs8" not in modules and "click" not in modules
