"""Fixtures for the DPS test server; import them into a test module (``from tests.dpsserver.fixtures import ...``).

Importing this module installs the network guard in the pytest process, and ``dps_env`` puts it
on the PYTHONPATH of kvpki subprocesses, as the Key Vault fixtures do: no test can reach a real
DPS, Entra ID or the managed-identity endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.netguard.sitecustomize  # noqa: F401 - installs the network guard in this process
from tests.dpsserver.server import DpsTestServer

REPO = Path(__file__).resolve().parents[2]
NETGUARD_DIR = REPO / "tests" / "netguard"


def dps_env(server: DpsTestServer, home: Path) -> dict[str, str]:
    """Environment of a kvpki subprocess that talks to ``server`` through DefaultAzureCredential."""
    drop = ("KVPKI_", "AZURE_", "MSI_", "IDENTITY_", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(server.client_env())
    env.update(
        {
            "KVPKI_HOME": str(home),
            "KVPKI_REQUESTER": "pytest",
            "PYTHONPATH": os.pathsep.join([str(NETGUARD_DIR), str(REPO)]),  # sitecustomize = netguard
        }
    )
    return env


@pytest.fixture(scope="session")
def dps_server() -> Iterator[DpsTestServer]:
    server = DpsTestServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="dps")
def dps_fixture(dps_server: DpsTestServer) -> DpsTestServer:
    """The session server with no enrollments, faults or log."""
    dps_server.reset()
    return dps_server
