"""The azure key store against the Key Vault test server, with the real SDK and DefaultAzureCredential.

Credentials come from EnvironmentCredential (``kv_env``) pointed at the test
server's token endpoint; the network guard refuses anything off loopback.
"""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from kvpki_cli.errors import AlreadyExists, BackendError
from kvpki_cli.keystores import open_keystore
from kvpki_cli.keystores.azure import AzureKeyStore
from kvpki_cli.keystores.base import KeyType
from tests.kvserver.fixtures import REPO
from tests.kvserver.server import FaultRule, KeyVaultTestServer

NOW = datetime.datetime.now(datetime.UTC)


def store(kv: KeyVaultTestServer, home: Path, name: str = "Root CA", **settings: object) -> AzureKeyStore:
    opened = open_keystore("azure", name, {"vault_url": kv.url, **settings}, home)
    assert isinstance(opened, AzureKeyStore)
    return opened


def hash_for(key_type: KeyType) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key_type is KeyType.EC_P384 else hashes.SHA256()


def make_root(st: AzureKeyStore, key_type: KeyType = KeyType.EC_P256, cn: str = "Root CA") -> x509.Certificate:
    """What kvpki's core does in init-ca, reduced to the store calls."""
    public = st.create_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(st.signer(), hash_for(key_type))
    )
    st.store_chain([cert])
    return cert


def leaf_for(
    issuer: x509.Certificate, signer: object, algorithm: hashes.HashAlgorithm | None, **kwargs: object
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(signer, algorithm, **kwargs)  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.RSA_3072])
def test_root_leaf_and_crl_verify(
    kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path, key_type: KeyType
) -> None:
    st = store(kv, tmp_path, hsm=True)
    root = make_root(st, key_type)
    public = root.public_key()
    root.verify_directly_issued_by(root)
    if key_type.is_ec:
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == key_type.curve.name
    else:
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == key_type.rsa_bits
    leaf = leaf_for(root, st.signer(), hash_for(key_type))
    leaf.verify_directly_issued_by(root)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.subject)
        .last_update(NOW)
        .next_update(NOW + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(leaf.serial_number).revocation_date(NOW).build()
        )
        .sign(st.signer(), hash_for(key_type))
    )
    assert crl.is_signature_valid(public)  # type: ignore[arg-type]
    root_pem, leaf_pem = tmp_path / "root.pem", tmp_path / "leaf.pem"
    root_pem.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    for target in (root_pem, leaf_pem):
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(root_pem), str(target)], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
    # The vault holds an HSM key, non-exportable, and the temporary Self-issued version is disabled.
    versions = kv.vault.certs[st.name].versions
    assert [v.enabled for v in versions] == [False, True]
    key_versions = kv.vault.keys[st.name]
    assert all(k.kty.endswith("-HSM") and not k.exportable for k in key_versions)


