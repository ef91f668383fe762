"""Parse human durations such as ``90d``, ``10y``, ``12h`` used by flags and the config file."""

from __future__ import annotations

import re
from datetime import timedelta

from kvpki_cli.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"^\s*(\d{1,6})\s*([smhdwy])\s*$")


def parse_duration(text: str, *, what: str = "duration") -> timedelta:
    """``"90d"`` -> 90 days; a year counts 365 days.  Zero or malformed values are usage errors."""
    match = _DURATION.match(str(text))
    if not match:
        raise UsageError(f"invalid {what} {text!r} (use a number and a unit s/m/h/d/w/y, e.g. 90d)")
    value = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if not value:
        raise UsageError(f"{what} must be greater than zero")
    return value
