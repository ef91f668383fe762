"""Key stores: where a CA's private key lives and who signs with it.

``open_keystore`` is the one place that picks an implementation from configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvpki_cli.errors import UsageError
from kvpki_cli.keystores.base import KeyStore

STORE_NAMES = ("local", "azure")


def open_keystore(store: str, ca_name: str, settings: Mapping[str, Any], home: Path) -> KeyStore:
    """Return the key store for one CA; imports only the implementation that is used."""
    if store == "local":
        from kvpki_cli.keystores.local import LocalKeyStore

        return LocalKeyStore(ca_name, settings, home)
    if store == "azure":
        from kvpki_cli.keystores.azure.store import AzureKeyStore

        return AzureKeyStore(ca_name, settings, home)
    raise UsageError(f"unknown key store {store!r} (expected one of: {', '.join(STORE_NAMES)})")
