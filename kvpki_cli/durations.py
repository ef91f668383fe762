"""Parse human durations such as ``90d``, ``10y``, ``12h`` used by flags and the config file.

Every duration is bounded (``MAX_DURATION``, 100 years) so that adding it to today's
date always stays inside what ``datetime`` and X.509 can hold.
"""

from __future__ import annotations

import re
from datetime import timedelta

from kvpki_cli.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"\s*(\d{1,12})\s*([smhdwy])\s*")
MAX_DURATION = timedelta(days=100 * 365)


def parse_duration(text: str, *, what: str = "duration") -> timedelta:
    """``"90d"`` -> 90 days; a year counts 365 days.  Zero, malformed or over-long values are usage errors."""
    match = _DURATION.fullmatch(str(text))
    if not match:
        raise UsageError(f"invalid {what} {text!r} (use a number and a unit s/m/h/d/w/y, e.g. 90d)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not seconds:
        raise UsageError(f"{what} must be greater than zero")
    if seconds > MAX_DURATION.total_seconds():
        raise UsageError(f"{what} {text.strip()!r} is too long (at most 100y)")
    return timedelta(seconds=seconds)
