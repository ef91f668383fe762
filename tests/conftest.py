"""Shared fixtures: run the real `kvpki` executable in a throwaway KVPKI_HOME, per key store.

Tests drive kvpki the way services do (a subprocess, CSR on stdin, PEM on stdout)
and check what it issues with tools nobody here wrote (openssl, pkilint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import openssl

REPO = Path(__file__).resolve().parent.parent
KVPKI = [sys.executable, "-m", "kvpki_cli"]


@dataclass
class StoreSetup:
    """How to create CAs on one key store: extra init-ca arguments and environment."""

    name: str
    init_args: Callable[[str], list[str]] = field(default=lambda ca: [])
    env: dict[str, str] = field(default_factory=dict)


def _local_store(request: pytest.FixtureRequest) -> StoreSetup:
    return StoreSetup("local")


def _azure_store(request: pytest.FixtureRequest) -> StoreSetup:
    """The Azure store against the Key Vault-protocol test server (tests/kvserver)."""
    factory = request.getfixturevalue("azure_store_setup")
    return factory()  # type: ignore[no-any-return]


STORE_FACTORIES: dict[str, Callable[[pytest.FixtureRequest], StoreSetup]] = {"local": _local_store}
pytest_plugins = ["tests.pg_fixture", "tests.kvserver.fixtures"]  # real PostgreSQL; the Key Vault test server
STORE_FACTORIES["azure"] = _azure_store


@dataclass
class Kvpki:
    """Runs the kvpki CLI as a subprocess with a private home directory."""

    home: Path
    env: dict[str, str]
    store: StoreSetup

    def run(
        self, *args: str, input: bytes | None = None, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [*KVPKI, *args], input=input, capture_output=True, env=self.env, timeout=timeout, cwd=self.home
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kvpki {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}")
        return result

    def ok(self, *args: str, input: bytes | None = None) -> bytes:
        return self.run(*args, input=input, check=True).stdout

    def init_ca(self, name: str, *args: str) -> bytes:
        extra = [] if "--parent" in args else self.store.init_args(name)
        return self.ok("init-ca", "--name", name, *extra, *args)

    def inventory(self, ca: str) -> list[dict[str, object]]:
        return json.loads(self.ok("list", "--ca", ca, "--json"))  # type: ignore[no-any-return]


def make_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(REPO), "KVPKI_REQUESTER": "pytest"})
    env.update(extra or {})
    return env


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request: pytest.FixtureRequest) -> StoreSetup:
    return STORE_FACTORIES[request.param](request)


@pytest.fixture
def kvpki(tmp_path: Path, store: StoreSetup) -> Kvpki:
    """A kvpki runner on every key store."""
    home = tmp_path / "home"
    home.mkdir()
    return Kvpki(home, make_env(home, store.env), store)


@pytest.fixture
def local_kvpki(tmp_path: Path) -> Kvpki:
    """A kvpki runner on the local store only (tests about the local store itself, benchmarks)."""
    home = tmp_path / "home"
    home.mkdir()
    setup = StoreSetup("local")
    return Kvpki(home, make_env(home), setup)


@dataclass
class DeviceKey:
    key: Path
    csr_pem: bytes


@pytest.fixture
def make_csr(tmp_path: Path) -> Iterator[Callable[..., DeviceKey]]:
    """Make a key and CSR with openssl (a CSR generator nobody here wrote)."""
    counter = iter(range(10**6))

    def factory(
        subject: str = "/CN=device-001",
        newkey: Sequence[str] = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
        extra: Sequence[str] = (),
    ) -> DeviceKey:
        key = tmp_path / f"key{next(counter)}.pem"
        out = openssl("req", "-new", *newkey, "-nodes", "-keyout", str(key), "-subj", subject, *extra)
        return DeviceKey(key, out.stdout)

    yield factory
