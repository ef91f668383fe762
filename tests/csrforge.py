"""A tiny DER writer for CSRs that no well-behaved library would build: duplicate extensions,
x400Address/EDIPartyName SANs, unknown key algorithms, raw subject strings.

Hostile clients do not use ``cryptography``'s builder, so the tests must not either.
Every CSR is really signed (proof of possession holds) unless ``spki`` swaps the key.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
OID_SAN = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_KEY_USAGE = "2.5.29.15"
OID_EKU = "2.5.29.37"
OID_NAME_CONSTRAINTS = "2.5.29.30"
OID_CN = "2.5.4.3"
OID_O = "2.5.4.10"
OID_C = "2.5.4.6"

# Universal tags
BOOLEAN, INTEGER, BIT_STRING, OCTET_STRING, NULL, OID = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
UTF8, PRINTABLE, T61, IA5, BMP, SEQUENCE, SET = 0x0C, 0x13, 0x14, 0x16, 0x1E, 0x30, 0x31


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + length(len(content)) + content


def seq(*items: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(items))


def set_of(*items: bytes) -> bytes:
    return tlv(SET, b"".join(items))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return tlv(OID, bytes(body))


def integer(value: int) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return tlv(INTEGER, raw)


def boolean(value: bool) -> bytes:
    return tlv(BOOLEAN, b"\xff" if value else b"\x00")


def context(number: int, content: bytes, *, constructed: bool) -> bytes:
    return tlv((0xA0 if constructed else 0x80) | number, content)


def name(*attributes: tuple[str, int, bytes]) -> bytes:
    """A Name from (oid, string tag, raw value bytes): one RDN per attribute."""
    return seq(*(set_of(seq(oid(o), tlv(tag, value))) for o, tag, value in attributes))


def extension(oid_text: str, value: bytes, critical: bool | None = None) -> bytes:
    parts = [oid(oid_text)]
    if critical is not None:
        parts.append(boolean(critical))
    parts.append(tlv(OCTET_STRING, value))
    return seq(*parts)


# GeneralName choices (RFC 5280 4.2.1.6), each as the encoded [n] element
def gn_dns(value: bytes) -> bytes:
    return context(2, value, constructed=False)


def gn_email(value: bytes) -> bytes:
    return context(1, value, constructed=False)


def gn_uri(value: bytes) -> bytes:
    return context(6, value, constructed=False)


def gn_ip(value: bytes) -> bytes:
    return context(7, value, constructed=False)


def gn_rid(dotted: str) -> bytes:
    return context(8, oid(dotted)[2:], constructed=False)


def gn_other(type_oid: str, value: bytes) -> bytes:
    return context(0, oid(type_oid) + context(0, value, constructed=True), constructed=True)


def gn_x400() -> bytes:
    """ORAddress: built-in-standard-attributes with a country name (just enough structure)."""
    country = tlv(0x61, tlv(PRINTABLE, b"US"))  # [APPLICATION 1] CountryName
    return context(3, seq(country), constructed=True)


def gn_edi_party(party: bytes = b"edi-party") -> bytes:
    return context(5, context(1, tlv(UTF8, party), constructed=True), constructed=True)


def gn_directory(name_der: bytes) -> bytes:
    return context(4, name_der, constructed=True)


def san(*general_names: bytes) -> bytes:
    return seq(*general_names)


def basic_constraints(ca: bool, path_length: int | None = None) -> bytes:
    parts = [boolean(True)] if ca else []
    if path_length is not None:
        parts.append(integer(path_length))
    return seq(*parts)


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def spki_of(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _sign(key: PrivateKey, tbs: bytes) -> tuple[bytes, bytes]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return seq(oid("1.2.840.10045.4.3.2")), key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return seq(oid("1.2.840.113549.1.1.11"), tlv(NULL, b"")), key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    return seq(oid("1.3.101.112")), key.sign(tbs)


def request_info(
    key: PrivateKey,
    subject: bytes,
    extensions: Sequence[bytes] = (),
    *,
    attributes: Sequence[bytes] = (),
    spki: bytes | None = None,
    version: int = 0,
) -> bytes:
    """The CertificationRequestInfo (what is signed); ``extensions`` go into one extensionRequest."""
    attrs = list(attributes)
    if extensions:
        attrs.append(seq(oid(OID_EXTENSION_REQUEST), set_of(seq(*extensions))))
    key_info = spki if spki is not None else spki_of(key)
    return seq(integer(version), subject, key_info, context(0, b"".join(attrs), constructed=True))


def sign_info(key: PrivateKey, info: bytes) -> bytes:
    """A PKCS#10 request: ``info`` signed with ``key``, whatever ``info`` holds."""
    algorithm, signature = _sign(key, info)
    return seq(info, algorithm, tlv(BIT_STRING, b"\x00" + signature))


def csr(
    key: PrivateKey,
    subject: bytes,
    extensions: Sequence[bytes] = (),
    *,
    attributes: Sequence[bytes] = (),
    spki: bytes | None = None,
    version: int = 0,
) -> bytes:
    """A signed PKCS#10 request (proof of possession holds unless ``spki`` swaps the key)."""
    info = request_info(key, subject, extensions, attributes=attributes, spki=spki, version=version)
    return sign_info(key, info)