def test_rsa_pss_signature(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> None:
    st = store(kv, tmp_path)
    root = make_root(st, KeyType.RSA_2048)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    leaf = leaf_for(root, st.signer(), hashes.SHA256(), rsa_padding=pss)
    leaf.verify_directly_issued_by(root)
    sig = st.signer().sign(b"data", padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())
    public = root.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(sig, b"data", padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())


def test_key_never_leaves_the_vault(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> None:
    st = store(kv, tmp_path)
    make_root(st)
    signer = st.signer()
    with pytest.raises(BackendError, match="non-exportable"):
        signer.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    with pytest.raises(BackendError):
        signer.private_numbers()


def test_sub_ca_merged_with_chain_and_reloaded(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> None:
    parent_key = ec.generate_private_key(ec.SECP384R1())
    parent_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Local Root")])
    parent = (
        x509.CertificateBuilder()
        .subject_name(parent_name)
        .issuer_name(parent_name)
        .public_key(parent_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(minutes=1))
        .not_valid_after(NOW + datetime.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(parent_key, hashes.SHA384())
    )
    st = store(kv, tmp_path, name="Issuing CA")
    public = st.create_key(KeyType.EC_P256)
    sub = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Issuing CA")]))
        .issuer_name(parent_name)
        .public_key(public)
        .serial_number(2)
        .not_valid_before(NOW - datetime.timedelta(minutes=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(parent_key, hashes.SHA384())
    )
    st.store_chain([sub, parent])
    assert st.load_chain() == [sub, parent]
    # A cold process: no chain cache -> the certificate comes from the vault, issuers from the saved chain.
    st.chain_cache.clear()
    fresh = store(kv, tmp_path, name="Issuing CA")
    assert fresh.load_chain() == [sub, parent]
    leaf_for(sub, fresh.signer(), hashes.SHA256()).verify_directly_issued_by(sub)


def test_warm_caches_one_vault_request(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> None:
    root = make_root(store(kv, tmp_path))
    kv.clear_log()
    st = store(kv, tmp_path)  # a new instance: what a new process sees
    assert st.exists()
    leaf_for(st.load_chain()[0], st.signer(), hashes.SHA256()).verify_directly_issued_by(root)
    assert [(e.method, e.kind) for e in kv.log] == [("POST", "vault")]
    assert kv.log[0].path.endswith("/sign")
    cache = tmp_path / "cache" / "azure"
    for path in [cache / "tokens.json", *cache.glob("*/*.json")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_fast_path_skips_sdk_imports(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> None:
    make_root(store(kv, tmp_path))
    kv.clear_log()
    code = (
        "import sys, json; from pathlib import Path; from cryptography.hazmat.primitives import hashes;"
        "from cryptography.hazmat.primitives.asymmetric import ec;"
        "from kvpki_cli.keystores import open_keystore;"
        f"st = open_keystore('azure', 'Root CA', {{'vault_url': {kv.url!r}}}, Path({str(tmp_path)!r}));"
        "st.load_chain(); st.signer().sign(b'x', ec.ECDSA(hashes.SHA256()));"
        "slow = ('azure', 'msal', 'requests', 'kvpki_cli.keystores.azure.sdk', 'kvpki_cli.keystores.azure.initca');"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(slow))))"
    )
    env = {**os.environ, **kv_env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert [(e.method, e.kind) for e in kv.log] == [("POST", "vault")]


def test_expired_or_revoked_token_falls_back_and_refreshes(
    kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path
) -> None:
    make_root(store(kv, tmp_path))
    kv.revoke_tokens()
    kv.clear_log()
    store(kv, tmp_path).signer().sign(b"x", ec.ECDSA(hashes.SHA256()))
    # MSAL reads the tenant's openid-configuration once per process before its first token request.
    assert [(e.kind, e.status) for e in kv.log] == [("vault", 401), ("discovery", 200), ("token", 200), ("vault", 200)]
    kv.clear_log()
    store(kv, tmp_path).signer().sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert [(e.kind, e.status) for e in kv.log] == [("vault", 200)]  # the refreshed token was cached


def test_throttling_retried_with_and_without_retry_after(
    kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path
) -> None:
    make_root(store(kv, tmp_path))
    kv.set_faults(
        rules=[
            FaultRule(status=429, count=3, path_contains="/sign"),
            FaultRule(status=429, retry_after="0.2", count=1, path_contains="/sign"),
        ]
    )
    kv.clear_log()
    store(kv, tmp_path).signer().sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert [e.status for e in kv.log] == [429, 429, 429, 429, 200]


def test_dropped_connection_and_500_retried(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> None:
    make_root(store(kv, tmp_path))
    kv.set_faults(
        rules=[
            FaultRule(kind="drop", count=1, path_contains="/sign"),
            FaultRule(status=500, count=1, path_contains="/sign"),
        ]
    )
    kv.clear_log()
    store(kv, tmp_path).signer().sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert [e.status for e in kv.log] == [0, 500, 200]


@pytest.mark.parametrize(
    "rule", [FaultRule(status=503, count=None), FaultRule(kind="drop", count=None)], ids=["503", "drop"]
)
def test_persistent_failure_gives_up_at_deadline(
    kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path, rule: FaultRule, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_root(store(kv, tmp_path))
    kv.set_faults(rules=[rule])
    monkeypatch.delenv("KVPKI_AZURE_DEADLINE")
    st = store(kv, tmp_path, deadline=1.5)  # the store setting, when the environment does not override it
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"Key Vault sign .* failed after \d+ attempts") as info:
        st.signer().sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert time.monotonic() - start < 3
    assert "\n" not in str(info.value)


def test_forbidden_names_the_permission(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> None:
    make_root(store(kv, tmp_path))
    kv.deny("keys/sign")
    with pytest.raises(BackendError, match=r"denied keys/sign on https://127\.0\.0\.1.*Key Vault Crypto User"):
        store(kv, tmp_path).signer().sign(b"x", ec.ECDSA(hashes.SHA256()))
    kv.deny("certificates/create")
    with pytest.raises(BackendError, match=r"denied certificates/create .*Certificates Officer"):
        store(kv, tmp_path / "other", name="Other").create_key(KeyType.EC_P256)


def test_wrong_client_secret_fails_fast(
    kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "wrong")
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"Azure authentication failed .*AADSTS7000215") as info:
        store(kv, tmp_path).exists()
    assert time.monotonic() - start < 5
    assert "wrong" not in str(info.value)


def test_existing_and_soft_deleted_names_refused(
    kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path
) -> None:
    make_root(store(kv, tmp_path))
    with pytest.raises(AlreadyExists):
        store(kv, tmp_path / "h2").create_key(KeyType.EC_P256)
    kv.vault.delete_certificate("Root-CA")
    with pytest.raises(AlreadyExists, match=r"deleted but recoverable .*az keyvault certificate recover"):
        store(kv, tmp_path / "h3").create_key(KeyType.EC_P256)


def test_discard_keeps_half_built_ca_and_init_resumes(
    kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path
) -> None:
    st = store(kv, tmp_path)
    first = st.create_key(KeyType.EC_P256)
    st.discard()
    assert kv.vault.certs["Root-CA"].deleted_at is None  # nothing deleted: a deletion burns the name
    again = store(kv, tmp_path)
    assert not again.exists()  # its own half-built state: init-ca continues
    root = make_root(again)
    assert root.public_key() == first  # the same vault key, not a new one
    versions = kv.vault.certs["Root-CA"].versions
    assert len(versions) == 2 and [v.enabled for v in versions] == [False, True]
