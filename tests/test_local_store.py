"""The embedded local key store: file modes, encryption at rest, refusing unsafe key files."""

from __future__ import annotations

import os
import stat

from cryptography.hazmat.primitives import serialization

from tests.conftest import Kvpki


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
