"""A 403 names the operation and its least role (only for real authorization errors); the disk
chain cache is checked against the vault key and any malformed entry is a refetch, never exit 1.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpki_cli.keystores.azure.cache import ChainCache, TokenCache
from kvpki_cli.keystores.azure.errors import parse_error, to_kvpki_error
from tests.conftest import Kvpki, make_env
from tests.helpers import load_cert, openssl_verify
from tests.kvserver.server import FaultRule, KeyVaultTestServer

FUZZ_CASES = int(os.environ.get("KVPKI_FUZZ_CASES", "300"))


@pytest.fixture
def az(tmp_path: Path, kv: KeyVaultTestServer, azure_store_setup: Callable[[], Any]) -> Kvpki:
    setup = azure_store_setup()
    home = tmp_path / "home"
    home.mkdir()
    return Kvpki(home, make_env(home, setup.env), setup)


@pytest.fixture
def root_pem(az: Kvpki, kv: KeyVaultTestServer) -> bytes:
    pem = az.init_ca("root", "--subject", "CN=Azure Test Root")
    kv.clear_log()
    return pem


def chain_file(az: Kvpki) -> Path:
    (path,) = (az.home / "cache" / "azure").glob("*/root.json")
    return path


def sign(az: Kvpki, make_csr: Any) -> subprocess.CompletedProcess[bytes]:
    return az.run("sign-csr", "--ca", "root", input=make_csr().csr_pem)


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.stdout == b""
    assert stderr.count("\n") == 1 and stderr.startswith("kvpki: error: ") and "Traceback" not in stderr, stderr
    return stderr


def assert_issued_by(result: subprocess.CompletedProcess[bytes], root_pem: bytes, tmp_path: Path) -> None:
    assert result.returncode == 0, result.stderr
    leaf, root = load_cert(result.stdout), load_cert(root_pem)
    assert leaf.issuer == root.subject
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    verified = openssl_verify(tmp_path, root_pem, result.stdout)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def other_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Azure Test Root")])  # same name, other key
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


# ------------------------------------------------------------------ 8c: 403 and roles
def test_forbidden_certificates_get_names_the_reader_role_not_a_write_role(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any
) -> None:
    chain_file(az).unlink()  # cold cache: sign-csr must read the certificate
    kv.deny("certificates/get")
    result = sign(az, make_csr)
    assert result.returncode == 6
    stderr = one_error_line(result)
    assert "denied certificates/get" in stderr and "'Key Vault Certificate User'" in stderr, stderr
    assert "Officer" not in stderr
    assert az.inventory("root") == []


def test_forbidden_create_and_merge_name_the_certificates_officer(az: Kvpki, kv: KeyVaultTestServer) -> None:
    kv.deny("certificates/create")
    result = az.run("init-ca", "--name", "root", "--subject", "CN=R", "--store", "azure", "--vault-url", kv.url)
    assert result.returncode == 6
    stderr = one_error_line(result)
    assert "denied certificates/create" in stderr and "'Key Vault Certificates Officer'" in stderr, stderr


@pytest.mark.parametrize(
    ("target", "inner"),
    [
        ("/sign", "ForbiddenByFirewall"),
        ("/sign", "ForbiddenByConnection"),
        ("/certificates/root/", "ForbiddenByFirewall"),
    ],
    ids=["fast-path-firewall", "fast-path-private-link", "sdk-path-firewall"],
)
def test_403_that_is_not_a_role_problem_keeps_its_own_message(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any, target: str, inner: str
) -> None:
    if target.startswith("/certificates"):
        chain_file(az).unlink()
    kv.set_faults(rules=[FaultRule(status=403, count=None, path_contains=target, inner_code=inner)])
    result = sign(az, make_csr)
    assert result.returncode == 6
    stderr = one_error_line(result)
    assert inner in stderr and "Client address is not authorized" in stderr, stderr
    assert "grant" not in stderr and "Key Vault Crypto User" not in stderr and "Certificate User" not in stderr


@pytest.mark.parametrize(
    ("body", "authorization"),
    [
        ({"error": {"code": "Forbidden", "message": "m", "innererror": {"code": "ForbiddenByRbac"}}}, True),
        ({"error": {"code": "Forbidden", "message": "m", "innererror": {"code": "ForbiddenByPolicy"}}}, True),
        ({"error": {"code": "Forbidden", "message": "m", "innererror": {"code": "AccessDenied"}}}, True),
        ({"error": {"code": "Forbidden", "message": "m"}}, True),
        ({"error": {"code": "Forbidden", "message": "m", "innererror": {"code": "KeyDisabled"}}}, False),
        ({"error": {"code": "Forbidden", "message": "m", "innererror": {"code": "ForbiddenByFirewall"}}}, False),
        ({"error": {"code": "Forbidden", "innererror": "not an object"}}, True),
        ({"error": "not an object"}, False),
        ([], False),
    ],
)
def test_one_mapping_decides_what_a_403_means(body: Any, authorization: bool) -> None:
    error = parse_error(403, body)
    message = str(to_kvpki_error(error, "certificates/get", "get certificate root", "https://v"))
    assert error.is_authorization is authorization
    assert ("Key Vault Certificate User" in message) is authorization, message
    assert "\n" not in message


# ------------------------------------------------------------------ 8d: the cached chain vs the vault key
def test_substituted_cached_chain_is_refetched_and_the_certificate_chains_to_the_real_ca(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any, tmp_path: Path
) -> None:
    path = chain_file(az)
    data = json.loads(path.read_text())
    _, fake = other_ca()
    data["chain_pem"] = [fake.public_bytes(serialization.Encoding.PEM).decode()]
    path.write_text(json.dumps(data))
    result = sign(az, make_csr)
    assert_issued_by(result, root_pem, tmp_path)
    assert any(e.method == "GET" and e.path == "/certificates/root/" for e in kv.log)  # refetched
    assert json.loads(path.read_text())["chain_pem"][0].encode() == root_pem  # and the cache repaired


def test_forged_chain_and_key_pair_never_leaves_kvpki(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any, tmp_path: Path
) -> None:
    """Chain and key fields both replaced (consistent with each other): the vault's signature exposes it."""
    path = chain_file(az)
    data = json.loads(path.read_text())
    _, fake = other_ca()
    data["chain_pem"] = [fake.public_bytes(serialization.Encoding.PEM).decode()]
    spki = fake.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    data["key_spki"] = base64.b64encode(spki).decode()
    path.write_text(json.dumps(data))
    result = sign(az, make_csr)
    assert result.returncode == 6
    assert "does not verify with the CA certificate's public key" in one_error_line(result)
    assert az.inventory("root") == []
    assert not path.exists()  # cleared: the next run refetches
    assert_issued_by(sign(az, make_csr), root_pem, tmp_path)


