"""The sign operation: cached bearer token + one ``POST /keys/{name}/{version}/sign``.

On a 401 (token revoked, expired early, vault moved tenant) it does what the
SDK's challenge policy does: reads the challenge, gets a fresh token through
``DefaultAzureCredential`` and repeats once.  Throttling, 5xx, timeouts and lost
connections are retried under the store's deadline (see ``azure_retry``).
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from kvpki_cli.errors import BackendError, NotFound
from kvpki_cli.keystores.azure_auth import DEFAULT_SCOPE, CachingCredential
from kvpki_cli.keystores.azure_http import KEYS_API_VERSION, Response, VaultHTTP, parse_challenge
from kvpki_cli.keystores.azure_retry import RetryPolicy

# Data-plane permission -> the built-in RBAC role that grants it.
ROLE_FOR = {
    "keys/sign": "Key Vault Crypto User",
    "keys/get": "Key Vault Crypto User",
    "certificates/get": "Key Vault Certificates Officer",
    "certificates/create": "Key Vault Certificates Officer",
    "certificates/update": "Key Vault Certificates Officer",
    "certificates/delete": "Key Vault Certificates Officer",
}


def denied_message(permission: str, vault_url: str, detail: str = "") -> str:
    role = ROLE_FOR.get(permission, "a Key Vault data-plane role")
    extra = f" ({detail})" if detail else ""
    return (
        f"Key Vault denied {permission} on {vault_url}: grant '{role}' (RBAC) or the '{permission}' "
        f"access-policy permission to this identity{extra}"
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class VaultSignClient:
    """Signs digests with one key version; ``on_stale_key`` lets the store drop its cached chain."""

    def __init__(
        self,
        vault_url: str,
        kid: str,
        credential: CachingCredential,
        http: VaultHTTP,
        retry: RetryPolicy,
        scope: str | None,
        tenant: str | None,
        on_stale_key: Callable[[], None] = lambda: None,
    ) -> None:
        self.vault_url = vault_url
        self.kid = kid
        self.path = urlsplit(kid).path.rstrip("/") + f"/sign?api-version={KEYS_API_VERSION}"
        self.credential = credential
        self.http = http
        self.retry = retry
        self.scope = scope or DEFAULT_SCOPE
        self.tenant = tenant
        self._on_stale_key = on_stale_key

    def _post(self, token: str, body: dict[str, str]) -> Response:
        try:
            return self.retry.run(
                lambda timeout: self.http.request("POST", self.path, token, body, timeout),
                f"Key Vault sign with {self.kid}",
            )
        except ssl.SSLCertVerificationError as exc:
            raise BackendError(
                f"TLS verification of {self.vault_url} failed: {exc.verify_message} "
                "(set ca_bundle or KVPKI_AZURE_CA_BUNDLE)"
            ) from None

    def sign(self, alg: str, digest: bytes) -> bytes:
        body = {"alg": alg, "value": _b64url(digest)}
        token, _ = self.credential.fetch(self.scope, self.tenant)
        response = self._post(token, body)
        if response.status == 401:
            self.credential.drop(token)
            scope, tenant = parse_challenge(response.headers.get("www-authenticate"))
            self.scope, self.tenant = scope or self.scope, tenant or self.tenant
            token, _ = self.credential.fetch(self.scope, self.tenant, use_cache=False)
            response = self._post(token, body)
            if response.status == 401:
                raise BackendError(
                    f"Key Vault {self.vault_url} rejected a fresh access token for keys/sign: "
                    f"{response.error_message} (is the vault in tenant {self.tenant}?)"
                )
        return self._result(response)

    def _result(self, response: Response) -> bytes:
        if response.status == 200 and isinstance(response.body.get("value"), str):
            return _b64url_decode(response.body["value"])
        code = response.error_code
        if response.status == 403 and code in ("KeyDisabled", "KeyOperationForbidden"):
            self._on_stale_key()
            raise BackendError(f"Key Vault refused to sign with {self.kid}: {response.error_message}")
        if response.status == 403:
            raise BackendError(denied_message("keys/sign", self.vault_url, code))
        if response.status == 404:
            self._on_stale_key()
            raise NotFound(f"CA key {self.kid} is not in the vault (cached CA data cleared): {response.error_message}")
        raise BackendError(
            f"Key Vault sign with {self.kid} failed: HTTP {response.status} {code}: {response.error_message}"
        )
