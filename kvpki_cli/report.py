"""Fleet lifecycle views: ``kvpki list --expiring`` and ``kvpki report``.

Both are one indexed or grouped query in the inventory backend (SQLite or
PostgreSQL), never a walk over every record in Python, so they stay cheap on an
inventory of millions of certificates.

Definitions (at whole seconds, UTC):
  valid                      unrevoked and notAfter in the future
  due                        valid, with less than 20% of its lifetime left
  expired                    unrevoked and notAfter passed
  expired_without_successor  expired, and the same CA has no valid certificate with the same subject
                             (an approximation of "subject and SANs": a renewal keeps both)
  revoked                    revoked, expired or not
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kvpki_cli.errors import UsageError
from kvpki_cli.inventory.base import RENEW_FRACTION, CertificateRecord, LifecycleCounts, to_text

if TYPE_CHECKING:
    from kvpki_cli.authority import CertificateAuthority
    from kvpki_cli.config import Settings

COUNTS = ("valid", "due", "expired", "expired_without_successor", "revoked")
HEADINGS = ("ca", "profile", "valid", "due for renewal", "expired", "expired, no successor", "revoked")


def expiring_records(
    authority: CertificateAuthority, status: str | None, window: str, now: datetime
) -> list[CertificateRecord]:
    """Valid certificates whose notAfter falls within ``window`` from now, soonest first."""
    from kvpki_cli.durations import parse_duration

    if status not in (None, "valid"):
        raise UsageError(f"--expiring lists valid certificates; it cannot be combined with --status {status}")
    span = parse_duration(window, what="--expiring")
    now = now.replace(microsecond=0)
    return authority.inventory.expiring(authority.name, now, now + span)


def _row(counts: LifecycleCounts) -> dict[str, Any]:
    return counts._asdict()


def lifecycle_report(settings: Settings, authority: CertificateAuthority | None) -> dict[str, Any]:
    """The report as a JSON-ready document: one row per (CA, profile), plus totals."""
    from kvpki_cli.authority import utcnow

    now = utcnow().replace(microsecond=0)
    if authority is not None:
        rows = authority.inventory.lifecycle_counts(authority.name, now)
    else:
        from kvpki_cli.inventory import open_inventory

        inventory = open_inventory(settings.inventory_url, settings.home)
        try:
            rows = inventory.lifecycle_counts(None, now)
        finally:
            inventory.close()
    totals = {name: sum(getattr(row, name) for row in rows) for name in COUNTS}
    return {
        "generated_at": to_text(now),
        "due_fraction": RENEW_FRACTION,
        "rows": [_row(row) for row in rows],
        "totals": totals,
    }


def print_report_table(report: dict[str, Any]) -> None:
    """A table on stderr: rich on a terminal, aligned plain text otherwise (as ``list`` does)."""
    lines = [[str(row["ca"]), str(row["profile"]), *(str(row[name]) for name in COUNTS)] for row in report["rows"]]
    totals = ["total", "", *(str(report["totals"][name]) for name in COUNTS)]
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*HEADINGS, title=f"certificates at {report['generated_at']}")
        for line in lines:
            table.add_row(*line)
        table.add_row(*totals, style="bold")
        Console(stderr=True).print(table)
        return
    cells = [list(HEADINGS), *lines, totals]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADINGS))]
    for line in cells:
        sys.stderr.write("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")
