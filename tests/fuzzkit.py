"""Generated and mutated CSRs for the fuzz tests (core and EST): hypothesis strategies that build
requests field by field from hostile parts, and DER mutation of valid requests.

Keys come from a small pool made once (key generation, RSA above all, is slow); keys nobody
can load in ``cryptography`` (SM2, sect283k1, DSA, X25519) appear as foreign SubjectPublicKeyInfo
made by openssl, signed with a P-256 key.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import strategies as st

from tests import csrforge as f

# How many cases: KVPKI_FUZZ_CASES scales the defaults (core, EST) proportionally.
DEFAULT_CORE_CASES = 10_000
DEFAULT_EST_CASES = 1_000


def fuzz_cases(default: int) -> int:
    wanted = os.environ.get("KVPKI_FUZZ_CASES")
    return int(wanted) * default // DEFAULT_CORE_CASES if wanted else default


@dataclass(frozen=True)
class PoolKey:
    label: str
    signer: f.PrivateKey
    spki: bytes | None = None  # a foreign key: the request is signed by ``signer`` but names this key


def _openssl_spki(*genkey: str) -> bytes:
    key = subprocess.run(["openssl", *genkey], capture_output=True, check=True, timeout=60).stdout
    return subprocess.run(
        ["openssl", "pkey", "-pubout", "-outform", "DER"], input=key, capture_output=True, check=True, timeout=60
    ).stdout


@functools.cache
def key_pool() -> tuple[PoolKey, ...]:
    p256 = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]

    def spki(key: object) -> bytes:
        return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]

    garbage_ec = f.seq(f.seq(f.oid("1.2.840.10045.2.1"), f.oid("1.2.840.10045.3.1.7")), f.tlv(0x03, b"\x00\x04junk"))
    return (
        *(PoolKey(f"P-256 #{i}", key) for i, key in enumerate(p256)),
        PoolKey("P-384", ec.generate_private_key(ec.SECP384R1())),
        PoolKey("RSA-2048", rsa.generate_private_key(65537, 2048)),
        PoolKey("RSA-1024", rsa.generate_private_key(65537, 1024)),
        PoolKey("RSA-2048 e=3", rsa.generate_private_key(3, 2048)),
        PoolKey("secp256k1", ec.generate_private_key(ec.SECP256K1())),
        PoolKey("P-521", ec.generate_private_key(ec.SECP521R1())),
        PoolKey("Ed25519", ed25519.Ed25519PrivateKey.generate()),
        PoolKey("Ed448", p256[0], spki(ed448.Ed448PrivateKey.generate())),
        PoolKey("SM2", p256[0], _openssl_spki("genpkey", "-algorithm", "SM2")),
        PoolKey("sect283k1", p256[0], _openssl_spki("ecparam", "-name", "sect283k1", "-genkey", "-noout")),
        PoolKey("DSA-1024", p256[0], spki(dsa.generate_private_key(1024))),
        PoolKey("X25519", p256[0], spki(x25519.X25519PrivateKey.generate())),
        PoolKey("garbage EC point", p256[0], garbage_ec),
        PoolKey("garbage SPKI", p256[0], f.seq(f.seq(f.oid("1.2.3.4")), f.tlv(0x03, b"\x00\x01\x02"))),
    )


# --- hostile text -----------------------------------------------------------------------------

NASTY_CHARS = '\n\r\t\x00\x1b\x7f\x85\u202e\u2066\u200b\ufeff\u2028\u00a0 @*.-_/:\\,+=#;"<>ü\u0130\U0001f600'
_text = st.text(alphabet=st.sampled_from("abcxyz0129-." + NASTY_CHARS), max_size=24)
GOOD_HOSTS = ("device-1.example", "a.example.com", "*.example.com", "xn--bcher-kva.de", "localhost")
HOSTILE_HOSTS = (
    "*.com", "*.co.uk", "a.example\n", "a.example\r\n", "bücher.de", "*", "*.*.example.com", "a*.example.com",
    "-lead.example", "a..b", "a_b.example", "a" * 64 + ".example", ".", "", "example.com.", "1.2.3.4", "\u202eexample",
)  # fmt: skip
host_names = st.one_of(st.sampled_from(GOOD_HOSTS), st.sampled_from(HOSTILE_HOSTS), _text)
mailboxes = st.one_of(
    st.sampled_from(
        ("ops@example.com", "a@b@c.com", "a b@c.com", "ops@example.com\n", "@example.com", "a@", "a@*.com")
    ),
    st.builds(lambda local, host: f"{local}@{host}", _text, host_names),
)
uris = st.one_of(
    st.sampled_from(("urn:device:1", "https://example.com/x", "no-scheme", "urn:x\n", "urn:\u202ex")), _text
)
common_names = st.one_of(st.sampled_from(("device-1", "dev.example.com", "aziot-edge CA dev")), _text)


def _encode(tag: int, value: str) -> bytes:
    if tag == f.BMP:
        return value.encode("utf-16-be", "surrogatepass")
    if tag == 0x1C:  # UniversalString
        return value.encode("utf-32-be", "surrogatepass")
    if tag in (f.PRINTABLE, f.IA5, 0x1A, f.T61):
        return value.encode("latin-1", "replace")
    return value.encode("utf-8", "surrogatepass")


STRING_TAGS = (f.UTF8, f.UTF8, f.PRINTABLE, f.IA5, f.T61, f.BMP, 0x1C, 0x1A, f.OCTET_STRING, f.BIT_STRING, 0x30)
ATTRIBUTE_OIDS = (
    f.OID_CN, f.OID_CN, f.OID_O, f.OID_C, "2.5.4.11", "2.5.4.7", "2.5.4.8", "2.5.4.5", "2.5.4.12",
    "1.2.840.113549.1.9.1", "0.9.2342.19200300.100.1.25", "2.5.4.45", "1.2.3.4.5",
)  # fmt: skip


def _attribute(parts: tuple[str, int, str | bytes]) -> tuple[str, int, bytes]:
    oid, tag, value = parts
    return oid, tag, _encode(tag, value) if isinstance(value, str) else value


_GOOD_NAMES = tuple(f.name((f.OID_CN, f.UTF8, cn)) for cn in (b"device-1", b"dev.example.com"))
_hostile_names = st.lists(
    st.tuples(
        st.sampled_from(ATTRIBUTE_OIDS), st.sampled_from(STRING_TAGS), st.one_of(common_names, st.binary(max_size=12))
    ).map(_attribute),
    max_size=4,
).map(lambda attributes: f.name(*attributes))
names = st.one_of(st.sampled_from(_GOOD_NAMES), _hostile_names)  # half sensible, half hostile


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_dns = host_names.map(lambda host: f.gn_dns(_utf8(host)))
general_names = st.one_of(
    _dns,
    _dns,
    mailboxes.map(lambda box: f.gn_email(_utf8(box))),
    uris.map(lambda uri: f.gn_uri(_utf8(uri))),
    st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16), st.binary(max_size=33)).map(
        f.gn_ip
    ),
    st.sampled_from(("1.2.3.4", "2.999.1")).map(f.gn_rid),
    _text.map(lambda text: f.gn_other("1.3.6.1.5.5.7.8.9", f.tlv(f.UTF8, _utf8(text)))),
    st.sampled_from((f.gn_x400(), f.gn_edi_party())),
    names.map(f.gn_directory),
    st.tuples(st.integers(0, 255), st.binary(max_size=8)).map(lambda tv: f.tlv(*tv)),  # any tag at all
)
_critical = st.sampled_from((None, False, True))
_san = st.tuples(st.lists(general_names, max_size=4), _critical).map(
    lambda a: f.extension(f.OID_SAN, f.san(*a[0]), a[1])
)
_basic_constraints = st.tuples(st.booleans(), st.sampled_from((None, 0, 1, 7, -1, 2**70)), _critical).map(
    lambda a: f.extension(f.OID_BASIC_CONSTRAINTS, f.basic_constraints(a[0], a[1]), a[2])
)
_key_usage = st.tuples(st.integers(0, 8), st.binary(min_size=1, max_size=3), _critical).map(
    lambda a: f.extension(f.OID_KEY_USAGE, f.tlv(f.BIT_STRING, bytes([a[0]]) + a[1]), a[2])
)
_eku = st.tuples(
    st.lists(st.sampled_from(("1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2", "2.5.29.37.0")), max_size=3), _critical
).map(lambda a: f.extension(f.OID_EKU, f.seq(*(f.oid(o) for o in a[0])), a[1]))
_EXTENSION_OIDS = (f.OID_SAN, f.OID_BASIC_CONSTRAINTS, f.OID_KEY_USAGE, f.OID_EKU, f.OID_NAME_CONSTRAINTS,
                   "2.5.29.14", "2.5.29.35", "1.3.6.1.5.5.7.1.1", "1.2.3.4")  # fmt: skip
_any_extension = st.tuples(st.sampled_from(_EXTENSION_OIDS), st.binary(max_size=16), _critical).map(
    lambda a: f.extension(*a)  # any content under any extension
)
extensions = st.one_of(_san, _san, _san, _basic_constraints, _key_usage, _eku, _any_extension)
_attribute_values = st.lists(
    st.tuples(st.sampled_from(STRING_TAGS), st.binary(max_size=8)).map(lambda tv: f.tlv(*tv)), max_size=2
)
attributes = st.lists(
    st.tuples(st.sampled_from((f.OID_CHALLENGE_PASSWORD, f.OID_EXTENSION_REQUEST, "1.2.3.4")), _attribute_values).map(
        lambda a: f.seq(f.oid(a[0]), f.set_of(*a[1]))
    ),
    max_size=2,
)


@dataclass(frozen=True)
class Generated:
    der: bytes
    info: bytes  # what was signed, to mutate and re-sign
    key: PoolKey

    def mutants(self, rng: random.Random, count: int) -> list[bytes]:
        """Mutations of this request: alternately of the signed DER and of ``info`` re-signed."""
        return [
            mutate(self.der, rng) if index % 2 else f.sign_info(self.key.signer, mutate(self.info, rng))
            for index in range(count)
        ]


def _build(parts: tuple[PoolKey, bytes, list[bytes], list[bytes], int]) -> Generated:
    key, subject, extension_list, attribute_list, version = parts
    info = f.request_info(
        key.signer, subject, extension_list, attributes=attribute_list, spki=key.spki, version=version
    )
    return Generated(f.sign_info(key.signer, info), info, key)


def generated_csrs() -> st.SearchStrategy[Generated]:
    """Requests built from hostile parts, really signed (so parsing gets past proof of possession);
    one in three is plausible (a good key and name, SANs from good hosts) so issuance is exercised too."""
    pool = key_pool()
    keys = st.one_of(st.sampled_from(pool[:5]), st.sampled_from(pool))  # half the time a key policy allows
    versions = st.sampled_from((0,) * 12 + (1, 3, -1, 2**40))
    hostile = st.tuples(keys, names, st.lists(extensions, max_size=3), attributes, versions).map(_build)
    good_sans = st.lists(st.sampled_from(GOOD_HOSTS).map(lambda host: f.gn_dns(host.encode())), min_size=1, max_size=3)
    plausible = st.tuples(
        st.sampled_from(pool[:5]),
        st.sampled_from(_GOOD_NAMES),
        st.lists(good_sans.map(lambda sans: f.extension(f.OID_SAN, f.san(*sans))), max_size=1),
        st.just([]),
        st.just(0),
    ).map(_build)
    return st.one_of(hostile, hostile, plausible)


# --- operator overrides (the CLI's --san, --subject, --validity) ----------------------------------

san_texts = st.one_of(
    st.builds(lambda host: f"DNS:{host}", host_names),
    st.builds(lambda box: f"email:{box}", mailboxes),
    st.builds(lambda uri: f"URI:{uri}", uris),
    st.sampled_from(("IP:10.0.0.1", "IP:::1", "IP:300.1.1.1", "IP:10.0.0.0/8", "XYZ:foo", "DNS:", ":")),
    _text,
)
subject_texts = st.one_of(
    st.sampled_from(
        ("CN=device-1", "CN=device-1,O=Contoso", "CN=a\\,b", "not a dn", "CN=", "C=USA,CN=x", "1.2.3=#0101")
    ),
    st.builds(lambda cn: f"CN={cn}", common_names),
)
validity_texts = st.one_of(
    st.sampled_from(("90d", "1y", "100y", "101y", "99999y", "999999y", "0d", "forever", "12h", "99999999999s")),
    _text,
)


# --- DER mutation ---------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 random edits: flip a bit, set a byte, insert, delete, duplicate a slice, truncate."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        at = rng.randrange(len(out))
        op = rng.randrange(6)
        if op == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF, rng.randrange(256)))
        elif op == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 3:
            del out[at : at + rng.randint(1, 8)]
        elif op == 4:
            end = min(len(out), at + rng.randint(1, 16))
            out[at:at] = out[at:end]
        else:
            del out[at:]
    return bytes(out)
