"""Building CRLs (RFC 5280 section 5) signed by the CA key, wherever it lives.

A fleet CA lists hundreds of thousands of revocations, so the revokedCertificates
SEQUENCE is encoded here, straight from the inventory's text (hex serial, UTC
timestamp text, reason name): one short byte string per entry, no per-entry
Python objects, linear in the number of entries.  cryptography's builder built a
``RevokedCertificate`` object per entry and copied its list on every
``add_revoked_certificate`` (quadratic: 37 s for 100,000 entries).  The frame
around the entries (issuer, times, AKI, CRL number) is plain DER as well; the CA
key is asked for exactly one signature, through ``sign()``, so a Key Vault key
works like a local one.  tests/test_crl_scale.py holds the encoding to
cryptography's builder (identical tbsCertList bytes), openssl and pkilint.
"""

from __future__ import annotations

import gc
import operator
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import repeat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding

from kvpki_cli.errors import BackendError, UsageError
from kvpki_cli.pki.certificates import authority_key_identifier
from kvpki_cli.pki.keys import CAPrivateKey, signing_hash

REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}

# (serial as lowercase hex, revocation time as "YYYY-MM-DDTHH:MM:SSZ" or None, reason name or None):
# what the inventory stores, so no conversion sits between the database and the encoder.
RevokedRow = tuple[str, str | None, str | None]

