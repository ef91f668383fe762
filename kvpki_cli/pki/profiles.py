"""Certificate profiles: what each kind of certificate may contain and for how long.

The built-in profiles match how IoT deployments use certificates (Azure IoT Hub
device identities, TLS servers, the Azure IoT Edge "Edge CA", subordinate CAs);
the config file can tighten them or add named variants of them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from kvpki_cli.durations import parse_duration
from kvpki_cli.errors import PolicyViolation, UsageError

# Characters Azure IoT Hub accepts in a device id (which is the device certificate's CN).
IOT_HUB_DEVICE_ID = r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Profile(NamedTuple):
    """Everything policy needs to turn a CSR into a certificate of one kind."""

    name: str
    is_ca: bool
    key_usage: frozenset[str]
    extended_key_usage: tuple[ObjectIdentifier, ...]
    max_validity: timedelta
    default_validity: timedelta
    path_length: int | None = None
    require_cn: bool = False
    require_san: bool = False
    allow_wildcard: bool = False
    cn_pattern: str | None = None
    dns_suffixes: tuple[str, ...] = ()
    ip_ranges: tuple[IpNetwork, ...] = ()
    # Name constraints of CA profiles (RFC 5280 4.2.1.10), emitted critical; DNS entries may
    # contain "{cn}" (see name_constraints).  With DNS subtrees and no IP setting, every IP is excluded.
    permitted_dns: tuple[str, ...] = ()
    excluded_dns: tuple[str, ...] = ()
    permitted_ip: tuple[IpNetwork, ...] = ()
    excluded_ip: tuple[IpNetwork, ...] = ()

    @property
    def constrains_names(self) -> bool:
        return bool(self.permitted_dns or self.excluded_dns or self.permitted_ip or self.excluded_ip)

    def matches_cn(self, common_name: str) -> bool:
        return self.cn_pattern is None or re.fullmatch(self.cn_pattern, common_name) is not None


_DAY = timedelta(days=1)

BUILTIN_PROFILES: dict[str, Profile] = {
    "device": Profile(
        name="device",
        is_ca=False,
        key_usage=frozenset({"digital_signature"}),
        extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        max_validity=365 * _DAY,
        default_validity=365 * _DAY,
        require_cn=True,
        cn_pattern=IOT_HUB_DEVICE_ID,
    ),
    "server": Profile(
        name="server",
        is_ca=False,
        key_usage=frozenset({"digital_signature"}),
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
        max_validity=397 * _DAY,
        default_validity=90 * _DAY,
        require_san=True,
        allow_wildcard=True,
    ),
    "edge-ca": Profile(
        name="edge-ca",
        is_ca=True,
        path_length=0,
        key_usage=frozenset({"digital_signature", "key_cert_sign", "crl_sign"}),
        extended_key_usage=(),
        max_validity=365 * _DAY,
        default_validity=90 * _DAY,
        require_cn=True,
    ),
    "sub-ca": Profile(
        name="sub-ca",
        is_ca=True,
        path_length=None,
        key_usage=frozenset({"digital_signature", "key_cert_sign", "crl_sign"}),
        extended_key_usage=(),
        max_validity=5 * 365 * _DAY,
        default_validity=5 * 365 * _DAY,
        require_cn=True,
    ),
}


CN_PLACEHOLDER = "{cn}"
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
NAME_CONSTRAINT_KEYS = ("permitted_dns", "excluded_dns", "permitted_ip", "excluded_ip")
ALL_IPS: tuple[IpNetwork, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _dns_subtree(name: str) -> str | None:
    """``name`` lowercased if it is a DNS name usable as a dNSName subtree (RFC 5280 4.2.1.10), else None.

    At least two labels, the last one starting with a letter (as linters expect of a domain name).
    """
    lowered = name.lower()
    labels = lowered.split(".")
    if len(lowered) > 253 or len(labels) < 2 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return None
    if len(labels[-1]) < 2 or not labels[-1][0].isalpha():
        return None
    return lowered


def _dns_templates(profile: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"config: profile {profile} {key} must be a list of DNS names")
    for template in value:
        if template.count(CN_PLACEHOLDER) > 1 or _dns_subtree(template.replace(CN_PLACEHOLDER, "cn")) is None:
            raise UsageError(
                f"config: profile {profile} {key}: {template!r} is not a domain name of two or more labels"
                ' (optionally with one {cn}, e.g. "{cn}.local")'
            )
    return tuple(t.lower() for t in value)


def name_constraints(profile: Profile, cn: str | None) -> x509.NameConstraints | None:
    """The NameConstraints extension of a CA profile, ``{cn}`` replaced by ``cn``; None if it has none.

    ``cn`` is the CN of the enrolling identity (EST identity certificates), else the issued
    certificate's own CN.  A substitution that is not a DNS name is refused, never dropped.
    """
    if not profile.is_ca or not profile.constrains_names:
        return None

    def subtrees(templates: tuple[str, ...]) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = []
        for template in templates:
            if CN_PLACEHOLDER in template:
                if not cn:
                    raise PolicyViolation(f"profile {profile.name!r} name constraint {template!r} needs a CN")
                name = _dns_subtree(template.replace(CN_PLACEHOLDER, cn))
                if name is None:
                    raise PolicyViolation(
                        f"profile {profile.name!r} name constraint {template!r}: CN {cn!r} does not make a DNS name"
                    )
            else:
                name = template
            names.append(x509.DNSName(name))
        return names

    permitted_ip, excluded_ip = profile.permitted_ip, profile.excluded_ip
    if profile.permitted_dns and not permitted_ip and not excluded_ip:
        excluded_ip = ALL_IPS  # a DNS-constrained CA must not certify IP addresses behind our back
    permitted = subtrees(profile.permitted_dns) + [x509.IPAddress(n) for n in permitted_ip]
    excluded = subtrees(profile.excluded_dns) + [x509.IPAddress(n) for n in excluded_ip]
    return x509.NameConstraints(permitted_subtrees=permitted or None, excluded_subtrees=excluded or None)


def load_profiles(config: Mapping[str, Any]) -> dict[str, Profile]:
    """Built-in profiles overlaid with ``[profiles.NAME]`` tables (``base = "device"`` for new names)."""
    profiles = dict(BUILTIN_PROFILES)
    for name, table in config.items():
        if not isinstance(table, Mapping):
            raise UsageError(f"config: [profiles.{name}] must be a table")
        base_name = table.get("base", name)
        if not isinstance(base_name, str):
            raise UsageError(f"config: profile {name} base must be a profile name, not {base_name!r}")
        if name in BUILTIN_PROFILES and base_name != name:
            raise UsageError(f"config: built-in profile {name!r} can be tightened but not re-based on {base_name!r}")
        base = profiles.get(base_name)
        if base is None:
            raise UsageError(f"config: profile {name!r} needs 'base' = one of {', '.join(BUILTIN_PROFILES)}")
        profiles[name] = _apply_overrides(base._replace(name=name), table)
    return profiles


# The value type of every [profiles.NAME] setting: TOML gives exactly these, anything else is a usage error.
SETTING_TYPES: dict[str, type] = {
    "base": str,
    "max_validity": str,
    "default_validity": str,
    "cn_pattern": str,
    "dns_suffixes": list,
    "ip_ranges": list,
    "require_cn": bool,
    "require_san": bool,
    "allow_wildcard": bool,
    "path_length": int,
}
_LIST_OF_STRINGS = ("dns_suffixes", "ip_ranges")


def _check_type(profile: str, key: str, value: Any) -> None:
    """Wrong TOML types are usage errors (``require_cn = "false"`` must not mean true)."""
    expected = SETTING_TYPES.get(key)
    if expected is None:
        return  # a setting handled below without an entry here
    wrong = not isinstance(value, expected) or (expected is int and isinstance(value, bool))
    if key in _LIST_OF_STRINGS and not wrong:
        wrong = not all(isinstance(item, str) for item in value)
    if key == "path_length" and not wrong:
        wrong = value < 0
    if wrong:
        kind = {str: "a string", bool: "true or false", int: "a non-negative integer", list: "a list of strings"}
        raise UsageError(f"config: profile {profile} {key} must be {kind.get(expected, expected)}, not {value!r:.60}")


def _unknown(profile: str, key: str) -> UsageError:
    import difflib

    close = difflib.get_close_matches(key, list(SETTING_TYPES), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"config: profile {profile} has unknown setting {key!r}{hint}")


def _apply_overrides(profile: Profile, table: Mapping[str, Any]) -> Profile:
    changes: dict[str, Any] = {}
    for key, value in table.items():
        _check_type(profile.name, key, value)
        if key == "base":
            continue
        if key in ("max_validity", "default_validity"):
            changes[key] = parse_duration(str(value), what=f"profile {profile.name} {key}")
        elif key == "cn_pattern":
            try:
                re.compile(str(value))
            except re.error as exc:
                raise UsageError(f"config: profile {profile.name} cn_pattern is not a valid regex: {exc}") from None
            changes[key] = str(value)
        elif key == "dns_suffixes":
            changes[key] = tuple(str(s).lower().lstrip(".") for s in value)
        elif key == "ip_ranges":
            try:
                changes[key] = tuple(ipaddress.ip_network(str(r), strict=False) for r in value)
            except ValueError as exc:
                raise UsageError(f"config: profile {profile.name} ip_ranges: {exc}") from None
        elif key in NAME_CONSTRAINT_KEYS and not profile.is_ca:
            raise UsageError(f"config: profile {profile.name} is not a CA profile and cannot have {key}")
        elif key in ("permitted_dns", "excluded_dns"):
            changes[key] = _dns_templates(profile.name, key, value)
        elif key in ("permitted_ip", "excluded_ip"):
            if not isinstance(value, list):
                raise UsageError(f"config: profile {profile.name} {key} must be a list of networks")
            try:
                changes[key] = tuple(ipaddress.ip_network(str(r), strict=True) for r in value)
            except ValueError as exc:
                raise UsageError(f"config: profile {profile.name} {key}: {exc}") from None
        elif key in ("require_cn", "require_san", "allow_wildcard"):
            changes[key] = bool(value)
        elif key == "path_length" and profile.is_ca:
            changes[key] = None if value is None else int(value)
        else:
            raise _unknown(profile.name, key)
    updated = profile._replace(**changes)
    if updated.default_validity > updated.max_validity:
        updated = updated._replace(default_validity=updated.max_validity)
    return updated
