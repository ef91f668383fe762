"""The server log: one logger whose every line is escaped, whoever wrote the fields.

Request paths, user names, certificate subjects and parser messages are attacker
controlled; a newline or an ESC in any of them must not forge a log line or drive
the operator's terminal.  A filter on the logger escapes the formatted message
(``textsafe.escape``) so no call site can forget it.
"""

from __future__ import annotations

import logging

from kvpki_cli.textsafe import escape

LOGGER_NAME = "kvpki.serve"


class EscapingFilter(logging.Filter):
    """Replace a record's message by its escaped, already formatted form.

    A traceback (``log.exception``) keeps its lines, each escaped and indented, so an
    exception message quoting a request still cannot start a line of its own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = escape(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_text = "\n".join("  " + escape(line) for line in text.splitlines())
        return True


_TRACEBACKS = logging.Formatter()


def server_log() -> logging.Logger:
    """The ``kvpki.serve`` logger with the escaping filter installed (once)."""
    log = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, EscapingFilter) for f in log.filters):
        log.addFilter(EscapingFilter())
    return log
