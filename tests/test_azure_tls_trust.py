"""Which CA certificates the azure fast path trusts when no ``ca_bundle`` is configured.

With no explicit bundle, vault connections first try OpenSSL's hashed default
directory (``SSL_CERT_DIR`` here) instead of parsing the whole system CA file, and
fall back once to the full default store when that handshake does not verify (see
``kvpki_cli.keystores.azure.http.TrustStore``).  The Key Vault test server's TLS CA
is put into a temporary hashed directory and/or a "system" bundle as each case
needs; the network guard stays installed (servers listen on 127.0.0.1 only).
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kvpki_cli.errors import BackendError
from kvpki_cli.keystores.azure import http as azure_http
from tests.conftest import Kvpki, StoreSetup, make_env
from tests.helpers import openssl
from tests.kvserver.fixtures import azure_env, azure_init_args
from tests.kvserver.server import KeyVaultTestServer
from tests.kvserver.tlsca import make_tls_files
from tests.test_azure_store import make_root, store

TRUST_ENV = ("KVPKI_AZURE_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


def hashed_dir(directory: Path, *cas: Path) -> Path:
    """A c_rehash-style directory: each CA as ``<subject hash>.0``."""
    directory.mkdir()
    for ca in cas:
        subject_hash = openssl("x509", "-hash", "-noout", "-in", str(ca)).stdout.decode().strip()
        (directory / f"{subject_hash}.0").write_bytes(ca.read_bytes())
    return directory


def bundle(path: Path, *cas: Path) -> Path:
    """A big bundle like the system one: the system CA file plus ``cas``."""
    system = Path(ssl.get_default_verify_paths().openssl_cafile)
    data = system.read_bytes() if system.is_file() else b""
    path.write_bytes(data + b"".join(ca.read_bytes() for ca in cas))
    return path


class TLSSpy:
    """Records how SSLContexts get their CA certificates and how many handshakes start."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loads: list[tuple[str, str | None]] = []
        self.handshakes = 0
        real_verify = ssl.SSLContext.load_verify_locations
        real_default = ssl.SSLContext.load_default_certs
        real_wrap = ssl.SSLContext.wrap_socket

        def load_verify_locations(
            ctx: ssl.SSLContext, cafile: Any = None, capath: Any = None, cadata: Any = None
        ) -> None:
            self.loads.append(("cafile", str(cafile)) if cafile else ("capath", str(capath)))
            real_verify(ctx, cafile, capath, cadata)

        def load_default_certs(ctx: ssl.SSLContext, purpose: Any = ssl.Purpose.SERVER_AUTH) -> None:
            self.loads.append(("default", None))
            real_default(ctx, purpose)

        def wrap_socket(ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
            if not kwargs.get("server_side"):  # the test server's own accept() wraps too
                self.handshakes += 1
            return real_wrap(ctx, *args, **kwargs)

        monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", load_verify_locations)
        monkeypatch.setattr(ssl.SSLContext, "load_default_certs", load_default_certs)
        monkeypatch.setattr(ssl.SSLContext, "wrap_socket", wrap_socket)

    def reset(self) -> None:
        self.loads.clear()
        self.handshakes = 0


@pytest.fixture
def warm_home(kv: KeyVaultTestServer, kv_env: dict[str, str], tmp_path: Path) -> Path:
    """A CA on the test vault with warm token/chain caches, made with the explicit test CA bundle."""
    home = tmp_path / "home"
    make_root(store(kv, home))
    kv.clear_log()
    return home


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A TLS CA that did not issue the test server's certificate."""
    return make_tls_files(tmp_path / "other").ca_bundle


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch, kv_env: dict[str, str]) -> TLSSpy:
    """No CA settings at all (the normal case on a real host), plus the spy."""
    for name in TRUST_ENV:
        monkeypatch.delenv(name, raising=False)
    return TLSSpy(monkeypatch)


def as_default_store(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make the full default store (what the fallback loads) be ``path``, as the system CA file is on a host."""
    monkeypatch.setattr(azure_http, "ssl_context", lambda ca_bundle: ssl.create_default_context(cafile=path))


def sign_once(kv: KeyVaultTestServer, home: Path) -> None:
    st = store(kv, home)
    signature = st.signer().sign(b"data", ec.ECDSA(hashes.SHA256()))
    public = st.load_chain()[0].public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"data", ec.ECDSA(hashes.SHA256()))


# ---------------------------------------------------------------- (1) fast path


def test_directory_alone_verifies_without_loading_the_big_file(
    kv: KeyVaultTestServer, warm_home: Path, trust: TLSSpy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = hashed_dir(tmp_path / "certs", kv.ca_bundle)
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    sign_once(kv, warm_home)
    assert trust.loads == [("capath", str(certs))]  # no CA file parsed, no load_default_certs
    assert trust.handshakes == 1
    assert [(e.method, e.kind) for e in kv.log] == [("POST", "vault")]


# ---------------------------------------------------------------- (2) fallback


def test_ca_only_in_the_system_bundle_succeeds_after_one_retry(
    kv: KeyVaultTestServer,
    warm_home: Path,
    trust: TLSSpy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    other_ca: Path,
) -> None:
    certs = hashed_dir(tmp_path / "certs", other_ca)
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    system = bundle(tmp_path / "system.pem", kv.ca_bundle)
    as_default_store(monkeypatch, system)
    st = store(kv, warm_home)
    st.signer().sign(b"data", ec.ECDSA(hashes.SHA256()))
    assert trust.loads == [("capath", str(certs)), ("cafile", str(system))]
    assert trust.handshakes == 2
    assert [(e.method, e.kind, e.status) for e in kv.log] == [("POST", "vault", 200)]
    # The rest of this process goes straight to the full store, also on a new connection.
    assert st._http is not None
    st._http.close()
    trust.reset()
    st.signer().sign(b"data", ec.ECDSA(hashes.SHA256()))
    assert trust.loads == [] and trust.handshakes == 1


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_directory_never_widens_an_environment_bundle(
    kv: KeyVaultTestServer,
    warm_home: Path,
    trust: TLSSpy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    """The environment's bundle lacks the CA; the directory has it: refused as before, directory unused."""
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_dir(tmp_path / "certs", kv.ca_bundle)))
    system = bundle(tmp_path / "system.pem")
    monkeypatch.setenv(variable, str(system))
    with pytest.raises(BackendError, match=r"TLS verification of .* failed"):
        store(kv, warm_home).signer().sign(b"data", ec.ECDSA(hashes.SHA256()))
    assert trust.loads == [("cafile", str(system))]
    assert trust.handshakes == 1
    assert kv.log == []


