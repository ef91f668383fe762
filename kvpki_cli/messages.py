"""Human-facing messages: always on stderr, never on stdout (stdout is the data contract)."""

from __future__ import annotations

import sys

from kvpki_cli.textsafe import escape


def warn(message: str) -> None:
    """One ``kvpki: warning: ...`` line on stderr."""
    sys.stderr.write(f"kvpki: warning: {_one_line(message)}\n")


def info(message: str) -> None:
    """One ``kvpki: ...`` success line on stderr; paths and names in it are escaped like errors."""
    sys.stderr.write(f"kvpki: {_one_line(message)}\n")


def error_line(message: str) -> str:
    """Format an error as the single line scripts can rely on."""
    return f"kvpki: error: {_one_line(message) or 'unknown error'}\n"


def _one_line(message: object) -> str:
    """Whitespace runs collapsed, control characters escaped: input quoted in a message cannot break the line."""
    return escape(" ".join(str(message).split()))
