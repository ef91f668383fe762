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


class ClientErrorFilter(logging.Filter):
    """aiohttp's own records: a malformed request is the client's error, one escaped line, no traceback.

    aiohttp logs "Error handling request" with a traceback whenever a peer sends a
    bad request line, an over-long header or drops the connection; a scanner could
    fill the log with multi-line tracebacks quoting its own bytes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_client_error(exc):
            detail = " ".join(str(getattr(exc, "message", "") or exc).split())
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {detail}"[:500]
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _is_client_error(exc: BaseException) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(exc, (HttpProcessingError, ConnectionError, TimeoutError))


def install_library_filters() -> None:
    """Escape (and shorten client-error records of) the loggers aiohttp writes to."""
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.internal", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, EscapingFilter) for f in logger.filters):
            logger.addFilter(ClientErrorFilter())
            logger.addFilter(EscapingFilter())


def server_log() -> logging.Logger:
    """The ``kvpki.serve`` logger with the escaping filter installed (once)."""
    log = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, EscapingFilter) for f in log.filters):
        log.addFilter(EscapingFilter())
    return log
