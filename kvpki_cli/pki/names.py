"""Parsing and checking subject names and subjectAltNames given as text or found in CSRs."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from cryptography import x509

from kvpki_cli.errors import InvalidInput, PolicyViolation
from kvpki_cli.pki.profiles import Profile

_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"^(\*\.)?({_DNS_LABEL}\.)*{_DNS_LABEL}$")
_SAN_PREFIXES = {"dns": "DNS", "ip": "IP", "uri": "URI", "email": "email"}


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 string such as ``CN=device-1,O=Contoso``."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise InvalidInput(f"invalid subject {text!r}: {exc}") from None
    if not list(name):
        raise InvalidInput(f"invalid subject {text!r}: it is empty")
    return name


def parse_san(text: str) -> x509.GeneralName:
    """``DNS:name``, ``IP:addr``, ``URI:uri`` or ``email:addr``."""
    kind, sep, value = text.partition(":")
    prefix = _SAN_PREFIXES.get(kind.strip().lower())
    if not sep or prefix is None or not value:
        raise InvalidInput(f"invalid SAN {text!r} (use DNS:, IP:, URI: or email: followed by a value)")
    if prefix == "DNS":
        return x509.DNSName(value)
    if prefix == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise InvalidInput(f"invalid IP address in SAN {text!r}") from None
    if prefix == "URI":
        return x509.UniformResourceIdentifier(value)
    return x509.RFC822Name(value)


def common_names(subject: x509.Name) -> list[str]:
    return [str(attr.value) for attr in subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


# RFC 5280 appendix A upper bounds (characters) for attributes CSRs commonly carry.
_UPPER_BOUNDS = {
    x509.NameOID.COMMON_NAME: 64,
    x509.NameOID.ORGANIZATION_NAME: 64,
    x509.NameOID.ORGANIZATIONAL_UNIT_NAME: 64,
    x509.NameOID.LOCALITY_NAME: 128,
    x509.NameOID.STATE_OR_PROVINCE_NAME: 128,
    x509.NameOID.SERIAL_NUMBER: 64,
    x509.NameOID.TITLE: 64,
    x509.NameOID.EMAIL_ADDRESS: 255,
}
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def check_name_syntax(subject: x509.Name) -> None:
    """Refuse what RFC 5280 forbids or relying parties misread: over-long or empty values, control characters."""
    for attribute in subject:
        value = attribute.value
        label = attribute.oid._name
        if isinstance(value, bytes):
            continue
        if not value:
            raise InvalidInput(f"subject attribute {label} is empty")
        bound = _UPPER_BOUNDS.get(attribute.oid)
        if bound is not None and len(value) > bound:
            raise InvalidInput(f"subject attribute {label} is longer than {bound} characters")
        if attribute.oid == x509.NameOID.COUNTRY_NAME and len(value) != 2:
            raise InvalidInput(f"subject countryName {value!r} must be a two-letter code")
        if _CONTROL_CHARACTERS.search(value):
            raise InvalidInput(f"subject attribute {label} contains control characters")


def check_subject(subject: x509.Name, profile: Profile) -> None:
    """Well-formed attributes, CN presence and pattern as the profile requires."""
    check_name_syntax(subject)
    names = common_names(subject)
    if len(names) > 1:
        raise PolicyViolation("subject has more than one CN")
    if profile.require_cn and not names:
        raise PolicyViolation(f"profile {profile.name!r} requires a subject CN")
    if names and not profile.matches_cn(names[0]):
        raise PolicyViolation(f"subject CN {names[0]!r} is not allowed by profile {profile.name!r}")


def check_sans(sans: Iterable[x509.GeneralName], profile: Profile) -> None:
    """Every SAN must be well formed and inside the profile's allowed DNS suffixes / IP ranges."""
    for san in sans:
        if isinstance(san, x509.DNSName):
            _check_dns(san.value, profile)
        elif isinstance(san, x509.IPAddress):
            if profile.ip_ranges and not any(
                isinstance(san.value, type(net.network_address)) and san.value in net for net in profile.ip_ranges
            ):
                raise PolicyViolation(f"SAN IP {san.value} is outside the ranges allowed by profile {profile.name!r}")
            if isinstance(san.value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise PolicyViolation("SAN IP must be an address, not a network")
        elif isinstance(san, x509.UniformResourceIdentifier):
            if ":" not in san.value or any(c.isspace() for c in san.value) or _CONTROL_CHARACTERS.search(san.value):
                raise PolicyViolation(f"SAN URI {san.value!r} is not an absolute URI")
        elif isinstance(san, x509.RFC822Name):
            local, at, domain = san.value.rpartition("@")
            bad_local = not local or _CONTROL_CHARACTERS.search(local) or any(c.isspace() for c in local)
            if not at or bad_local or not _DNS_NAME.match(domain) or domain.startswith("*"):
                raise PolicyViolation(f"SAN email {san.value!r} is not a valid mailbox")
        else:
            raise PolicyViolation(f"SAN type {type(san).__name__} is not allowed")


def _check_dns(name: str, profile: Profile) -> None:
    if len(name) > 253 or not name.isascii() or not _DNS_NAME.match(name):
        raise PolicyViolation(f"SAN DNS name {name!r} is not a valid host name")
    if name.startswith("*.") and not profile.allow_wildcard:
        raise PolicyViolation(f"wildcard SAN {name!r} is not allowed by profile {profile.name!r}")
    lowered = name.lower()
    if profile.dns_suffixes and not any(
        lowered == suffix or lowered.endswith("." + suffix) for suffix in profile.dns_suffixes
    ):
        raise PolicyViolation(f"SAN DNS name {name!r} is outside the domains allowed by profile {profile.name!r}")
