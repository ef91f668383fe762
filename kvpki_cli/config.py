"""Configuration: KVPKI_HOME, the TOML config file, per-CA metadata and KVPKI_* overrides.

Precedence: command-line flags > ``KVPKI_*`` environment > ``config.toml`` >
``cas/<name>/ca.json`` (written by ``init-ca``) > built-in defaults.

The config file fails closed: an unknown table or key, a value of the wrong
type, or a missing ``KVPKI_CONFIG`` file is a usage error naming the file and
the key (a misspelt policy must never be silently ignored), and a file or CA
directory that another user could have written is refused (``safepaths``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from kvpki_cli.durations import parse_duration
from kvpki_cli.errors import NotFound, UsageError
from kvpki_cli.fileutil import read_error, read_regular_file, write_file_atomic
from kvpki_cli.pki.certificates import PublicationUrls
from kvpki_cli.pki.keys import KeyType
from kvpki_cli.pki.profiles import Profile
from kvpki_cli.safepaths import check_trusted, check_trusted_path, make_private_dir

# ASCII letters, digits, '-' and '_': CA names go into file paths and CRL DP/OCSP/caIssuers URLs.
CA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", re.ASCII)
DEFAULT_BACKDATE = "5m"
MAX_CONFIG_BYTES = 1 << 20


def default_home() -> Path:
    env = os.environ.get("KVPKI_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME")
    return (Path(data) if data else Path.home() / ".local" / "share") / "kvpki"


def check_ca_name(name: str) -> str:
    """Refuse names outside the safe charset (newlines, controls, '/', '.', non-ASCII, too long)."""
    if not isinstance(name, str) or not CA_NAME.fullmatch(name):
        shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
        raise UsageError(f"invalid CA name {shown} (letters, digits, '-' and '_', up to 63 characters)")
    return name


# --- config file schema -------------------------------------------------------------------------

# A check returns None when the value is acceptable, else what it should have been.
Check = Callable[[Any], str | None]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[!-~]+")
STORE_NAMES = ("local", "azure")
KEY_TYPES = tuple(key_type.value for key_type in KeyType)
MAX_CRL_PARTITION_SIZE = 10_000_000


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _seconds(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6
    return None if ok else "a positive number of seconds"


MIN_SIGN_RATE = 0.01


def _rate(value: Any) -> str | None:
    # at least one signature per 100 s: 1e-300 would put the next signature's turn beyond time.sleep's range
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and MIN_SIGN_RATE <= value < 1e6
    return None if ok else f"a number of signatures per second from {MIN_SIGN_RATE} to 1e6"


def _partition_size(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CRL_PARTITION_SIZE
    return None if ok else f"a whole number of certificates per CRL partition (1 to {MAX_CRL_PARTITION_SIZE})"


def _url(value: Any) -> str | None:
    ok = isinstance(value, str) and _URL.fullmatch(value) is not None
    return None if ok else "an absolute URL (scheme://...) without spaces or control characters"


def _duration(value: Any) -> str | None:
    if not isinstance(value, str):
        return 'a duration string such as "5m"'
    if value.strip() in ("0", "0s"):
        return None
    try:
        parse_duration(value)
    except UsageError:
        return 'a duration string such as "5m"'
    return None


def _choice(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(choices)

    return check


def _ca_name(value: Any) -> str | None:
    ok = isinstance(value, str) and CA_NAME.fullmatch(value) is not None
    return None if ok else "a CA name (letters, digits, '-' and '_')"


DEFAULTS_KEYS: dict[str, Check] = {"backdate": _duration, "base_url": _url}
INVENTORY_KEYS: dict[str, Check] = {"url": _string}
CA_KEYS: dict[str, Check] = {
    "store": _choice(*STORE_NAMES),
    "store_settings": lambda value: None,  # a table, checked against STORE_SETTINGS
    "key_type": _choice(*KEY_TYPES),
    "parent": _ca_name,
    "backdate": _duration,
    "base_url": _url,
    "crl_url": _url,
    "ocsp_url": _url,
    "ca_issuers_url": _url,
    "renew_after_expiry": _duration,  # expired certificates renew within this long after notAfter
    "crl_partition_size": _partition_size,  # certificates per partitioned CRL (RFC 5280 5.2.5); off when absent
    "dps_url": _url,  # Azure DPS whose enrollments `kvpki revoke` disables (kvpki_cli/dps.py)
}
# What each key store reads from [ca.NAME.store_settings]; a store that gains a setting adds it here.
STORE_SETTINGS: dict[str, dict[str, Check]] = {
    "local": {"directory": _string, "passphrase_file": _string},
    "azure": {
        "vault_url": _url,
        "key_name": _string,
        "hsm": _boolean,
        "ca_bundle": _string,
        "deadline": _seconds,
        "cache_ttl": _seconds,
        "create_timeout": _seconds,
        "sign_rate": _rate,
    },
}
TOP_LEVEL = ("defaults", "inventory", "ca", "profiles")


def _key_path(*parts: str) -> str:
    """A TOML table path for messages, quoting (and escaping) anything that is not a bare key."""
    bare = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
    return ".".join(p if bare.fullmatch(p) else json.dumps(p) for p in parts)


def _suggest(key: str, known: Any) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"


def _check_table(
    source: str, where: tuple[str, ...], table: Any, schema: Mapping[str, Check], context: str = ""
) -> None:
    if not isinstance(table, Mapping):
        raise UsageError(f"{source}: [{_key_path(*where)}] must be a table")
    for key, value in table.items():
        check = schema.get(key)
        if check is None:
            raise UsageError(
                f"{source}: unknown key {key!r} in [{_key_path(*where)}]{context}{_suggest(key, schema)}"
            )
        expected = check(value)
        if expected is not None:
            shown = repr(value)[:60]
            raise UsageError(f"{source}: {_key_path(*where, key)} must be {expected}, not {shown}")


def store_settings_schema(store: str | None) -> dict[str, Check]:
    """The settings one store reads; every store's settings when the store is not known yet."""
    if store in STORE_SETTINGS:
        return STORE_SETTINGS[store]
    return {key: check for checks in STORE_SETTINGS.values() for key, check in checks.items()}


