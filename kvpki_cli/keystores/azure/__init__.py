"""The Azure Key Vault key store: a non-exportable CA key next to a Key Vault certificate.

Modules, one job each:

* ``store``    ``AzureKeyStore``, the ``KeyStore`` implementation (settings, caches, init-ca steps)
* ``initca``   init-ca as a resumable state machine (create, wait, merge; never deletes)
* ``sdk``      certificate operations through the Azure SDK (init-ca and cold caches only)
* ``fastsign`` one ``POST .../sign`` with a cached token and key id
* ``http``     a stdlib HTTPS JSON client for the fast path
* ``auth``     tokens: disk cache in front of ``DefaultAzureCredential``
* ``cache``    token and chain caches under ``$KVPKI_HOME/cache/azure``
* ``retry``    bounded backoff under one deadline
* ``signer``   ``cryptography`` private-key objects whose ``sign()`` asks the vault
* ``errors``   the one place for Key Vault error codes, the role table, the TLS hint and exit codes

The signing fast path (warm caches: ``store`` -> ``fastsign`` -> ``http``) never
imports the Azure SDK; ``sdk``, ``initca`` and azure-identity are imported only
when a cache is cold, a token must be requested, or init-ca runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvpki_cli.keystores.azure.store import AzureKeyStore

__all__ = ["AzureKeyStore"]


def __getattr__(name: str) -> Any:
    """``AzureKeyStore`` on first use, so importing one module (e.g. ``http``) loads only that module."""
    if name == "AzureKeyStore":
        from kvpki_cli.keystores.azure.store import AzureKeyStore

        return AzureKeyStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
