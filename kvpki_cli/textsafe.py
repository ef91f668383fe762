"""One definition of the characters that must never pass unescaped into a name, a log line or a terminal.

Control characters (C0, DEL, C1 such as U+0085 NEL), line and paragraph
separators, surrogates and invisible format characters (bidi overrides such as
U+202E, zero-width spaces, BOM) let a certificate name forge a log line, hide
text from a reviewer or read differently than it compares.  ``pki/names.py``
refuses them in what kvpki certifies; everything that logs or records
attacker-influenced text passes it through ``escape``.  Standard library only:
the ``sign-csr`` fast path imports this.
"""

from __future__ import annotations

import unicodedata

# Zero-width (non-)joiners are part of correct spelling in Persian, Indic scripts and emoji sequences.
_ALLOWED_FORMAT_CHARACTERS = frozenset("\u200c\u200d")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


def is_unsafe(char: str) -> bool:
    """A control, separator, surrogate or invisible formatting character (ZWNJ/ZWJ excepted)."""
    if " " <= char < "\x7f":
        return False
    category = unicodedata.category(char)
    return category in _UNSAFE_CATEGORIES or (category == "Cf" and char not in _ALLOWED_FORMAT_CHARACTERS)


def first_unsafe(text: str) -> str | None:
    """The first unsafe character of ``text``, or None."""
    return next((char for char in text if is_unsafe(char)), None)


def describe_char(char: str) -> str:
    """``U+202E`` style, for error messages."""
    return f"U+{ord(char):04X}"


def escape(text: object) -> str:
    """``text`` with every unsafe character written as ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN``.

    Idempotent (the escapes are plain ASCII), so a value escaped where it is built
    can safely be escaped again where it is logged.
    """
    value = str(text)
    if value.isascii() and value.isprintable():
        return value
    return "".join(_escape_char(char) if is_unsafe(char) else char for char in value)


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


MAX_REQUESTER = 256  # characters of an inventory requester (a client certificate's subject can be ~100 kB)


def requester_text(requester: object) -> str:
    """A requester as recorded and logged: escaped, and cut to ``MAX_REQUESTER`` characters with a marker
    (rate limits key on the full identity, so cutting merges nothing there)."""
    value = escape(requester)
    if len(value) <= MAX_REQUESTER:
        return value
    marker = f"...[{len(value)} chars]"
    return value[: MAX_REQUESTER - len(marker)] + marker
