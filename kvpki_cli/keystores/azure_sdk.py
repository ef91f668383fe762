"""Key Vault certificate operations through the Azure SDK (init-ca and cold caches only).

Imported lazily: a warm ``sign-csr`` never loads this module.  Every call runs
under kvpki's retry policy (the SDK's own retries are off so the deadline holds)
and SDK exceptions become one-line ``kvpki`` errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.certificates import (
    CertificateClient,
    CertificateContentType,
    CertificateOperation,
    CertificatePolicy,
    KeyUsageType,
    KeyVaultCertificate,
)

from kvpki_cli.errors import AlreadyExists, BackendError
from kvpki_cli.keystores.azure_auth import CachingCredential, _is_loopback_url
from kvpki_cli.keystores.azure_fastsign import denied_message
from kvpki_cli.keystores.azure_http import RETRY_STATUSES
from kvpki_cli.keystores.azure_retry import Retryable, RetryPolicy, parse_retry_after
from kvpki_cli.keystores.base import KeyType

T = TypeVar("T")


def _error_code(exc: HttpResponseError) -> str:
    error = getattr(exc, "error", None)
    inner = getattr(error, "innererror", None)
    if isinstance(inner, dict) and inner.get("code"):
        return str(inner["code"])
    return str(getattr(error, "code", "") or "")


def _message(exc: BaseException) -> str:
    error = getattr(exc, "error", None)
    text = getattr(error, "message", None) or getattr(exc, "message", None) or str(exc)
    return " ".join(str(text).split())[:300]


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

    def call(self, fn: Callable[[], T], what: str, permission: str, retries: bool = True) -> T:
        """Run one SDK call with retries; map failures to kvpki errors (404 stays ResourceNotFoundError)."""

        def attempt(_timeout: float) -> T:
            try:
                return fn()
            except ResourceNotFoundError:
                raise
            except (ClientAuthenticationError, ResourceExistsError):
                raise
            except HttpResponseError as exc:
                if exc.status_code in RETRY_STATUSES:
                    headers = getattr(exc.response, "headers", None) or {}
                    raise Retryable(
                        f"HTTP {exc.status_code} {_error_code(exc)}".strip(),
                        parse_retry_after(headers.get("Retry-After")),
                    ) from None
                raise
            except (ServiceRequestError, ServiceResponseError) as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise BackendError(
                        f"TLS verification of {self.vault_url} failed (set ca_bundle or KVPKI_AZURE_CA_BUNDLE)"
                    ) from None
                raise Retryable(f"connection to {self.vault_url} failed ({type(exc).__name__})") from None

        try:
            if not retries:
                return fn()
            return self.retry.run(attempt, f"Key Vault {what}")
        except ResourceNotFoundError:
            raise
        except ResourceExistsError as exc:
            if _error_code(exc) == "ObjectIsDeletedButRecoverable":
                raise AlreadyExists(
                    f"{what}: the name is held by a soft-deleted certificate in {self.vault_url}; "
                    "recover or purge it, or choose another name"
                ) from None
            raise AlreadyExists(f"{what}: {_message(exc)}") from None
        except ClientAuthenticationError as exc:
            raise BackendError(
                f"Key Vault {self.vault_url} rejected the access token for {permission}: {_message(exc)}"
            ) from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise BackendError(f"Key Vault {what} failed: {type(exc).__name__}: {_message(exc)}") from None
        except HttpResponseError as exc:
            if exc.status_code == 403:
                raise BackendError(denied_message(permission, self.vault_url, _error_code(exc))) from None
            raise BackendError(
                f"Key Vault {what} failed: HTTP {exc.status_code} {_error_code(exc)}: {_message(exc)}"
            ) from None

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
    def policy(issuer: str, subject: str, key_type: KeyType, hsm: bool) -> CertificatePolicy:
        """A non-exportable CA key policy; ``reuse_key`` keeps one key across the temporary and final versions."""
        common: dict[str, Any] = {
            "issuer_name": issuer,
            "subject": subject,
            "exportable": False,
            "reuse_key": True,
            "key_usage": [KeyUsageType.key_cert_sign, KeyUsageType.crl_sign, KeyUsageType.digital_signature],
            "validity_in_months": 1,
            "content_type": CertificateContentType.pem,
        }
        if key_type.is_ec:
            curve = "P-384" if key_type is KeyType.EC_P384 else "P-256"
            return CertificatePolicy(key_type="EC-HSM" if hsm else "EC", key_curve_name=curve, **common)
        return CertificatePolicy(key_type="RSA-HSM" if hsm else "RSA", key_size=key_type.rsa_bits, **common)

    def create_self_issued(self, name: str, policy: CertificatePolicy, timeout: float) -> KeyVaultCertificate:
        """Create a Self-issued version and wait (bounded) until the vault has issued it."""
        poller = self.call(
            lambda: self.client.begin_create_certificate(name, policy, _polling_interval=1),
            f"create certificate {name}",
            "certificates/create",
        )
        result = self.call(
            lambda: poller.result(timeout=timeout), f"issue certificate {name}", "certificates/get", retries=False
        )
        if not isinstance(result, KeyVaultCertificate):
            status = getattr(result, "status", None) or "still in progress"
            raise BackendError(
                f"Key Vault did not issue the temporary certificate {name} within {timeout:g}s ({status})"
            )
        return result

    def create_pending(self, name: str, policy: CertificatePolicy) -> CertificateOperation:
        """Create an issuer-Unknown version: it stays pending (with its CSR) until merged."""
        poller = self.call(
            lambda: self.client.begin_create_certificate(name, policy),
            f"create certificate {name}",
            "certificates/create",
        )
        result = poller.result()
        if not isinstance(result, CertificateOperation):
            raise BackendError(f"Key Vault returned no pending operation for certificate {name}")
        return result

    def merge(self, name: str, chain_der: list[bytes]) -> KeyVaultCertificate:
        return self.call(
            lambda: self.client.merge_certificate(name, chain_der), f"merge certificate {name}", "certificates/create"
        )

    def disable(self, name: str, version: str) -> None:
        self.call(
            lambda: self.client.update_certificate_properties(name, version, enabled=False),
            f"disable certificate {name}/{version}",
            "certificates/update",
        )

    def remove(self, name: str) -> None:
        """Best-effort removal of a half-created certificate (cancel, soft-delete, purge)."""
        for step in (
            lambda: self.client.delete_certificate_operation(name),
            lambda: self.client.begin_delete_certificate(name).wait(5),
            lambda: self.client.purge_deleted_certificate(name),
        ):
            try:
                step()
            except (HttpResponseError, ServiceRequestError, ServiceResponseError):
                continue

    def close(self) -> None:
        self.client.close()
