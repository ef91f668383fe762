"""The `kvpki serve` configuration file: listener, TLS, EST labels, OCSP signers.

Loaded once at start-up so no request reads configuration from disk.  Relative
paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from kvpki_cli.durations import parse_duration
from kvpki_cli.errors import UsageError
from kvpki_cli.fileutil import read_error, read_regular_file
from kvpki_cli.serve.ratelimit import Rate, parse_rate

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_LABEL = "default"
MAX_SERVE_CONFIG = 1024 * 1024
IDENTITY_CN_PLACEHOLDER = "{cn}"
EST_OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "csrattrs")


@dataclass(frozen=True)
class LabelConfig:
    """One EST label: which CA issues, with which profile, and who may ask."""

    name: str
    ca: str
    profile: str
    users: frozenset[str] = frozenset()
    client_cas: tuple[Path, ...] = ()
    renewal: bool = True
    # Enrollment authority: client certificates issued by these kvpki CAs may enroll new names
    # tied to their own CN (IoT Edge's EST identity certificate), not only renew themselves.
    identity_cas: tuple[str, ...] = ()
    identity_profiles: frozenset[str] = frozenset()  # empty: any profile (EKU clientAuth is always required)
    identity_cn: tuple[str, ...] = (IDENTITY_CN_PLACEHOLDER,)  # allowed CSR CNs; "{cn}" = the identity's CN
    base64_line_length: int = 0  # of EST responses on this label; [server] base64_line_length by default
    # A shared password is a weak credential for a CA certificate: CA profiles refuse Basic users
    # unless the operator opts in here, knowing the risk (see check_profile).
    allow_password_for_ca: bool = False
    # Enrollment rate limits (serve/ratelimit.py): per identity on this label, and for the label as a whole.
    rate_limit: Rate | None = None
    label_rate_limit: Rate | None = None
    # Offline devices: a certificate of this label's CA that expired at most this long ago may still
    # renew itself (TLS then accepts expired client certificates; serve/auth.py checks time itself).
    renew_after_expiry: timedelta | None = None

    def allows_user(self, user: str) -> bool:
        return user in self.users or "*" in self.users

    def check_profile(self, profile_name: str, is_ca: bool) -> None:
        """Refuse password-only enrollment of CA certificates unless explicitly allowed (at start-up)."""
        if is_ca and self.users and not self.allow_password_for_ca:
            raise UsageError(
                f"serve config: [est.{self.name}] issues CA certificates (profile {profile_name!r}) and lists"
                " Basic users: anyone holding such a password could mint a CA. Authenticate with identity"
                " certificates (identity_cas) instead, or set allow_password_for_ca = true to accept the risk"
            )


OCSP_NONCE_RATE = Rate(5, 1)  # default of [server] ocsp_nonce_rate


@dataclass(frozen=True)
class OcspSignerConfig:
    """A delegated OCSP signing certificate (EKU id-kp-OCSPSigning) and its key file."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServeConfig:
    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    users_file: Path | None
    http_port: int | None = None
    realm: str = "kvpki EST"
    base64_line_length: int = 0
    signing_concurrency: int = 4
    max_body_bytes: int = 64 * 1024
    crl_validity: timedelta = timedelta(days=1)
    ocsp_validity: timedelta = timedelta(hours=1)
    ocsp_nonces: str = "echo"  # "echo" (signed per request) or "ignore" (RFC 5019: the cached response)
    # nonce echoes signed by the CA key itself (no delegated responder), per CA: a token bucket
    ocsp_nonce_rate: Rate = OCSP_NONCE_RATE
    ocsp_nonce_burst: int = 20
    retry_after: int = 10
    # availability (docs/serve.md "Timeouts and connection limits"): seconds, connection counts
    tls_handshake_timeout: float = 10.0
    idle_timeout: float = 15.0
    request_timeout: float = 15.0
    max_connections: int = 1024
    max_connections_per_client: int = 64
    log_format: str = "text"  # "json": one JSON object per line (serve/logformat.py)
    metrics_interval: float = 60.0  # s between computations of the inventory gauges (CRL age, expiring)
    labels: dict[str, LabelConfig] = field(default_factory=dict)
    ocsp_signers: dict[str, OcspSignerConfig] = field(default_factory=dict)


