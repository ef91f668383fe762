"""Parsing and checking subject names and subjectAltNames given as text or found in CSRs."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from cryptography import x509

from kvpki_cli.errors import InvalidInput, PolicyViolation
from kvpki_cli.pki.profiles import Profile
from kvpki_cli.textsafe import describe_char, first_unsafe

_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
# Always used with fullmatch: "$" would also match before a trailing newline.
_DNS_NAME = re.compile(rf"(\*\.)?({_DNS_LABEL}\.)*{_DNS_LABEL}")
_HOST_NAME = re.compile(rf"({_DNS_LABEL}\.)*{_DNS_LABEL}")
_MAILBOX_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# RFC 3986 2: unreserved, reserved and percent-encoded octets; anything else is not a URI.
_URI_TEXT = re.compile(r"([A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_URI_AUTHORITY = re.compile(r"(?:[^@/?#\[\]]*@)?(?P<host>\[[^\]/?#]*\]|[^:/?#\[\]@]*)(?::(?P<port>[0-9]*))?")
_SAN_PREFIXES = {"dns": "DNS", "ip": "IP", "uri": "URI", "email": "email"}
# Second-level labels under which registries sell names (co.uk, com.au, ac.jp, ...): a wildcard
# directly under "<one of these>.<two-letter country>" would cover other people's domains.
_REGISTRY_SECOND_LEVEL = frozenset({"ac", "co", "com", "edu", "gob", "go", "gov", "mil", "ne", "net", "or", "org"})


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 string such as ``CN=device-1,O=Contoso``."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except (ValueError, TypeError) as exc:  # an unknown attribute name raises with no message at all
        detail = str(exc) or "unknown attribute type (use CN, O, ... or a dotted OID)"
        raise InvalidInput(f"invalid subject {text!r}: {detail}") from None
    if not list(name):
        raise InvalidInput(f"invalid subject {text!r}: it is empty")
    check_name_syntax(name)  # init-ca certifies it as given: the same rules as for CSR subjects
    return name


def parse_san(text: str) -> x509.GeneralName:
    """``DNS:name``, ``IP:addr``, ``URI:uri`` or ``email:addr``; values that cannot be encoded are invalid input."""
    kind, sep, value = text.partition(":")
    prefix = _SAN_PREFIXES.get(kind.strip().lower())
    if not sep or prefix is None or not value:
        raise InvalidInput(f"invalid SAN {text!r} (use DNS:, IP:, URI: or email: followed by a value)")
    if not value.isascii():
        raise InvalidInput(f"invalid SAN {text!r}: {_ascii_hint(prefix, value)}")
    try:
        if prefix == "DNS":
            return x509.DNSName(value)
        if prefix == "IP":
            if "%" in value:  # a zone index (fe80::1%eth0) means nothing off this host and would be dropped
                raise ValueError(value)
            return x509.IPAddress(ipaddress.ip_address(value))
        if prefix == "URI":
            return x509.UniformResourceIdentifier(value)
        return x509.RFC822Name(value)
    except ValueError:
        raise InvalidInput(f"invalid {prefix} value in SAN {text!r}") from None


def _ascii_hint(prefix: str, value: str) -> str:
    """Certificates carry host names as A-labels (RFC 5280 7.2); suggest the right spelling."""
    local, _, host = value.rpartition("@") if prefix == "email" else ("", "", value)
    if prefix not in ("DNS", "email") or not local.isascii():
        return "certificates hold ASCII only"
    try:
        a_label = host.encode("idna").decode()
    except UnicodeError:
        return "certificates hold ASCII only"
    suggestion = f"{local}@{a_label}" if prefix == "email" else a_label
    return f"certificates hold the A-label form of an international name, e.g. {prefix}:{suggestion}"


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
def check_name_syntax(subject: x509.Name) -> None:
    """Refuse what RFC 5280 forbids or relying parties misread: over-long or empty values, control,
    bidi and other invisible characters (``textsafe.is_unsafe``)."""
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
        unsafe = first_unsafe(value)
        if unsafe is not None:
            raise InvalidInput(f"subject attribute {label} contains the control character {describe_char(unsafe)}")


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
            if isinstance(san.value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise PolicyViolation("SAN IP must be an address, not a network")
            if profile.ip_ranges and not any(
                isinstance(san.value, type(net.network_address)) and san.value in net for net in profile.ip_ranges
            ):
                raise PolicyViolation(f"SAN IP {san.value} is outside the ranges allowed by profile {profile.name!r}")
        elif isinstance(san, x509.UniformResourceIdentifier):
            uri = san.value
            if not _is_absolute_uri(uri):
                raise PolicyViolation(f"SAN URI {uri!r} is not an absolute URI")
        elif isinstance(san, x509.RFC822Name):
            local, at, domain = san.value.rpartition("@")
            if not at or not _MAILBOX_LOCAL.fullmatch(local) or not _is_host_name(domain):
                raise PolicyViolation(f"SAN email {san.value!r} is not a valid mailbox")
        else:
            raise PolicyViolation(f"SAN type {type(san).__name__} is not allowed")


def _is_host_name(name: str) -> bool:
    return len(name) <= 253 and name.isascii() and _HOST_NAME.fullmatch(name) is not None and _a_labels_ok(name)


def _a_labels_ok(name: str) -> bool:
    """Every ``xn--`` label must decode as Punycode (RFC 5890): relying parties show the U-label."""
    for label in name.lower().split("."):
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                return False
    return True


def _is_absolute_uri(uri: str) -> bool:
    """RFC 5280 4.2.1.6: a scheme, RFC 3986 characters only, and where there is an authority,
    a host that is a domain name or an IP address (and a port that is a port)."""
    scheme = _URI_SCHEME.match(uri)
    if scheme is None or len(uri) == scheme.end() or _URI_TEXT.fullmatch(uri) is None:
        return False
    rest = uri[scheme.end() :]
    if not rest.startswith("//"):
        return True
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    match = _URI_AUTHORITY.fullmatch(authority)
    if match is None:
        return False
    host, port = match["host"], match["port"]
    if port and int(port) > 65535:
        return False
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return _is_host_name(host)
    return True


def wildcard_problem(name: str) -> str | None:
    """Why a wildcard DNS name is too broad to certify, or None.

    A wildcard needs at least two labels under it (``*.example.com``, never ``*.com``),
    and not a registry-style second level (``*.co.uk``, ``*.com.au``).
    """
    labels = name[2:].lower().split(".")
    if len(labels) < 2:
        return "a wildcard needs at least two labels under it (e.g. *.example.com)"
    if len(labels) == 2 and labels[0] in _REGISTRY_SECOND_LEVEL and len(labels[1]) == 2:
        return f"{name[2:]!r} is a registry suffix, not a domain"
    return None


def _check_dns(name: str, profile: Profile) -> None:
    if len(name) > 253 or not name.isascii() or not _DNS_NAME.fullmatch(name) or not _a_labels_ok(name):
        raise PolicyViolation(f"SAN DNS name {name!r} is not a valid host name")
    if name.rpartition(".")[2].isdigit():  # no top-level domain is numeric (RFC 3696 2): an address in disguise
        raise PolicyViolation(f"SAN DNS name {name!r} looks like an IP address (use IP:{name})")
    if name.startswith("*."):
        if not profile.allow_wildcard:
            raise PolicyViolation(f"wildcard SAN {name!r} is not allowed by profile {profile.name!r}")
        problem = wildcard_problem(name)
        if problem is not None:
            raise PolicyViolation(f"wildcard SAN {name!r} is not allowed: {problem}")
    lowered = name.lower()
    if profile.dns_suffixes and not any(
        lowered == suffix or lowered.endswith("." + suffix) for suffix in profile.dns_suffixes
    ):
        raise PolicyViolation(f"SAN DNS name {name!r} is outside the domains allowed by profile {profile.name!r}")