SIGNATURE_ALGORITHMS = {  # DER AlgorithmIdentifier per (key family, hash)
    ("ec", "sha256"): bytes.fromhex("300a06082a8648ce3d040302"),  # ecdsa-with-SHA256
    ("ec", "sha384"): bytes.fromhex("300a06082a8648ce3d040303"),  # ecdsa-with-SHA384
    ("rsa", "sha256"): bytes.fromhex("300d06092a864886f70d01010b0500"),  # sha256WithRSAEncryption
    ("rsa", "sha384"): bytes.fromhex("300d06092a864886f70d01010c0500"),  # sha384WithRSAEncryption
}
CRL_REASON_OID = bytes.fromhex("0603551d15")  # id-ce-cRLReasons 2.5.29.21
AKI_OID = bytes.fromhex("0603551d23")  # id-ce-authorityKeyIdentifier 2.5.29.35
CRL_NUMBER_OID = bytes.fromhex("0603551d14")  # id-ce-cRLNumber 2.5.29.20
IDP_OID = bytes.fromhex("0603551d1c")  # id-ce-issuingDistributionPoint 2.5.29.28
TIME_CACHE = 4096
CHUNK = 65536  # rows encoded together: bounds the column lists' memory, keeps the C loops long
FAST_LEADS = frozenset("1234567")  # first hex digit of a serial whose first octet needs no 0x00
UTC_YEARS = frozenset(str(year) for year in range(1950, 2050))
SEPARATORS = b"--T::Z\n"  # what remains of "YYYY-MM-DDTHH:MM:SSZ\n" without its digits
first, second, third = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)
year = operator.itemgetter(slice(0, 4))
seconds_part = operator.itemgetter(slice(0, 19))
utc_digits = operator.itemgetter(slice(2, None))  # "YYMMDDHHMMSSZ" of "YYYYMMDDHHMMSSZ"


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a CRL's rows are read and encoded: they form no cycles,
    and the collections their allocation triggers scan them all again (a third of the read time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_reason(name: str) -> str:
    """Canonical RFC 5280 reason name, matched case-insensitively."""
    for canonical in REASONS:
        if canonical.lower() == name.lower():
            return canonical
    raise UsageError(f"unknown revocation reason {name!r} (one of: {', '.join(REASONS)})")


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _length(len(content)) + content


def _entry_extensions(reason: str) -> bytes:
    """crlEntryExtensions holding one non-critical reasonCode (RFC 5280 section 5.3.1)."""
    value = x509.CRLReason(REASONS[reason]).public_bytes()
    return _tlv(0x30, _tlv(0x30, CRL_REASON_OID + _tlv(0x04, value)))


# Reason name -> encoded crlEntryExtensions; ``unspecified`` is omitted as RFC 5280 recommends.
ENTRY_EXTENSIONS: dict[str | None, bytes] = {name: _entry_extensions(name) for name in REASONS}
ENTRY_EXTENSIONS["unspecified"] = ENTRY_EXTENSIONS[""] = ENTRY_EXTENSIONS[None] = b""
# (serial octets, reason) -> SEQUENCE tag and length, INTEGER tag and length of an entry with a UTCTime.
ENTRY_HEADERS = {
    (size, reason): bytes((0x30, 2 + size + 15 + len(extensions), 0x02, size))
    for size in range(1, 21)
    for reason, extensions in ENTRY_EXTENSIONS.items()
}


def time_der(text: str) -> bytes:
    """RFC 5280 Time from the inventory's UTC text: UTCTime through 2049, GeneralizedTime after.

    ``text`` must be exactly "YYYY-MM-DDTHH:MM:SSZ" with a real date and time (ValueError otherwise).
    """
    digits = text.encode("ascii").translate(None, b"-T:")  # "YYYYMMDDHHMMSSZ" in one C call
    if len(text) != 20 or len(digits) != 15 or not digits[:14].isdigit() or text[19] != "Z":
        raise ValueError(f"not a UTC timestamp: {text!r}")
    datetime.fromisoformat(text[:19])  # separators in their places, month 13, second 61, ...
    if b"1950" <= digits[:4] <= b"2049":
        return b"\x17\x0d" + digits[2:]
    return b"\x18\x0f" + digits


def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _serial_content(serial: str) -> bytes:
    """INTEGER content octets of a positive serial given as hex (minimal, with a 0x00 before a high bit)."""
    octets = bytes.fromhex(serial if len(serial) % 2 == 0 else "0" + serial).lstrip(b"\x00")
    if not octets or octets[0] & 0x80:
        octets = b"\x00" + octets
    return octets


def encode_revoked(rows: Iterable[RevokedRow], default_time: str) -> bytes:
    """The revokedCertificates SEQUENCE OF (RFC 5280 section 5.1.2.6); b"" when there are none.

    Rows from a damaged inventory (bad hex, bad timestamp, unknown reason) raise BackendError.
    """
    rows = rows if isinstance(rows, list) else list(rows)
    default_der = time_der(default_time)  # also checks it
    chunks = []
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        chunks.append(_encode_columns(chunk, default_time) or _encode_rows(chunk, default_der))
    if not chunks:
        return b""  # RFC 5280: omitted, not empty, when nothing is revoked
    body = b"".join(chunks)
    chunks.clear()
    return b"\x30" + _length(len(body)) + body


def _encode_columns(rows: list[RevokedRow], default_time: str) -> bytes | None:
    """The common shape (kvpki's serials, times 1950-2049, known reasons), a column at a time in C
    loops (``map``, ``join``, ``translate``): well under ``_encode_rows``'s time.  None when any row
    is not of that shape; ``_encode_rows`` then encodes the chunk, or names what is wrong with it."""
    try:
        serials = list(map(first, rows))
        times = list(map(second, rows))
        reasons = list(map(third, rows))
        # Serials: lowercase hex, whole octets, 1 to 20 of them, first octet 0x10-0x7f (no 0x00 pad).
        if "".join(serials).encode("ascii").translate(None, b"0123456789abcdef"):
            return None
        lengths = set(map(len, serials))
        if max(lengths) > 40 or any(n & 1 or n == 0 for n in lengths) or not FAST_LEADS.issuperset(map(first, serials)):
            return None
        contents = list(map(bytes.fromhex, serials))
        # Times: exactly "YYYY-MM-DDTHH:MM:SSZ", real dates, years 1950-2049 (UTCTime).
        if None in times or "" in times:  # no recorded time: thisUpdate
            times = [t or default_time for t in times]
        blob = "\n".join(times).encode("ascii")
        if blob.translate(None, b"0123456789") != SEPARATORS * (len(times) - 1) + SEPARATORS[:-1]:
            return None
        if set(map(len, times)) != {20} or not UTC_YEARS.issuperset(map(year, times)):
            return None
        deque(map(datetime.fromisoformat, map(seconds_part, times)), maxlen=0)  # month 13, Feb 30, ...
        digits = map(utc_digits, blob.translate(None, b"-T:").split(b"\n"))
        extensions = map(ENTRY_EXTENSIONS.__getitem__, reasons)
        headers = list(map(ENTRY_HEADERS.__getitem__, zip(map(len, contents), reasons, strict=True)))
        return b"".join(map(b"".join, zip(headers, contents, repeat(b"\x17\x0d"), digits, extensions, strict=False)))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, UnicodeError):
        return None