def validate_file_config(document: Mapping[str, Any], source: str) -> None:
    """Refuse anything the config file says that kvpki would not act on exactly as written."""
    for key, value in document.items():
        if key not in TOP_LEVEL:
            kind = "table" if isinstance(value, Mapping) else "key"
            shown = f"[{_key_path(key)}]" if kind == "table" else repr(key)
            close = _suggest(key, TOP_LEVEL)
            raise UsageError(f"{source}: unknown {kind} {shown}{close}")
        if not isinstance(value, Mapping):
            raise UsageError(f"{source}: [{_key_path(key)}] must be a table")
    _check_table(source, ("defaults",), document.get("defaults", {}), DEFAULTS_KEYS)
    _check_table(source, ("inventory",), document.get("inventory", {}), INVENTORY_KEYS)
    for name, table in document.get("ca", {}).items():
        if CA_NAME.fullmatch(name) is None:
            raise UsageError(f"{source}: [{_key_path('ca', name)}]: invalid CA name")
        _check_table(source, ("ca", name), table, CA_KEYS)
        store = table.get("store")
        schema = store_settings_schema(store)
        context = f" for the {store} store" if store else ""
        _check_table(source, ("ca", name, "store_settings"), table.get("store_settings", {}), schema, context)
    for name, table in document.get("profiles", {}).items():
        if not isinstance(table, Mapping):
            raise UsageError(f"{source}: [{_key_path('profiles', name)}] must be a table")


def read_config_file(path: Path, *, required: bool) -> Mapping[str, Any]:
    """Parse and validate one trusted config file ({} when an optional one is absent)."""
    try:  # a FIFO planted as the config file is refused, never waited on; ownership checked on the open file
        data = read_regular_file(
            path, MAX_CONFIG_BYTES, check=lambda status: check_trusted(path, status, "config file")
        )
    except FileNotFoundError:
        if required:
            raise UsageError(f"config file {path} (KVPKI_CONFIG) does not exist") from None
        return {}
    except OSError as exc:
        raise UsageError(read_error("config file", path, exc)) from None
    check_trusted_path(path.parent, "config directory", allow_sticky=True)
    import tomllib  # only when there is a file: not on the start-up path of a config-less sign-csr

    try:
        document = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    validate_file_config(document, f"config file {path}")
    return document


class CaConfig(NamedTuple):
    """Everything about one named CA except its key and certificates."""

    name: str
    store: str
    store_settings: Mapping[str, Any]
    key_type: str | None
    parent: str | None
    urls: PublicationUrls
    backdate: timedelta
    renew_after_expiry: timedelta | None = None  # `kvpki renew` of expired certificates (default: off)
    crl_partition_size: int | None = None  # leaf certificates per partition CRL; None: one full CRL


