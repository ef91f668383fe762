"""Human tables on stderr: rich when stderr is a terminal, plain aligned text otherwise."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COLUMNS = ("serial", "status", "profile", "subject", "not_after", "requester")


def print_certificate_table(rows: Sequence[dict[str, object]]) -> None:
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*COLUMNS)
        for row in rows:
            table.add_row(*(str(row.get(c) or "") for c in COLUMNS))
        Console(stderr=True).print(table)
        return
    cells = [list(COLUMNS)] + [[str(row.get(c) or "") for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        sys.stderr.write("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")
    sys.stderr.write(f"{len(rows)} certificate(s)\n")
