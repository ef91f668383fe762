"""``kvpki list --json``: a JSON array written record by record, in chunks.

``json.dumps(rows, indent=2)`` of 100k+ records held every record, every dict
and the whole text in memory at once, and indent runs the pure-Python encoder.
Here each record is encoded on its own (the C encoder), one per line, and the
text goes to stdout every ``CHUNK`` bytes; the array is the same JSON as before.
Nothing is written until the inventory has answered the query, so a failed
query still leaves stdout empty; a failure to write stops at once with the
usual one error line (``signing.write_stdout``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

CHUNK = 256 * 1024


def write_json_array(items: Iterable[object]) -> None:
    """``[``, each item's JSON on its own line, ``]``: valid JSON whatever the count."""
    from kvpki_cli.signing import write_stdout

    encode = json.JSONEncoder().encode
    parts: list[str] = []
    size = 0
    separator = "[\n"
    for item in items:
        text = separator + encode(item)
        separator = ",\n"
        parts.append(text)
        size += len(text)
        if size >= CHUNK:
            write_stdout("".join(parts).encode())
            parts, size = [], 0
    parts.append("[]\n" if separator == "[\n" else "\n]\n")
    write_stdout("".join(parts).encode())
