"""Key Vault errors, read once: error-code parsing, the role table, the TLS hint, error -> kvpki exit code.

Both the REST fast path (``fastsign``) and the SDK path (``sdk``) turn a failed
vault call into a ``kvpki`` error here, so a 403 means the same thing on both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvpki_cli.errors import AlreadyExists, BackendError, KvpkiError, NotFound

# Data-plane operation -> the least built-in RBAC role that grants it (access-policy permission in brackets).
ROLE_FOR = {
    "keys/sign": "Key Vault Crypto User",
    "keys/get": "Key Vault Crypto User",
    "certificates/get": "Key Vault Certificate User",
    "certificates/create": "Key Vault Certificates Officer",
    "certificates/merge": "Key Vault Certificates Officer",
    "certificates/update": "Key Vault Certificates Officer",
    "certificates/delete": "Key Vault Certificates Officer",
}
# Access-policy permission behind each operation (merge is the certificates 'create' permission).
POLICY_PERMISSION = {"certificates/merge": "certificates/create"}

# A 403 is a missing role or access policy only with these codes (innermost first); others, such as
# KeyDisabled, KeyOperationForbidden or ForbiddenByFirewall, keep their own message.
AUTHORIZATION_CODES = frozenset({"Forbidden", "ForbiddenByRbac", "ForbiddenByPolicy", "AccessDenied"})

# Transient statuses: retried for idempotent calls; for a non-idempotent call the outcome is unknown.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class VaultError(NamedTuple):
    """What a failed Key Vault response says: status, outer and inner error code, message."""

    status: int
    code: str
    inner_code: str
    message: str

    @property
    def most_specific_code(self) -> str:
        return self.inner_code or self.code

    @property
    def is_authorization(self) -> bool:
        """A real authorization failure (RBAC or access policy), not a disabled key or a firewall."""
        if self.status != 403:
            return False
        if self.inner_code:
            return self.inner_code in AUTHORIZATION_CODES
        return self.code in AUTHORIZATION_CODES


def parse_error(status: int, body: Any) -> VaultError:
    """``{"error":{"code":..,"message":..,"innererror":{"code":..}}}`` (any shape tolerated)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return VaultError(status, "", "", f"HTTP {status}")
    inner = err.get("innererror")
    inner_code = inner.get("code") if isinstance(inner, dict) else None
    message = err.get("message")
    return VaultError(
        status,
        str(err.get("code") or ""),
        str(inner_code or ""),
        " ".join(str(message or f"HTTP {status}").split())[:300],
    )


def denied_message(operation: str, vault_url: str, code: str = "") -> str:
    """The operation that was refused and the least role (or access-policy permission) that allows it."""
    role = ROLE_FOR.get(operation, "a Key Vault data-plane role")
    permission = POLICY_PERMISSION.get(operation, operation)
    extra = f" ({code})" if code else ""
    return (
        f"Key Vault denied {operation} on {vault_url}: grant '{role}' (RBAC) or the '{permission}' "
        f"access-policy permission to this identity{extra}"
    )


def tls_error(vault_url: str, detail: str = "") -> BackendError:
    reason = f": {detail}" if detail else ""
    return BackendError(f"TLS verification of {vault_url} failed{reason} (set ca_bundle or KVPKI_AZURE_CA_BUNDLE)")


def to_kvpki_error(error: VaultError, operation: str, what: str, vault_url: str) -> KvpkiError:
    """The one mapping from a Key Vault error to a kvpki error (and so to an exit code)."""
    code = error.most_specific_code
    if error.status == 401:
        return BackendError(f"Key Vault {vault_url} rejected the access token for {operation}: {error.message}")
    if error.is_authorization:
        return BackendError(denied_message(operation, vault_url, code))
    if error.status == 403:
        return BackendError(f"Key Vault refused {what} on {vault_url}: {code or 'Forbidden'}: {error.message}")
    if error.status == 404:
        return NotFound(f"Key Vault {what}: {error.message}")
    if error.status == 409:
        return AlreadyExists(f"Key Vault {what}: {code + ': ' if code else ''}{error.message}")
    return BackendError(f"Key Vault {what} failed: HTTP {error.status} {code}: {error.message}".replace("  ", " "))
