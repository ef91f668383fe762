"""Property tests for the text boundaries: escaping, durations, --san/--subject parsing and PEM finding.

Each must end in a value or in exit 2/3/4, never in another exception, for any text at all.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpki_cli.durations import MAX_DURATION, parse_duration
from kvpki_cli.errors import InvalidInput, KvpkiError, PolicyViolation, UsageError
from kvpki_cli.messages import error_line
from kvpki_cli.pki.csr import decode_csr_bytes
from kvpki_cli.pki.names import check_name_syntax, parse_san, parse_subject
from kvpki_cli.pki.pem import load_certificate
from kvpki_cli.textsafe import escape, first_unsafe
from tests import csrforge as forge
from tests.fuzzkit import NASTY_CHARS

anything = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(NASTY_CHARS)), max_size=40)
EXPECTED = (UsageError, InvalidInput, PolicyViolation)


@settings(max_examples=500, deadline=None, database=None)
@given(anything)
def test_escape_leaves_no_unsafe_character_and_is_idempotent(text: str) -> None:
    escaped = escape(text)
    assert first_unsafe(escaped) is None and "\n" not in escaped
    assert escape(escaped) == escaped
    line = error_line(text)
    assert line.endswith("\n") and line.count("\n") == 1 and first_unsafe(line[:-1]) is None


@settings(max_examples=500, deadline=None, database=None)
@given(st.one_of(anything, st.from_regex(r"\s*[0-9]{1,14}\s*[smhdwyx]\s*", fullmatch=True)))
def test_durations_are_bounded_or_usage_errors(text: str) -> None:
    try:
        value = parse_duration(text)
    except UsageError:
        return
    assert value <= MAX_DURATION
    now = datetime.now(UTC)
    assert (now + value).year < 2200 and (now - value).year > 1900


@settings(max_examples=1000, deadline=None, database=None)
@given(
    st.one_of(anything, st.builds(lambda p, v: f"{p}:{v}", st.sampled_from(("DNS", "IP", "URI", "email")), anything))
)
def test_san_and_subject_text_parse_or_fail_cleanly(text: str) -> None:
    for parse in (parse_san, parse_subject):
        try:
            parse(text)
        except KvpkiError as error:
            assert isinstance(error, EXPECTED), error


def test_subjects_with_controls_are_refused_even_for_init_ca() -> None:
    for bad in ("CN=Root\u202e", "CN=Root,O=a\u0085b", "CN=a\u200bb", "CN=Root\\0Ax"):
        try:
            parse_subject(bad)
        except InvalidInput:
            continue
        raise AssertionError(f"{bad!r} was accepted")
    check_name_syntax(parse_subject("CN=Zürich\u200dAG"))  # ZWJ belongs to correct spelling


KEY = ec.generate_private_key(ec.SECP256R1())
CSR = forge.csr(KEY, forge.name((forge.OID_CN, forge.UTF8, b"device-1")))
CSR_PEM = x509.load_der_x509_csr(CSR).public_bytes(Encoding.PEM)


@settings(max_examples=300, deadline=None, database=None)
@given(before=st.text(max_size=60).map(str.encode), after=st.text(max_size=60).map(str.encode))
def test_pem_is_found_behind_any_text(before: bytes, after: bytes) -> None:
    """openssl reads the first block whatever text surrounds it; kvpki too (text ending in a newline)."""
    data = before + b"\n" + CSR_PEM.replace(b"\n", b"\r\n" if len(before) % 2 else b"\n  ") + after
    if b"-----BEGIN" in before:
        return
    assert decode_csr_bytes(data) == CSR


def test_certificate_loading_takes_the_first_block_and_refuses_the_rest() -> None:
    from tests.helpers import openssl

    pem = openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                  "/dev/null", "-subj", "/CN=x", "-days", "1").stdout  # fmt: skip
    text = b"subject=CN = x\nissuer=CN = x\n\n" + pem + b"\nsubject=CN = y\n" + pem
    assert load_certificate(text).subject.rfc4514_string() == "CN=x"
    for bad in (b"subject=x\n", b"x\n-----BEGIN CERTIFICATE-----\nAAAA\n", CSR_PEM, b"\x30\x03\x02\x01\x01"):
        try:
            load_certificate(bad)
        except InvalidInput:
            continue
        raise AssertionError(f"{bad!r} loaded")
