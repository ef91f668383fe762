"""Log line formats of `kvpki serve`: the plain text default, or one JSON object per line.

``[server] log_format = "json"`` writes ``{"time", "level", "message", ...fields}``
per record, for log shippers.  The message and every field are escaped as in the
text format (``textsafe.escape``, idempotent) before JSON encoding, so a hostile
subject reads the same in both formats and never splits a line.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from kvpki_cli.textsafe import escape

TEXT_FORMAT = "kvpki serve: %(message)s"
RESERVED = frozenset({"time", "level", "logger", "message", "traceback"})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                name = escape(key)
                if name not in RESERVED:
                    entry[name] = value if isinstance(value, (int, float, bool)) or value is None else escape(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["traceback"] = escape(record.exc_text)
        return json.dumps(entry, ensure_ascii=True)


def handler_formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
