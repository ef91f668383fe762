"""pytest plugin: the Key Vault test server and the environment a kvpki subprocess needs to use it.

``tests/conftest.py`` loads it with ``pytest_plugins = ["tests.kvserver.fixtures"]``.
Importing it also installs the network guard in the pytest process, so no test
can reach a non-loopback address (e.g. the managed-identity endpoint).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.netguard.sitecustomize  # noqa: F401 - installs the network guard in this process
from tests.kvserver.server import KeyVaultTestServer

REPO = Path(__file__).resolve().parents[2]
NETGUARD_DIR = REPO / "tests" / "netguard"
# Small retry deadline so fault tests finish quickly (seconds).
TEST_DEADLINE = "3"


def azure_env(server: KeyVaultTestServer, **overrides: str) -> dict[str, str]:
    """Environment variables for a kvpki process that uses ``server`` through DefaultAzureCredential."""
    env = server.client_env()
    env["KVPKI_AZURE_DEADLINE"] = TEST_DEADLINE
    env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD_DIR), str(REPO)])  # sitecustomize = netguard
    env.update(overrides)
    return env


def azure_init_args(server: KeyVaultTestServer) -> list[str]:
    """Extra ``kvpki init-ca`` arguments for a CA on ``server``."""
    return ["--store", "azure", "--vault-url", server.url]


def clean_process_env() -> dict[str, str]:
    """The current environment without proxies or Azure/kvpki settings that could leak into a test."""
    drop = ("KVPKI_", "AZURE_", "MSI_", "IDENTITY_", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="session")
def kv_server() -> Iterator[KeyVaultTestServer]:
    """One in-process Key Vault test server (thread) for the session."""
    server = KeyVaultTestServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kv(kv_server: KeyVaultTestServer) -> KeyVaultTestServer:
    """The session server, reset to an empty vault with no faults and an empty request log."""
    kv_server.reset()
    return kv_server


@pytest.fixture
def kv_env(kv: KeyVaultTestServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this (pytest) process at the test server, for store-level tests; returns the variables."""
    env = azure_env(kv)
    for name in [k for k in os.environ if k.startswith(("AZURE_", "KVPKI_AZURE_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name != "PYTHONPATH":
            monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def azure_store_setup(kv: KeyVaultTestServer) -> Callable[[], Any]:
    """Factory for the ``StoreSetup`` of ``tests/conftest.py`` (azure store on a fresh test vault)."""

    def factory() -> Any:
        from tests.conftest import StoreSetup

        return StoreSetup("azure", init_args=lambda ca: azure_init_args(kv), env=azure_env(kv))

    return factory