# ---------------------------------------------------------------- (3) trusted nowhere


def test_ca_trusted_nowhere_is_a_clear_backend_error_after_one_retry(
    kv: KeyVaultTestServer,
    warm_home: Path,
    trust: TLSSpy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    other_ca: Path,
) -> None:
    certs = hashed_dir(tmp_path / "certs", other_ca)
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    with pytest.raises(BackendError, match=r"TLS verification of .* failed.*KVPKI_AZURE_CA_BUNDLE"):
        store(kv, warm_home).signer().sign(b"data", ec.ECDSA(hashes.SHA256()))
    assert trust.loads == [("capath", str(certs)), ("default", None)]
    assert trust.handshakes == 2  # the directory, then the full default store; no retry loop
    assert kv.log == []


def test_cli_exits_6_when_the_ca_is_trusted_nowhere(
    kv: KeyVaultTestServer, tmp_path: Path, other_ca: Path, make_csr: Any
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    setup = StoreSetup("azure", init_args=lambda ca: azure_init_args(kv), env=azure_env(kv))
    Kvpki(home, make_env(home, setup.env), setup).init_ca("root", "--subject", "CN=Azure Test Root")
    kv.clear_log()
    env = {k: v for k, v in make_env(home, setup.env).items() if k not in TRUST_ENV}
    env["SSL_CERT_DIR"] = str(hashed_dir(tmp_path / "certs", other_ca))
    csr = make_csr().csr_pem
    start = time.monotonic()
    result = Kvpki(home, env, setup).run("sign-csr", "--ca", "root", input=csr)
    assert time.monotonic() - start < 10
    stderr = result.stderr.decode()
    assert result.returncode == 6, stderr
    assert result.stdout == b""
    assert stderr.count("\n") == 1 and "TLS verification of" in stderr and "KVPKI_AZURE_CA_BUNDLE" in stderr, stderr
    assert "Traceback" not in stderr
    assert kv.log == []
    # The same settings with the CA in the hashed directory sign with one request.
    env["SSL_CERT_DIR"] = str(hashed_dir(tmp_path / "certs2", kv.ca_bundle))
    result = Kvpki(home, env, setup).run("sign-csr", "--ca", "root", input=csr)
    assert result.returncode == 0, result.stderr.decode()
    assert [(e.method, e.kind) for e in kv.log] == [("POST", "vault")]


# ---------------------------------------------------------------- (4) explicit bundles


@pytest.mark.parametrize("how", ["KVPKI_AZURE_CA_BUNDLE", "setting"])
def test_explicit_ca_bundle_is_used_alone_as_before(
    kv: KeyVaultTestServer,
    warm_home: Path,
    trust: TLSSpy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    other_ca: Path,
    how: str,
) -> None:
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_dir(tmp_path / "certs", kv.ca_bundle, other_ca)))
    settings: dict[str, object] = {}
    if how == "setting":
        settings["ca_bundle"] = str(kv.ca_bundle)
    else:
        monkeypatch.setenv("KVPKI_AZURE_CA_BUNDLE", str(kv.ca_bundle))
    store(kv, warm_home, **settings).signer().sign(b"data", ec.ECDSA(hashes.SHA256()))
    assert trust.loads == [("cafile", str(kv.ca_bundle))]
    assert trust.handshakes == 1


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_environment_bundle_is_used_alone_as_before(
    kv: KeyVaultTestServer,
    warm_home: Path,
    trust: TLSSpy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_dir(tmp_path / "certs", kv.ca_bundle)))
    own = bundle(tmp_path / "own.pem", kv.ca_bundle)
    monkeypatch.setenv(variable, str(own))
    sign_once(kv, warm_home)
    assert trust.loads == [("cafile", str(own))]
    assert trust.handshakes == 1


def test_directory_without_hash_links_is_not_used(
    kv: KeyVaultTestServer, warm_home: Path, trust: TLSSpy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "test-ca.pem").write_bytes(kv.ca_bundle.read_bytes())  # not hashed: OpenSSL would not find it
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    as_default_store(monkeypatch, bundle(tmp_path / "system.pem", kv.ca_bundle))
    sign_once(kv, warm_home)
    assert trust.loads == [("cafile", str(tmp_path / "system.pem"))]
    assert trust.handshakes == 1