class Settings:
    """The loaded configuration for one kvpki invocation."""

    def __init__(self, home: Path, file_config: Mapping[str, Any] | None = None, source: str = "config") -> None:
        self.home = home
        self.file_config: Mapping[str, Any] = file_config or {}
        self.source = source  # how messages name the config file
        self._profiles: dict[str, Profile] | None = None

    @classmethod
    def load(cls, home: Path | None = None) -> Settings:
        home = home or default_home()
        explicit = os.environ.get("KVPKI_CONFIG")
        path = Path(explicit).expanduser() if explicit else home / "config.toml"
        file_config = read_config_file(path, required=bool(explicit))
        settings = cls(home=home, file_config=file_config, source=f"config file {path}")
        if file_config.get("profiles"):
            try:  # eagerly, so a wrong profile fails every command, not only the one that uses it
                settings.profiles  # noqa: B018
            except UsageError as exc:
                raise UsageError(f"{settings.source}: {str(exc).removeprefix('config: ')}") from None
        return settings

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

    def make_ca_directory(self, name: str) -> Path:
        """Create KVPKI_HOME, cas/ and the CA's directory as 0700 whatever the umask (init-ca)."""
        directory = self.ca_directory(name)
        make_private_dir(directory, "CA directory")
        self.check_ca_directory(name)
        return directory

    def check_ca_directory(self, name: str) -> None:
        """Refuse a CA whose metadata another user could have written (ssh-style, like the config file)."""
        directory = self.ca_directory(name)
        for path, what in (
            (self.home, "KVPKI_HOME"),
            (directory.parent, "CA directory"),
            (directory, "CA directory"),
            (directory / "ca.json", "CA metadata"),
        ):
            if not check_trusted_path(path, what):
                return

    def ca_names(self) -> list[str]:
        names = set(self.file_config.get("ca", {}))
        cas_dir = self.home / "cas"
        if cas_dir.is_dir():
            names.update(p.parent.name for p in cas_dir.glob("*/ca.json") if CA_NAME.fullmatch(p.parent.name))
        return sorted(names)

    def ca(self, name: str, *, must_exist: bool = True, overrides: Mapping[str, Any] | None = None) -> CaConfig:
        """Merge metadata, config file, environment and flags for CA ``name``."""
        check_ca_name(name)
        merged: dict[str, Any] = {}
        meta_path = self._metadata_path(name)
        self.check_ca_directory(name)
        if meta_path.exists():
            merged.update(_read_metadata(meta_path))
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
        store = str(merged.get("store", "local"))
        schema = store_settings_schema(store)
        for key in table.get("store_settings", {}):
            if key not in schema:
                raise UsageError(
                    f"{self.source}: unknown key {key!r} in [{_key_path('ca', name, 'store_settings')}] "
                    f"for the {store} store{_suggest(key, schema)}"
                )
        backdate = str(
            os.environ.get("KVPKI_BACKDATE") or merged.get("backdate") or self._default("backdate") or DEFAULT_BACKDATE
        )
        return CaConfig(
            name=name,
            store=store,
            store_settings=store_settings,
            key_type=merged.get("key_type"),
            parent=merged.get("parent"),
            urls=self._urls(name, merged),
            backdate=timedelta(0) if backdate.strip() in ("0", "0s") else parse_duration(backdate, what="backdate"),
            renew_after_expiry=(
                parse_duration(str(merged["renew_after_expiry"]), what="renew_after_expiry")
                if merged.get("renew_after_expiry")
                else None
            ),
            crl_partition_size=merged.get("crl_partition_size"),
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
        make_private_dir(path.parent, "CA directory")
        document = {
            "store": ca.store,
            "store_settings": dict(ca.store_settings),
            "key_type": ca.key_type,
            "parent": ca.parent,
        }
        write_file_atomic(path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644)


_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "store": (str,),
    "store_settings": (dict,),
    "key_type": (str, type(None)),
    "parent": (str, type(None)),
}


def _read_metadata(path: Path) -> dict[str, Any]:
    """ca.json, written by init-ca; keys this version does not know are kept, known ones type-checked."""
    try:
        document = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise UsageError(f"CA metadata {path} is unreadable: {exc}") from None
    if not isinstance(document, dict):
        raise UsageError(f"CA metadata {path} is not a JSON object")
    for key, types in _METADATA_TYPES.items():
        if key in document and not isinstance(document[key], types):
            raise UsageError(f"CA metadata {path}: {key!r} has the wrong type")
    return document
