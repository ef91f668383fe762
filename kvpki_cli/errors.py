"""One exception hierarchy for every expected failure; each class carries its exit code.

The CLI maps these to a single ``kvpki: error: ...`` line on stderr and the
documented exit code; the EST server maps them to HTTP statuses.  Anything that
is not a ``KvpkiError`` is a bug and exits with ``EXIT_INTERNAL``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_POLICY = 4
EXIT_NOT_FOUND = 5
EXIT_BACKEND = 6
EXIT_EXISTS = 7


class KvpkiError(Exception):
    """Base class: an expected failure with a user-facing one-line message."""

    exit_code = EXIT_INTERNAL
    http_status = 500


class UsageError(KvpkiError):
    """Bad command-line arguments or configuration values."""

    exit_code = EXIT_USAGE
    http_status = 400


class InvalidInput(KvpkiError):
    """Input that cannot be parsed or verified (garbage CSR, bad signature, bad serial)."""

    exit_code = EXIT_INVALID_INPUT
    http_status = 400


class PolicyViolation(KvpkiError):
    """Well-formed input that the CA refuses to certify (weak key, CA:TRUE, SAN not allowed)."""

    exit_code = EXIT_POLICY
    http_status = 403


class NotFound(KvpkiError):
    """Unknown CA, certificate serial or key."""

    exit_code = EXIT_NOT_FOUND
    http_status = 404


class BackendError(KvpkiError):
    """The key store or the inventory failed (vault unreachable, throttled, database locked)."""

    exit_code = EXIT_BACKEND
    http_status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AlreadyExists(KvpkiError):
    """Refusing to overwrite: a CA of that name exists, a certificate is already revoked."""

    exit_code = EXIT_EXISTS
    http_status = 409
