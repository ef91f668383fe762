"""The sign operation: cached bearer token + one ``POST /keys/{name}/{version}/sign``.

On a 401 (token revoked, expired early, vault moved tenant) it does what the
SDK's challenge policy does: reads the challenge, gets a fresh token through
``DefaultAzureCredential`` and repeats once.  Throttling, 5xx, timeouts and lost
connections are retried under the store's deadline (see ``retry``).  Every
attempt first takes its turn from the vault's rate governor (``governor``); a 429
tells the governor to stop bursting.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from kvpki_cli.errors import BackendError, NotFound
from kvpki_cli.keystores.azure.auth import DEFAULT_SCOPE, CachingCredential
from kvpki_cli.keystores.azure.errors import tls_error, to_kvpki_error
from kvpki_cli.keystores.azure.governor import SignBudget
from kvpki_cli.keystores.azure.http import KEYS_API_VERSION, Response, VaultHTTP, parse_challenge
from kvpki_cli.keystores.azure.retry import Retryable, RetryPolicy


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
        budget: SignBudget | None = None,
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
        self.budget = budget

    def _attempt(self, token: str, body: dict[str, str], timeout: float) -> Response:
        """One sign request, in its turn of the vault's budget (its wait counts against ``timeout``)."""
        if self.budget is not None:
            self.budget.take(time.monotonic() + timeout)
        try:
            return self.http.request("POST", self.path, token, body, timeout)
        except Retryable as exc:
            if exc.status == 429 and self.budget is not None:
                self.budget.governor.throttled(exc.retry_after)
            raise

    def _post(self, token: str, body: dict[str, str]) -> Response:
        try:
            return self.retry.run(
                lambda timeout: self._attempt(token, body, timeout),
                f"Key Vault sign with {self.kid}",
            )
        except ssl.SSLCertVerificationError as exc:
            raise tls_error(self.vault_url, str(exc.verify_message)) from None

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
        error = response.error
        if response.status == 404 or error.most_specific_code in ("KeyDisabled", "KeyOperationForbidden"):
            self._on_stale_key()  # gone or disabled: the cached key id must not be used again
        if response.status == 404:
            raise NotFound(f"CA key {self.kid} is not in the vault (cached CA data cleared): {error.message}")
        raise to_kvpki_error(error, "keys/sign", f"sign with {self.kid}", self.vault_url)
