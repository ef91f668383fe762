"""``kvpki list --json``: a JSON array written record by record, in chunks.

``json.dumps(rows, indent=2)`` of 100k+ records held every record, every dict
and the whole text in memory at once, and indent runs the pure-Python encoder.
Here each record is encoded on its own (the C encoder), one per line, and the
text is spooled (memory up to ``SPOOL_IN_MEMORY``, then a temporary file) and
copied to stdout only once the last row has been read: a database failing in the
middle of a listing leaves stdout empty, as the script contract promises.  A
failure to write stops at once with the usual one error line (``signing.write_stdout``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable

CHUNK = 256 * 1024
SPOOL_IN_MEMORY = 16 * 1024 * 1024


def write_json_array(items: Iterable[object]) -> None:
    """``[``, each item's JSON on its own line, ``]``: valid JSON whatever the count."""
    from kvpki_cli.signing import write_stdout

    encode = json.JSONEncoder().encode
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        parts: list[str] = []
        size = 0
        separator = "[\n"
        for item in items:
            text = separator + encode(item)
            separator = ",\n"
            parts.append(text)
            size += len(text)
            if size >= CHUNK:
                spool.write("".join(parts).encode())
                parts, size = [], 0
        parts.append("[]\n" if separator == "[\n" else "\n]\n")
        spool.write("".join(parts).encode())
        spool.seek(0)
        while chunk := spool.read(CHUNK):
            write_stdout(chunk)
