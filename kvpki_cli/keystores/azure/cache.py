"""On-disk caches that let a fresh ``kvpki`` process sign with one vault request.

* ``TokenCache``: access tokens per (identity, scope, tenant), so processes share
  one token until it nears expiry instead of each asking Entra ID.
* ``ChainCache``: the CA chain, certificate version and key id, so a process
  needs neither a certificate fetch nor a key fetch before signing.

Files live under ``<home>/cache/azure`` with directories 0700 and files 0600;
anything group/other-accessible is ignored (and rewritten), never trusted.  A
file that parses but holds wrong types, a ``fetched_at`` in the future, or a
chain whose first certificate does not carry the vault key's public key
(``key_spki``) or whose issuers did not sign it is treated as missing: the caller
refetches from the vault.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kvpki_cli.errors import KvpkiError
from kvpki_cli.fileutil import write_file_atomic
from kvpki_cli.keystores.base import CAPublicKey
from kvpki_cli.pki.lean import Encoding, PublicFormat

# Tokens are used only while this many seconds remain (azure-core refreshes at 300 s too).
TOKEN_REFRESH_MARGIN = 300


def cache_root(home: Path) -> Path:
    return home / "cache" / "azure"


def _read_private_json(path: Path) -> dict[str, Any] | None:
    """Parsed JSON object, or None when missing, unreadable, corrupt or not private."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.getuid():
            return None
        try:
            data = json.loads(handle.read())
        except (OSError, ValueError, RecursionError):
            return None
    return data if isinstance(data, dict) else None


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file_atomic(path, json.dumps(data, sort_keys=True).encode(), mode=0o600, durable=False)
    except (OSError, KvpkiError):
        pass


def install_id(home: Path) -> str:
    """A random id for this KVPKI_HOME, tagged on the vault versions its init-ca creates.

    It lets init-ca tell "my own CA, merged but not finished locally" (resume) from a CA another
    installation made (refuse).  If it cannot be stored, a fresh id means "not mine": the safe side.
    """
    path = cache_root(home) / "install-id.json"
    found = (_read_private_json(path) or {}).get("id")
    if isinstance(found, str) and len(found) == 32 and found.isalnum():
        return found
    new = os.urandom(16).hex()
    _write_private_json(path, {"id": new})
    return new


def identity_key() -> str:
    """Who the tokens belong to, from the environment that configures the credential (no secrets)."""
    parts = [
        os.environ.get(name, "")
        for name in (
            "AZURE_AUTHORITY_HOST",
            "AZURE_TENANT_ID",
            "AZURE_CLIENT_ID",
            "AZURE_TOKEN_CREDENTIALS",
            "AZURE_USERNAME",
            "AZURE_FEDERATED_TOKEN_FILE",
        )
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


class TokenCache:
    """Bearer tokens shared by processes of the same user and identity."""

    def __init__(self, home: Path, identity: str | None = None) -> None:
        self.path = cache_root(home) / "tokens.json"
        self.identity = identity or identity_key()

    def _key(self, scope: str, tenant: str | None) -> str:
        return f"{self.identity}|{scope}|{tenant or ''}"

    def get(self, scope: str, tenant: str | None) -> tuple[str, int] | None:
        entry = (_read_private_json(self.path) or {}).get(self._key(scope, tenant))
        if not isinstance(entry, dict):
            return None
        token, expires_on = entry.get("token"), _number(entry.get("expires_on"))
        if not isinstance(token, str) or expires_on - time.time() < TOKEN_REFRESH_MARGIN:
            return None
        return token, int(expires_on)

    def put(self, scope: str, tenant: str | None, token: str, expires_on: int) -> None:
        data = _read_private_json(self.path) or {}
        now = time.time()
        data = {k: v for k, v in data.items() if isinstance(v, dict) and _number(v.get("expires_on")) > now}
        data[self._key(scope, tenant)] = {"token": token, "expires_on": int(expires_on)}
        _write_private_json(self.path, data)

    def drop(self, token: str) -> None:
        data = _read_private_json(self.path)
        if not data:
            return
        kept = {k: v for k, v in data.items() if not (isinstance(v, dict) and v.get("token") == token)}
        if len(kept) != len(data):
            _write_private_json(self.path, kept)


def _number(value: Any) -> float:
    """A finite JSON number, else -inf (so comparisons treat it as expired/invalid)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return -math.inf
    try:
        number = float(value)
    except OverflowError:
        return -math.inf
    return number if math.isfinite(number) else -math.inf


def spki_b64(public: PublicKeyTypes) -> str:
    """The key's SubjectPublicKeyInfo (DER, base64): what the cached chain's first certificate must carry."""
    return base64.b64encode(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).decode()


class CachedCA(NamedTuple):
    """What a signing process needs to know about a vault CA."""

    vault_url: str
    cert_name: str
    cert_version: str
    kid: str  # https://<vault>/keys/<name>/<version>
    chain_pem: list[str]
    scope: str
    tenant: str | None
    fetched_at: float
    key_spki: str  # the vault key's public key, recorded when the chain came from the vault

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CachedCA | None:
        """The cached CA if every field has its type and the chain belongs to the key, else None."""
        strings = ("vault_url", "cert_name", "cert_version", "kid", "scope", "key_spki")
        if set(data) != set(cls._fields) or not all(isinstance(data[name], str) for name in strings):
            return None
        chain, tenant, fetched_at = data["chain_pem"], data["tenant"], _number(data["fetched_at"])
        if not isinstance(chain, list) or not chain or not all(isinstance(pem, str) for pem in chain):
            return None
        if (tenant is not None and not isinstance(tenant, str)) or fetched_at == -math.inf:
            return None
        if not data["kid"].startswith(data["vault_url"] + "/keys/"):
            return None  # the key id must name a key in this vault
        try:
            certs = [x509.load_pem_x509_certificate(pem.encode()) for pem in chain]
            for child, parent in itertools.pairwise(certs):  # the issuers really issued it (~0.1-0.4 ms a link)
                child.verify_directly_issued_by(parent)
            public = certs[0].public_key()
        except (ValueError, TypeError, InvalidSignature):
            return None
        if not isinstance(public, CAPublicKey) or spki_b64(public) != data["key_spki"]:
            return None  # a chain that does not carry the vault key (substituted or stale)
        return cls(**{**data, "fetched_at": fetched_at})


class ChainCache:
    """One CA's chain and key id, keyed by vault host and certificate name."""

    def __init__(self, home: Path, vault_url: str, cert_name: str) -> None:
        host = urlsplit(vault_url).netloc.replace(":", "_") or "vault"
        self.path = cache_root(home) / host / f"{cert_name}.json"
        self.vault_url = vault_url
        self.cert_name = cert_name

    def load(self, max_age: float) -> CachedCA | None:
        data = _read_private_json(self.path)
        cached = CachedCA.from_json(data) if data is not None else None
        if cached is None or cached.vault_url != self.vault_url or cached.cert_name != self.cert_name:
            return None
        age = time.time() - cached.fetched_at
        if age < 0 or age > max_age:
            return None  # expired, or from the future (a clock that jumped, or a forged entry)
        return cached

    def save(self, cached: CachedCA) -> None:
        _write_private_json(self.path, cached._asdict())

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
