"""Human-facing messages: always on stderr, never on stdout (stdout is the data contract)."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """One ``kvpki: warning: ...`` line on stderr."""
    sys.stderr.write(f"kvpki: warning: {message}\n")


def error_line(message: str) -> str:
    """Format an error as the single line scripts can rely on."""
    first = " ".join(str(message).split()) or "unknown error"
    return f"kvpki: error: {first}\n"