def _path(base: Path, value: object, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"serve config: {what} must be a file path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _int(table: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UsageError(f"serve config: [server] {key} must be an integer between {low} and {high}")
    return value


def _line_length(table: Mapping[str, Any], where: str, default: int) -> int:
    """0 (one line: strongSwan <= 5.9.10) or a multiple of 4 up to 76 (libest wants 64)."""
    value = table.get("base64_line_length", default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 76 or value % 4:
        raise UsageError(
            f"serve config: {where} base64_line_length must be 0 (no breaks) or a multiple of 4 up to 76, e.g. 64"
        )
    return value


def _choice(table: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise UsageError(f"serve config: [server] {key} must be one of {', '.join(choices)}")
    return str(value)


def _seconds(table: Mapping[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.1 <= value <= 3600:
        raise UsageError(f"serve config: [server] {key} must be a number of seconds between 0.1 and 3600")
    return float(value)


def _label(base: Path, name: str, table: Any, line_length: int = 0) -> LabelConfig:
    if not isinstance(table, Mapping):
        raise UsageError(f"serve config: [est.{name}] must be a table")
    if not LABEL.match(name) or name in EST_OPERATIONS:
        raise UsageError(f"serve config: invalid EST label {name!r}")
    unknown = set(table) - {"ca", "profile", "users", "client_cas", "renewal", *IDENTITY_KEYS, *LABEL_OPTIONS}
    if unknown:
        raise UsageError(f"serve config: [est.{name}] has unknown setting(s) {', '.join(sorted(unknown))}")
    if not isinstance(table.get("ca"), str):
        raise UsageError(f'serve config: [est.{name}] needs ca = "<CA name>"')
    users = table.get("users", [])
    cas = table.get("client_cas", [])
    allow_password = table.get("allow_password_for_ca", False)
    if not isinstance(allow_password, bool):
        raise UsageError(f"serve config: [est.{name}] allow_password_for_ca must be true or false")
    if not isinstance(users, list) or not isinstance(cas, list):
        raise UsageError(f"serve config: [est.{name}] users and client_cas must be lists")
    return LabelConfig(
        name=name,
        ca=table["ca"],
        profile=str(table.get("profile", "device")),
        users=frozenset(str(u) for u in users),
        client_cas=tuple(_path(base, p, f"[est.{name}] client_cas") for p in cas),
        renewal=bool(table.get("renewal", True)),
        base64_line_length=_line_length(table, f"[est.{name}]", line_length),
        allow_password_for_ca=allow_password,
        renew_after_expiry=_window(name, table),
        **_identity_settings(name, table),
        **_rates(name, table),
    )


LABEL_OPTIONS = (
    "base64_line_length",
    "allow_password_for_ca",
    "rate_limit",
    "label_rate_limit",
    "renew_after_expiry",
)
RATE_KEYS = ("rate_limit", "label_rate_limit")
IDENTITY_KEYS = ("identity_cas", "identity_profiles", "identity_cn")


def _window(name: str, table: Mapping[str, Any]) -> timedelta | None:
    """``renew_after_expiry = "180d"``: absent (the default) means expired certificates never renew."""
    value = table.get("renew_after_expiry")
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f'serve config: [est.{name}] renew_after_expiry must be a duration such as "180d"')
    return parse_duration(value, what=f"[est.{name}] renew_after_expiry")


def _rates(name: str, table: Mapping[str, Any]) -> dict[str, Any]:
    return {key: parse_rate(table[key], f"[est.{name}] {key}") for key in RATE_KEYS if key in table}


def _string_list(name: str, table: Mapping[str, Any], key: str) -> list[str] | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, str) and key == "identity_cn":
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"serve config: [est.{name}] {key} must be a non-empty list of strings")
    return value


def _identity_settings(name: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the identity-authority keys; a CN template must contain {cn} so issued names stay tied."""
    cas = _string_list(name, table, "identity_cas")
    profiles = _string_list(name, table, "identity_profiles")
    templates = _string_list(name, table, "identity_cn")
    if cas is None:
        if profiles is not None or templates is not None:
            raise UsageError(f"serve config: [est.{name}] identity_profiles/identity_cn need identity_cas")
        return {}
    settings: dict[str, Any] = {"identity_cas": tuple(cas)}
    if profiles is not None:
        settings["identity_profiles"] = frozenset(profiles)
    if templates is not None:
        for template in templates:
            rest = template.replace(IDENTITY_CN_PLACEHOLDER, "", 1)
            if IDENTITY_CN_PLACEHOLDER not in template or "{" in rest or "}" in rest:
                raise UsageError(
                    f"serve config: [est.{name}] identity_cn {template!r} must contain {IDENTITY_CN_PLACEHOLDER}"
                    " exactly once (and no other braces)"
                )
        settings["identity_cn"] = tuple(templates)
    return settings


def _check_tables(document: Mapping[str, Any]) -> None:
    """Tables where tables belong and no setting nobody reads: a misspelt key is an error, not a default."""
    import dataclasses
    import difflib

    for name in ("server", "est", "ocsp"):
        if not isinstance(document.get(name, {}), Mapping):
            raise UsageError(f"serve config: [{name}] must be a table")
    known = {f.name for f in dataclasses.fields(ServeConfig)} - {"labels", "ocsp_signers"}
    for key in sorted(set(document.get("server", {})) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"serve config: [server] has unknown setting {key!r}{hint}")
    for name, table in document.get("ocsp", {}).items():
        if not isinstance(table, Mapping) or set(table) - {"cert", "key"}:
            raise UsageError(f"serve config: [ocsp.{name}] must be a table with cert and key only")


def load_serve_config(path: Path) -> ServeConfig:
    """Parse and validate the serve config (CA and profile names are checked by the app)."""
    try:  # a FIFO or device given as --config is refused, not waited on (fileutil)
        document = tomllib.loads(read_regular_file(path, MAX_SERVE_CONFIG).decode())
    except OSError as exc:
        raise UsageError(read_error("serve config", path, exc)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"serve config {path} is not valid TOML: {exc}") from None
    base = path.resolve().parent
    server = document.get("server", {})
    unknown = set(document) - {"server", "est", "ocsp"}
    if unknown:
        raise UsageError(f"serve config: unknown table(s) {', '.join(sorted(unknown))}")
    _check_tables(document)
    realm = server.get("realm", "kvpki EST")
    if not isinstance(realm, str) or not realm or not realm.isascii() or not realm.isprintable():
        raise UsageError("serve config: [server] realm must be printable ASCII text (it is sent in a header)")
    line_length = _line_length(server, "[server]", 0)
    labels = {name: _label(base, name, table, line_length) for name, table in document.get("est", {}).items()}
    signers = {
        name: OcspSignerConfig(_path(base, t.get("cert"), f"[ocsp.{name}] cert"), _path(base, t.get("key"), "key"))
        for name, t in document.get("ocsp", {}).items()
    }
    users_file = server.get("users_file")
    return ServeConfig(
        host=str(server.get("host", "127.0.0.1")),
        port=_int(server, "port", 8443, 0, 65535),
        tls_cert=_path(base, server.get("tls_cert"), "[server] tls_cert"),
        tls_key=_path(base, server.get("tls_key"), "[server] tls_key"),
        users_file=_path(base, users_file, "[server] users_file") if users_file else None,
        http_port=_int(server, "http_port", 0, 0, 65535) if "http_port" in server else None,
        realm=realm.replace('"', "'").replace("\\", "/"),
        base64_line_length=line_length,
        signing_concurrency=_int(server, "signing_concurrency", 4, 1, 256),
        max_body_bytes=_int(server, "max_body_bytes", 64 * 1024, 1024, 16 * 1024 * 1024),
        crl_validity=parse_duration(str(server.get("crl_validity", "1d")), what="crl_validity"),
        ocsp_validity=parse_duration(str(server.get("ocsp_validity", "1h")), what="ocsp_validity"),
        ocsp_nonces=_choice(server, "ocsp_nonces", ("echo", "ignore")),
        ocsp_nonce_rate=parse_rate(server.get("ocsp_nonce_rate", "5/1s"), "[server] ocsp_nonce_rate"),
        ocsp_nonce_burst=_int(server, "ocsp_nonce_burst", 20, 1, 1_000_000),
        retry_after=_int(server, "retry_after", 10, 1, 3600),
        tls_handshake_timeout=_seconds(server, "tls_handshake_timeout", 10.0),
        idle_timeout=_seconds(server, "idle_timeout", 15.0),
        request_timeout=_seconds(server, "request_timeout", 15.0),
        max_connections=_int(server, "max_connections", 1024, 1, 1_000_000),
        max_connections_per_client=_int(server, "max_connections_per_client", 64, 1, 1_000_000),
        log_format=_choice(server, "log_format", ("text", "json")),
        metrics_interval=_seconds(server, "metrics_interval", 60.0),
        labels=labels,
        ocsp_signers=signers,
    )
