"""On-disk caches that let a fresh ``kvpki`` process sign with one vault request.

* ``TokenCache``: access tokens per (identity, scope, tenant), so processes share
  one token until it nears expiry instead of each asking Entra ID.
* ``ChainCache``: the CA chain, certificate version and key id, so a process
  needs neither a certificate fetch nor a key fetch before signing.

Files live under ``<home>/cache/azure`` with directories 0700 and files 0600;
anything group/other-accessible is ignored (and rewritten), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from kvpki_cli.errors import KvpkiError
from kvpki_cli.fileutil import write_file_atomic

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
        except ValueError:
            return None
    return data if isinstance(data, dict) else None


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file_atomic(path, json.dumps(data, sort_keys=True).encode(), mode=0o600, durable=False)
    except (OSError, KvpkiError):
        pass


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
        token, expires_on = entry.get("token"), entry.get("expires_on")
        if not isinstance(token, str) or not isinstance(expires_on, int):
            return None
        if expires_on - time.time() < TOKEN_REFRESH_MARGIN:
            return None
        return token, expires_on

    def put(self, scope: str, tenant: str | None, token: str, expires_on: int) -> None:
        data = _read_private_json(self.path) or {}
        now = time.time()
        data = {k: v for k, v in data.items() if isinstance(v, dict) and v.get("expires_on", 0) > now}
        data[self._key(scope, tenant)] = {"token": token, "expires_on": int(expires_on)}
        _write_private_json(self.path, data)

    def drop(self, token: str) -> None:
        data = _read_private_json(self.path)
        if not data:
            return
        kept = {k: v for k, v in data.items() if not (isinstance(v, dict) and v.get("token") == token)}
        if len(kept) != len(data):
            _write_private_json(self.path, kept)


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


class ChainCache:
    """One CA's chain and key id, keyed by vault host and certificate name."""

    def __init__(self, home: Path, vault_url: str, cert_name: str) -> None:
        host = urlsplit(vault_url).netloc.replace(":", "_") or "vault"
        self.path = cache_root(home) / host / f"{cert_name}.json"
        self.vault_url = vault_url
        self.cert_name = cert_name

    def load(self, max_age: float) -> CachedCA | None:
        data = _read_private_json(self.path)
        if data is None:
            return None
        try:
            cached = CachedCA(**data)
        except TypeError:
            return None
        if cached.vault_url != self.vault_url or cached.cert_name != self.cert_name:
            return None
        if time.time() - cached.fetched_at > max_age or not cached.chain_pem:
            return None
        return cached

    def save(self, cached: CachedCA) -> None:
        _write_private_json(self.path, cached._asdict())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
