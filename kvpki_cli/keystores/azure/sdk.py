"""Key Vault certificate operations through the Azure SDK (init-ca and cold caches only).

Imported lazily: a warm ``sign-csr`` never loads this module.  Every call runs
under kvpki's retry policy (the SDK's own retries are off so the deadline holds)
and SDK exceptions become one-line ``kvpki`` errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.certificates import (
    CertificateClient,
    CertificateContentType,
    CertificateOperation,
    CertificatePolicy,
    CertificateProperties,
    DeletedCertificate,
    KeyUsageType,
    KeyVaultCertificate,
)

from kvpki_cli.errors import AlreadyExists, BackendError
from kvpki_cli.keystores.azure.auth import CachingCredential, _is_loopback_url
from kvpki_cli.keystores.azure.errors import RETRY_STATUSES, VaultError, parse_error, tls_error, to_kvpki_error
from kvpki_cli.keystores.azure.retry import Retryable, RetryPolicy, parse_retry_after
from kvpki_cli.keystores.base import KeyType

T = TypeVar("T")


class DeletedButRecoverable(AlreadyExists):
    """The name is held by a soft-deleted certificate (HTTP 409 ObjectIsDeletedButRecoverable)."""


class OutcomeUnknown(BackendError):
    """A non-idempotent call failed so that the vault may or may not have applied it (5xx, timeout, lost reply)."""


def vault_error(exc: HttpResponseError) -> VaultError:
    """The SDK exception's response, read by the same parser as the fast path's."""
    status = int(exc.status_code or 0)
    response = getattr(exc, "response", None)
    try:
        body = json.loads(response.text()) if response is not None else None
    except (ValueError, TypeError, AttributeError):
        body = None
    parsed = parse_error(status, body)
    if parsed.code or parsed.inner_code:
        return parsed
    error = getattr(exc, "error", None)
    inner = getattr(error, "innererror", None)
    return VaultError(
        status,
        str(getattr(error, "code", "") or ""),
        str(inner.get("code") or "") if isinstance(inner, dict) else "",
        " ".join(str(getattr(error, "message", None) or exc.message or exc).split())[:300],
    )


def _is_tls_failure(exc: BaseException) -> bool:
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


class VaultCertificates:
    """The few certificate operations kvpki needs, with kvpki's errors and retry policy."""

    def __init__(
        self, vault_url: str, credential: CachingCredential, ca_bundle: str | None, retry: RetryPolicy
    ) -> None:
        kwargs: dict[str, Any] = {
            "retry_total": 0,
            "connection_timeout": min(retry.deadline, 30),
            "read_timeout": min(retry.deadline, 60),
        }
        if ca_bundle:
            kwargs["connection_verify"] = ca_bundle
        if _is_loopback_url(vault_url):
            # The challenge names resource https://vault.azure.net; a loopback vault cannot be a subdomain of it.
            kwargs["verify_challenge_resource"] = False
        self.vault_url = vault_url
        self.client = CertificateClient(vault_url, credential, **kwargs)
        self.retry = retry

    def _error(self, exc: HttpResponseError, what: str, operation: str) -> Exception:
        error = vault_error(exc)
        if error.status == 409 and error.most_specific_code == "ObjectIsDeletedButRecoverable":
            return DeletedButRecoverable(
                f"{what}: the name is held by a soft-deleted certificate in {self.vault_url}; "
                "recover it and run the same command again, or choose another name"
            )
        return to_kvpki_error(error, operation, what, self.vault_url)

    def call(self, fn: Callable[[], T], what: str, operation: str) -> T:
        """Run one idempotent SDK call with retries; map failures to kvpki errors (404 stays ResourceNotFoundError)."""

        def attempt(_timeout: float) -> T:
            try:
                return fn()
            except HttpResponseError as exc:
                if exc.status_code in RETRY_STATUSES:
                    headers = getattr(exc.response, "headers", None) or {}
                    raise Retryable(
                        f"HTTP {exc.status_code} {vault_error(exc).most_specific_code}".strip(),
                        parse_retry_after(headers.get("Retry-After")),
                    ) from None
                raise
            except (ServiceRequestError, ServiceResponseError) as exc:
                if _is_tls_failure(exc):
                    raise tls_error(self.vault_url) from None
                raise Retryable(f"connection to {self.vault_url} failed ({type(exc).__name__})") from None

        try:
            return self.retry.run(attempt, f"Key Vault {what}")
        except ResourceNotFoundError:
            raise
        except HttpResponseError as exc:
            raise self._error(exc, what, operation) from None

    def once(self, fn: Callable[[], T], what: str, operation: str) -> T:
        """One attempt of a call that is not idempotent: a transient failure raises ``OutcomeUnknown``."""
        try:
            return fn()
        except ResourceNotFoundError:
            raise
        except HttpResponseError as exc:
            if exc.status_code in RETRY_STATUSES:
                raise OutcomeUnknown(
                    f"Key Vault {what}: HTTP {exc.status_code} {vault_error(exc).most_specific_code}".strip()
                ) from None
            raise self._error(exc, what, operation) from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            if _is_tls_failure(exc):
                raise tls_error(self.vault_url) from None
            raise OutcomeUnknown(f"Key Vault {what}: connection failed ({type(exc).__name__})") from None

    # ------------------------------------------------------------- reads
    def get(self, name: str) -> KeyVaultCertificate | None:
        try:
            return self.call(lambda: self.client.get_certificate(name), f"get certificate {name}", "certificates/get")
        except ResourceNotFoundError:
            return None

    def operation(self, name: str) -> CertificateOperation | None:
        try:
            return self.call(
                lambda: self.client.get_certificate_operation(name),
                f"get pending certificate {name}",
                "certificates/get",
            )
        except ResourceNotFoundError:
            return None

    # ------------------------------------------------------------ writes
    @staticmethod
    def policy(issuer: str, subject: str, key_type: KeyType, hsm: bool, reuse_key: bool = True) -> CertificatePolicy:
        """A non-exportable CA key policy; ``reuse_key`` keeps one key across the temporary and final versions
        (a rollover's first version sets it false: a new key)."""
        common: dict[str, Any] = {
            "issuer_name": issuer,
            "subject": subject,
            "exportable": False,
            "reuse_key": reuse_key,
            "key_usage": [KeyUsageType.key_cert_sign, KeyUsageType.crl_sign, KeyUsageType.digital_signature],
            "validity_in_months": 1,
            "content_type": CertificateContentType.pem,
        }
        if key_type.is_ec:
            curve = "P-384" if key_type is KeyType.EC_P384 else "P-256"
            return CertificatePolicy(key_type="EC-HSM" if hsm else "EC", key_curve_name=curve, **common)
        return CertificatePolicy(key_type="RSA-HSM" if hsm else "RSA", key_size=key_type.rsa_bits, **common)

    def start_create(self, name: str, policy: CertificatePolicy, tags: dict[str, str]) -> None:
        """Start a new version (POST .../create, not idempotent: the caller re-reads the state after a failure).

        The caller polls the state itself; the SDK poller's background thread makes one status read
        and then sleeps (a long interval) instead of polling alongside.
        """
        self.once(
            lambda: self.client.begin_create_certificate(name, policy, tags=tags, _polling_interval=3600),
            f"create certificate {name}",
            "certificates/create",
        )

    def merge(self, name: str, chain_der: list[bytes], tags: dict[str, str]) -> KeyVaultCertificate:
        """One merge attempt (not idempotent): ``OutcomeUnknown`` when the vault may have applied it."""
        return self.once(
            lambda: self.client.merge_certificate(name, chain_der, tags=tags),
            f"merge certificate {name}",
            "certificates/merge",
        )

    def versions(self, name: str) -> list[CertificateProperties]:
        try:
            return self.call(
                lambda: list(self.client.list_properties_of_certificate_versions(name)),
                f"list versions of certificate {name}",
                "certificates/get",
            )
        except ResourceNotFoundError:
            return []

    def deleted(self, name: str) -> DeletedCertificate | None:
        """The soft-deleted certificate holding ``name``, or None (also when the caller may not list deleted ones)."""
        try:
            return self.call(
                lambda: self.client.get_deleted_certificate(name), f"get deleted certificate {name}", "certificates/get"
            )
        except (ResourceNotFoundError, BackendError):
            return None

    def disable(self, name: str, version: str) -> None:
        self.call(
            lambda: self.client.update_certificate_properties(name, version, enabled=False),
            f"disable certificate {name}/{version}",
            "certificates/update",
        )

    def close(self) -> None:
        self.client.close()
