"""A Key Vault-protocol test server (HTTPS on 127.0.0.1) with an Entra ID token endpoint."""

from tests.kvserver.server import FaultRule, KeyVaultTestServer

__all__ = ["FaultRule", "KeyVaultTestServer"]