def _encode_rows(rows: list[RevokedRow], default_der: bytes) -> bytes:
    """Any shape, a row at a time; the reference ``_encode_columns`` must agree with."""
    parts: list[bytes] = []
    append = parts.append
    # Mass revocations share their second: each distinct one is encoded once (None: no recorded time).
    times: dict[str | None, bytes] = {None: default_der}
    extensions = ENTRY_EXTENSIONS
    try:
        for serial, revoked_at, reason in rows:
            content = _serial_content(serial)
            when = revoked_at or None  # NULL or empty: no recorded time
            date = times.get(when)
            if date is None:
                if len(times) > TIME_CACHE:  # bounded: a million distinct seconds would cost 100 MB
                    times = {None: default_der}
                date = times[when] = time_der(when)  # type: ignore[arg-type]
            tail = date + extensions[reason]
            size = len(content)
            length = 2 + size + len(tail)
            if length <= 0x7F:  # one-octet lengths: every entry of a kvpki CA
                append(b"\x30%c\x02%c%b%b" % (length, size, content, tail))
            else:
                append(_tlv(0x30, _tlv(0x02, content) + tail))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BackendError(f"the inventory holds an unreadable revocation: {exc}") from None
    return b"".join(parts)


def signature_algorithm(signer: CAPrivateKey) -> bytes:
    """The AlgorithmIdentifier (DER) of the signatures ``_sign`` makes with ``signer``."""
    family = "ec" if isinstance(signer, ec.EllipticCurvePrivateKey) else "rsa"
    return SIGNATURE_ALGORITHMS[(family, signing_hash(signer).name)]


def _sign(signer: CAPrivateKey, data: bytes) -> bytes:
    algorithm = signing_hash(signer)
    if isinstance(signer, ec.EllipticCurvePrivateKey):
        return signer.sign(data, ec.ECDSA(algorithm))
    return signer.sign(data, padding.PKCS1v15(), algorithm)


def build_crl(
    issuer: x509.Certificate,
    signer: CAPrivateKey,
    revoked: Iterable[RevokedRow],
    *,
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
    distribution_point: str | None = None,
) -> x509.CertificateRevocationList:
    """``build_crl_der``'s CRL, parsed (which also checks its encoding)."""
    der = build_crl_der(
        issuer,
        signer,
        revoked,
        crl_number=crl_number,
        this_update=this_update,
        next_update=next_update,
        distribution_point=distribution_point,
    )
    return x509.load_der_x509_crl(der)


def build_crl_der(
    issuer: x509.Certificate,
    signer: CAPrivateKey,
    revoked: Iterable[RevokedRow],
    *,
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
    distribution_point: str | None = None,
) -> bytes:
    """A v2 CRL (DER) with AKI and CRL number; one ``signer.sign()`` call whatever its size.

    ``distribution_point``: the CRL of one partition (RFC 5280 section 5.2.5), carrying a critical
    issuingDistributionPoint that names this URL (the CRL DP of the partition's certificates) and
    onlyContainsUserCerts (partitions hold end-entity certificates only); None: a complete CRL.
    """
    this_text = utc_text(this_update)
    entries = encode_revoked(revoked, this_text)
    extensions = _extension(AKI_OID, authority_key_identifier(issuer).public_bytes()) + _extension(
        CRL_NUMBER_OID, x509.CRLNumber(crl_number).public_bytes()
    )
    if distribution_point is not None:
        extensions += _extension(IDP_OID, issuing_distribution_point(distribution_point).public_bytes(), critical=True)
    algorithm = signature_algorithm(signer)
    tbs = _tlv(
        0x30,
        b"\x02\x01\x01"  # version v2
        + algorithm
        + issuer.subject.public_bytes()
        + time_der(this_text)
        + time_der(utc_text(next_update))
        + entries
        + _tlv(0xA0, _tlv(0x30, extensions)),
    )
    del entries
    signature = _sign(signer, tbs)
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))


def pem(der: bytes) -> bytes:
    """PEM "X509 CRL" with 64-character lines, as openssl writes it."""
    import base64

    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"-----BEGIN X509 CRL-----\n" + b"\n".join(lines) + b"\n-----END X509 CRL-----\n"


def issuing_distribution_point(url: str) -> x509.IssuingDistributionPoint:
    """The IDP of a partition CRL: its own URL, end-entity certificates only."""
    return x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)],
        relative_name=None,
        only_contains_user_certs=True,
        only_contains_ca_certs=False,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )


def _extension(oid: bytes, value: bytes, *, critical: bool = False) -> bytes:
    """An Extension; criticality FALSE is the DEFAULT, so DER omits it."""
    return _tlv(0x30, oid + (b"\x01\x01\xff" if critical else b"") + _tlv(0x04, value))
