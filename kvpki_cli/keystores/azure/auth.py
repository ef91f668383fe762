"""Access tokens for Key Vault: the disk token cache in front of ``DefaultAzureCredential``.

azure-identity is imported only when a token must actually be requested.  The
``CachingCredential`` wrapper serves both the fast path and the SDK clients, so a
warm cache means no token request in any code path.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any
from urllib.parse import urlsplit

from kvpki_cli.errors import BackendError
from kvpki_cli.keystores.azure.cache import TokenCache

DEFAULT_SCOPE = "https://vault.azure.net/.default"


def _is_loopback_url(url: str | None) -> bool:
    if not url:
        return False
    host = urlsplit(url if "://" in url else f"https://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_error_message(exc: BaseException) -> str:
    """One line naming the failing identity and the Entra ID reason (AADSTS code), never a secret."""
    text = " ".join(str(exc).split())
    match = re.search(r"(AADSTS\d+: .*?\.)(?: |$)", text)
    reason = match.group(1) if match else text[:300]
    who = os.environ.get("AZURE_CLIENT_ID")
    tenant = os.environ.get("AZURE_TENANT_ID")
    identity = f" for client {who} in tenant {tenant}" if who else ""
    hint = (
        "check AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET or the credential selected by "
        "AZURE_TOKEN_CREDENTIALS"
    )
    return f"Azure authentication failed{identity}: {reason} ({hint})"


def _quiet_sdk_loggers() -> None:
    """azure-identity logs chain failures as warnings; kvpki reports them as one error line instead.

    A NullHandler only stops Python's last-resort stderr printing: records still
    reach handlers the user configured on the root logger.
    """
    import logging

    for name in ("azure", "msal"):
        logging.getLogger(name).addHandler(logging.NullHandler())


class CachingCredential:
    """A ``TokenCredential``/``SupportsTokenInfo`` that consults the disk cache first.

    It remembers the (scope, tenant) the vault challenge asked for, so the store
    can cache them with the CA and later call the vault without the challenge.
    """

    def __init__(self, tokens: TokenCache, ca_bundle: str | None) -> None:
        self.tokens = tokens
        self._ca_bundle = ca_bundle
        self._inner: Any = None
        self.last_scope: str | None = None
        self.last_tenant: str | None = None

    def _credential(self) -> Any:
        if self._inner is None:
            from azure.identity import DefaultAzureCredential

            _quiet_sdk_loggers()
            kwargs: dict[str, Any] = {}
            if self._ca_bundle:
                kwargs["connection_verify"] = self._ca_bundle
            if _is_loopback_url(os.environ.get("AZURE_AUTHORITY_HOST")):
                # MSAL validates unknown authority hosts against login.microsoftonline.com's
                # instance-discovery endpoint; a loopback test authority must skip that.
                kwargs["disable_instance_discovery"] = True
            self._inner = DefaultAzureCredential(**kwargs)
        return self._inner

    def fetch(
        self,
        scope: str,
        tenant: str | None,
        *,
        use_cache: bool = True,
        claims: str | None = None,
        enable_cae: bool = False,
    ) -> tuple[str, int]:
        """(token, expires_on) for ``scope`` in ``tenant``; raises BackendError on auth failure."""
        self.last_scope, self.last_tenant = scope, tenant
        if use_cache and not claims:
            cached = self.tokens.get(scope, tenant)
            if cached is not None:
                return cached
        from azure.core.exceptions import ClientAuthenticationError

        options: dict[str, Any] = {"enable_cae": enable_cae}
        if tenant:
            options["tenant_id"] = tenant
        if claims:
            options["claims"] = claims
        try:
            info = self._credential().get_token_info(scope, options=options)
        except ClientAuthenticationError as exc:
            raise BackendError(auth_error_message(exc)) from None
        except ValueError as exc:  # e.g. a tenant the credential may not use
            raise BackendError(auth_error_message(exc)) from None
        if not claims:
            self.tokens.put(scope, tenant, info.token, int(info.expires_on))
        return info.token, int(info.expires_on)

    def drop(self, token: str) -> None:
        self.tokens.drop(token)

    # --- azure-core credential protocols, used by the SDK clients -----------------
    def get_token_info(self, *scopes: str, options: dict[str, Any] | None = None) -> Any:
        from azure.core.credentials import AccessTokenInfo

        opts = options or {}
        token, expires_on = self.fetch(
            scopes[0], opts.get("tenant_id"), claims=opts.get("claims"), enable_cae=bool(opts.get("enable_cae"))
        )
        return AccessTokenInfo(token, expires_on)

    def get_token(
        self, *scopes: str, claims: str | None = None, tenant_id: str | None = None, enable_cae: bool = False, **_: Any
    ) -> Any:
        from azure.core.credentials import AccessToken

        token, expires_on = self.fetch(scopes[0], tenant_id, claims=claims, enable_cae=enable_cae)
        return AccessToken(token, expires_on)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