def _future(data: dict[str, Any]) -> None:
    data["fetched_at"] = time.time() + 86400


def _types(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data[field] = value

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        _future,
        _types("fetched_at", "yesterday"),
        _types("fetched_at", None),
        _types("chain_pem", "-----BEGIN CERTIFICATE-----"),
        _types("chain_pem", [1, 2]),
        _types("chain_pem", ["not a certificate"]),
        _types("kid", 42),
        _types("kid", "https://elsewhere.example/keys/root/0"),
        _types("tenant", ["x"]),
        _types("scope", {"a": 1}),
    ],
    ids=[
        "future-fetched_at",
        "fetched_at-str",
        "fetched_at-null",
        "chain-str",
        "chain-ints",
        "chain-garbage",
        "kid-int",
        "kid-other-host",
        "tenant-list",
        "scope-object",
    ],
)
def test_malformed_chain_cache_is_refetched_exit_0(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any, tmp_path: Path, mutate: Any
) -> None:
    path = chain_file(az)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    result = sign(az, make_csr)
    assert_issued_by(result, root_pem, tmp_path)
    assert any(e.method == "GET" and e.path == "/certificates/root/" for e in kv.log)


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '"a string"',
        '{"x": {"token": 1, "expires_on": "never"}}',
        '{"x": {"token": "t", "expires_on": 1e400}}',
        '{"x": {"token": "t", "expires_on": true}}',
        '{"x": {"token": "t", "expires_on": NaN}}',
        "[" * 100000,
    ],
    ids=["list", "string", "wrong-types", "huge", "bool", "nan", "deep"],
)
def test_malformed_token_cache_is_ignored_exit_0(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any, tmp_path: Path, text: str
) -> None:
    path = az.home / "cache" / "azure" / "tokens.json"
    tokens = json.loads(path.read_text())
    data = dict(tokens)
    path.write_text(text)
    result = sign(az, make_csr)
    assert_issued_by(result, root_pem, tmp_path)
    assert data  # a token was cached before
    assert isinstance(json.loads(path.read_text()), dict)  # rewritten with a fresh token


