"""The key-store interface every CA key backend implements.

Modelled on the small key-manager interfaces of mature CAs: create a key, hand
out a signer, keep the CA certificate chain next to the key.  The signer is a
``cryptography`` private key object, so certificate, CRL and OCSP builders work
unchanged whether the key is a local file or a non-exportable vault key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from cryptography import x509

# Key types and aliases live in pki.keys (the lower layer); re-exported here for existing imports.
from kvpki_cli.pki.keys import CAPrivateKey, CAPublicKey, KeyType

__all__ = ["CAPrivateKey", "CAPublicKey", "KeyStore", "KeyType"]


class KeyStore(ABC):
    """One CA's private key and certificate chain, wherever they live."""

    ca_name: str

    @abstractmethod
    def exists(self) -> bool:
        """True when this CA already has a key or a certificate in the store."""

    @abstractmethod
    def create_key(self, key_type: KeyType) -> CAPublicKey:
        """Create the CA key (never overwriting one) and return its public key."""

    @abstractmethod
    def signer(self) -> CAPrivateKey:
        """A private-key object whose ``sign()`` uses the CA key (locally or in the vault)."""

    @abstractmethod
    def store_chain(self, chain: Sequence[x509.Certificate]) -> None:
        """Save the CA certificate (first) and its issuers up to the root."""

    @abstractmethod
    def load_chain(self) -> list[x509.Certificate]:
        """The CA certificate first, then its issuers up to the root."""

    def signing_jobs(self) -> int:
        """How many signatures are worth having in flight at once (the default of ``sign-csr --jobs``).

        1 for a local key (threads would only contend for the CPU); a remote store whose
        latency dominates says how many keep its rate busy.
        """
        return 1

    def discard(self) -> None:  # noqa: B027 - optional capability, default is a no-op
        """Remove a half-created CA after a failed ``init-ca`` (best effort)."""

    def reachable(self) -> bool:
        """A cheap health answer (``/healthz``): can this store sign right now, as far as we know?"""
        return True
