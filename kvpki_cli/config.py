"""Configuration: KVPKI_HOME, the TOML config file, per-CA metadata and KVPKI_* overrides.

Precedence: command-line flags > ``KVPKI_*`` environment > ``config.toml`` >
``cas/<name>/ca.json`` (written by ``init-ca``) > built-in defaults.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from kvpki_cli.durations import parse_duration
from kvpki_cli.errors import NotFound, UsageError
from kvpki_cli.fileutil import write_file_atomic
from kvpki_cli.pki.certificates import PublicationUrls
from kvpki_cli.pki.profiles import Profile

CA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
DEFAULT_BACKDATE = "5m"


def default_home() -> Path:
    env = os.environ.get("KVPKI_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME")
    return (Path(data) if data else Path.home() / ".local" / "share") / "kvpki"


def check_ca_name(name: str) -> str:
    if not CA_NAME.match(name):
        raise UsageError(f"invalid CA name {name!r} (letters, digits, '-' and '_', up to 63 characters)")
    return name


class CaConfig(NamedTuple):
    """Everything about one named CA except its key and certificates."""

    name: str
    store: str
    store_settings: Mapping[str, Any]
    key_type: str | None
    parent: str | None
    urls: PublicationUrls
    backdate: timedelta


class Settings:
    """The loaded configuration for one kvpki invocation."""

    def __init__(self, home: Path, file_config: Mapping[str, Any] | None = None) -> None:
        self.home = home
        self.file_config: Mapping[str, Any] = file_config or {}
        self._profiles: dict[str, Profile] | None = None

    @classmethod
    def load(cls, home: Path | None = None) -> Settings:
        home = home or default_home()
        path = Path(os.environ.get("KVPKI_CONFIG") or home / "config.toml")
        file_config: Mapping[str, Any] = {}
        if path.exists():
            import tomllib

            try:
                file_config = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
            except OSError as exc:
                raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
        return cls(home=home, file_config=file_config)

    @property
    def inventory_url(self) -> str | None:
        return os.environ.get("KVPKI_INVENTORY_URL") or self.file_config.get("inventory", {}).get("url")

    @property
    def profiles(self) -> dict[str, Profile]:
        if self._profiles is None:
            from kvpki_cli.pki.profiles import load_profiles

            self._profiles = load_profiles(self.file_config.get("profiles", {}))
        return self._profiles

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise UsageError(f"unknown profile {name!r} (one of: {', '.join(self.profiles)})") from None

    def ca_directory(self, name: str) -> Path:
        """Where CA ``name``'s metadata (and, on the local store, its key and chain) live."""
        return self.home / "cas" / check_ca_name(name)

    def _metadata_path(self, name: str) -> Path:
        return self.ca_directory(name) / "ca.json"

    def ca_names(self) -> list[str]:
        names = set(self.file_config.get("ca", {}))
        cas_dir = self.home / "cas"
        if cas_dir.is_dir():
            names.update(p.parent.name for p in cas_dir.glob("*/ca.json"))
        return sorted(names)

    def ca(self, name: str, *, must_exist: bool = True, overrides: Mapping[str, Any] | None = None) -> CaConfig:
        """Merge metadata, config file, environment and flags for CA ``name``."""
        check_ca_name(name)
        merged: dict[str, Any] = {}
        meta_path = self._metadata_path(name)
        if meta_path.exists():
            try:
                merged.update(json.loads(meta_path.read_text()))
            except (ValueError, OSError) as exc:
                raise UsageError(f"CA metadata {meta_path} is unreadable: {exc}") from None
        elif must_exist:
            raise NotFound(f"unknown CA {name!r} (create it with 'kvpki init-ca --name {name}')")
        table = self.file_config.get("ca", {}).get(name, {})
        store_settings = dict(merged.get("store_settings", {}))
        store_settings.update(table.get("store_settings", {}))
        merged.update({k: v for k, v in table.items() if k != "store_settings"})
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key == "store_settings":
                store_settings.update({k: v for k, v in value.items() if v is not None})
            else:
                merged[key] = value
        env_store = os.environ.get("KVPKI_STORE")
        if env_store and not meta_path.exists():
            merged.setdefault("store", env_store)
        backdate = str(
            os.environ.get("KVPKI_BACKDATE") or merged.get("backdate") or self._default("backdate") or DEFAULT_BACKDATE
        )
        return CaConfig(
            name=name,
            store=str(merged.get("store", "local")),
            store_settings=store_settings,
            key_type=merged.get("key_type"),
            parent=merged.get("parent"),
            urls=self._urls(name, merged),
            backdate=timedelta(0) if backdate.strip() in ("0", "0s") else parse_duration(backdate, what="backdate"),
        )

    def _default(self, key: str) -> Any:
        return self.file_config.get("defaults", {}).get(key)

    def _urls(self, name: str, merged: Mapping[str, Any]) -> PublicationUrls:
        """Explicit URLs win; otherwise derive them from ``base_url`` (the EST/CRL/OCSP server)."""
        base = merged.get("base_url") or self._default("base_url")
        base = str(base).rstrip("/") if base else None
        return PublicationUrls(
            crl=merged.get("crl_url") or (f"{base}/crl/{name}.crl" if base else None),
            ocsp=merged.get("ocsp_url") or (f"{base}/ocsp/{name}" if base else None),
            ca_issuers=merged.get("ca_issuers_url") or (f"{base}/ca/{name}.crt" if base else None),
        )

    def save_ca_metadata(self, ca: CaConfig) -> None:
        """Persist what later commands need to find the CA's key (no secrets)."""
        path = self._metadata_path(ca.name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        document = {
            "store": ca.store,
            "store_settings": dict(ca.store_settings),
            "key_type": ca.key_type,
            "parent": ca.parent,
        }
        write_file_atomic(path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644)