# ------------------------------------------------------------------ the class: any JSON in any field
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def test_any_json_in_any_cache_field_is_a_miss_never_an_error(tmp_path: Path) -> None:
    from kvpki_cli.keystores.azure.cache import CachedCA, spki_b64

    key, cert = other_ca()
    url = "https://vault.example"
    good = CachedCA(
        vault_url=url,
        cert_name="root",
        cert_version="v1",
        kid=f"{url}/keys/root/v1",
        chain_pem=[cert.public_bytes(serialization.Encoding.PEM).decode()],
        scope="https://vault.azure.net/.default",
        tenant=None,
        fetched_at=time.time() - 10,
        key_spki=spki_b64(key.public_key()),
    )
    cache = ChainCache(tmp_path, url, "root")
    tokens = TokenCache(tmp_path, identity="i")
    cache.save(good)
    assert cache.load(3600) == good
    fields = list(good._fields)

    @settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from([*fields, "extra"]), value=_json, drop=st.booleans())
    def check(field: str, value: Any, drop: bool) -> None:
        data = good._asdict()
        if drop and field in data:
            del data[field]
        else:
            data[field] = value
        cache.path.write_text(json.dumps(data))
        loaded = cache.load(3600)
        assert loaded is None or loaded == good._replace(**{field: loaded._asdict()[field]})
        tokens.path.write_text(json.dumps({"i|s|": {"token": value, "expires_on": value}, "k": value}))
        got = tokens.get("s", None)
        assert got is None or (isinstance(got[0], str) and isinstance(got[1], int))
        expires = int(time.time()) + 3600
        tokens.put("s", None, "t", expires)
        assert tokens.get("s", None) == ("t", expires)

    check()


def test_substituted_issuer_in_cached_sub_ca_chain_is_refetched(
    az: Kvpki, kv: KeyVaultTestServer, root_pem: bytes, make_csr: Any, tmp_path: Path
) -> None:
    az.run(
        "init-ca",
        "--name",
        "sub",
        "--parent",
        "root",
        "--subject",
        "CN=Sub",
        "--store",
        "azure",
        "--vault-url",
        kv.url,
        check=True,
    )
    (path,) = (az.home / "cache" / "azure").glob("*/sub.json")
    data = json.loads(path.read_text())
    _, fake_root = other_ca()  # same subject as the real root, another key
    data["chain_pem"][1] = fake_root.public_bytes(serialization.Encoding.PEM).decode()
    path.write_text(json.dumps(data))
    kv.clear_log()
    result = az.run("sign-csr", "--ca", "sub", "--chain", input=make_csr().csr_pem)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(root_pem)  # the real root, from the chain saved at init-ca
    assert any(e.method == "GET" and e.path == "/certificates/sub/" for e in kv.log)
