"""Stop one device from provisioning again through Azure IoT Hub DPS (``revoke --dps``, ``dps-disable``).

IoT Hub checks no CRL or OCSP: Microsoft's documented way to disallow one device
of an enrollment group is a *disabled individual enrollment* for its
registration ID (for X.509 attestation, the certificate's subject CN).  This
module creates (or disables) that enrollment through DPS's service REST API
(``PUT /enrollments/{id}?api-version=2021-10-01``), authenticated with an Entra
ID token from ``DefaultAzureCredential`` through the same disk token cache the
Key Vault store uses.  Only this code path imports azure-identity.

The local revocation never depends on DPS: ``revoke`` commits first and then runs
this step; if it fails, ``DpsStepFailed`` (exit 6) says so and names the
``kvpki dps-disable`` command that repeats it.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from kvpki_cli.errors import BackendError, UsageError
from kvpki_cli.textsafe import escape

API_VERSION = "2021-10-01"
SCOPE = "https://azure-devices-provisioning.net/.default"
TIMEOUT_S = 15.0
ATTEMPTS = 3  # per request, for connection failures, 408, 429 and 5xx
# DPS registration IDs: case-insensitive alphanumerics and '-', '.', '_', ':', up to 128 characters,
# ending in an alphanumeric or '-'.  DPS keys enrollments by the lowercase form.
REGISTRATION_ID = re.compile(r"[a-z0-9._:-]{0,127}[a-z0-9-]", re.ASCII)
DATA_CONTRIBUTOR = "Device Provisioning Service Data Contributor"
# a DPS service endpoint: one DNS label (DPS names are 3-64 characters) under Azure's DPS domain
DPS_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?\.azure-devices-provisioning\.net", re.ASCII)
ALLOWED_HOSTS_ENV = "KVPKI_DPS_ALLOWED_HOSTS"


class DpsStepFailed(BackendError):
    """The DPS step failed after the local revocation was committed (exit 6)."""


class DpsTarget(NamedTuple):
    """Everything the DPS step needs, worked out (and validated) before anything is changed."""

    url: str  # https://<name>.azure-devices-provisioning.net
    registration_id: str
    certificate_pem: str
    serial: str
    ca: str

    def rerun(self) -> str:
        return f"kvpki dps-disable {self.serial} --ca {self.ca} --dps {self.url}"


def check_dps_url(url: str) -> str:
    """https://<name>.azure-devices-provisioning.net[:port] and nothing else (the enrollment path is appended).

    The URL receives a bearer token for the DPS audience, valid for every DPS the identity may
    use: a typo or a planted ``dps_url`` must not hand it to another host.  Other hosts (a DPS
    emulator, a test server, a private endpoint name) only when listed in ``KVPKI_DPS_ALLOWED_HOSTS``
    (comma-separated host names).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    invalid = f"invalid DPS URL {escape(url[:200])!r} (expected https://<name>.azure-devices-provisioning.net)"
    if parts is None or parts.scheme != "https" or not parts.hostname:
        raise UsageError(invalid)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(invalid)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UsageError("the DPS URL must not carry credentials (kvpki authenticates with DefaultAzureCredential)")
    host = parts.hostname.lower()
    if not DPS_HOST.fullmatch(host) and host not in allowed_dps_hosts():
        raise UsageError(
            f"DPS host {escape(host[:200])!r} is not <name>.azure-devices-provisioning.net; kvpki sends it an"
            f" Azure token, so list other hosts in {ALLOWED_HOSTS_ENV} to use them"
        )
    return f"https://{host}" + (f":{port}" if port is not None else "")


def allowed_dps_hosts() -> set[str]:
    value = os.environ.get(ALLOWED_HOSTS_ENV, "")
    return {host.strip().lower() for host in value.split(",") if host.strip()}


def configured_url(file_config: Mapping[str, Any], ca: str) -> str | None:
    """The per-CA ``dps_url`` from the config file ([ca.NAME] dps_url = "https://...")."""
    value = file_config.get("ca", {}).get(ca, {}).get("dps_url")
    return str(value) if value else None


def registration_id(certificate: x509.Certificate) -> str:
    """The device's DPS registration ID: its subject CN (X.509 attestation), lowercased."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise UsageError("the certificate has no single subject CN, so it has no DPS registration ID")
    value = str(names[0].value).lower()
    if not REGISTRATION_ID.fullmatch(value):
        raise UsageError(
            f"subject CN {value[:80]!r} is not a valid DPS registration ID (letters, digits, '-', '.', '_', ':',"
            " up to 128 characters, ending in a letter, digit or '-')"
        )
    return value


def target_for(url: str, ca: str, serial: str, certificate: x509.Certificate) -> DpsTarget:
    from kvpki_cli.pki.keys import Encoding

    pem = certificate.public_bytes(Encoding.PEM).decode()
    return DpsTarget(check_dps_url(url), registration_id(certificate), pem, serial, ca)


class DpsResult(NamedTuple):
    registration_id: str
    url: str
    outcome: str  # "created", "disabled" (existing enrollment updated) or "already-disabled"
    etag: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "dps": self.url,
            "registrationId": self.registration_id,
            "provisioningStatus": "disabled",
            "outcome": self.outcome,
            "etag": self.etag,
        }


class _Client:
    """One DPS service endpoint: bearer token (cached on disk), JSON over HTTPS, bounded retries."""

    def __init__(self, url: str, home: Any) -> None:
        from kvpki_cli.keystores.azure.auth import CachingCredential
        from kvpki_cli.keystores.azure.cache import TokenCache
        from kvpki_cli.keystores.azure.http import VaultHTTP

        ca_bundle = os.environ.get("KVPKI_AZURE_CA_BUNDLE") or None
        self.url = url
        self.host = urlsplit(url).netloc
        self.http = VaultHTTP(url, ca_bundle)
        self.credential = CachingCredential(TokenCache(home), ca_bundle)
        self._token: str | None = None

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]) -> Any:
        from kvpki_cli.keystores.azure.retry import Retryable

        refreshed = False
        for attempt in range(ATTEMPTS):
            if self._token is None:
                self._token, _ = self.credential.fetch(SCOPE, None, use_cache=not refreshed)
            try:
                response = self._send(method, path, body, headers)
            except Retryable as exc:
                if attempt + 1 == ATTEMPTS:
                    raise BackendError(f"DPS {self.host} unavailable: {exc}") from None
                time.sleep(min(exc.retry_after or 0.3 * 2**attempt, 2.0))
                continue
            except ssl.SSLCertVerificationError as exc:
                raise BackendError(
                    f"TLS verification of DPS {self.host} failed: {exc.verify_message} (set KVPKI_AZURE_CA_BUNDLE)"
                ) from None
            if response.status == 401 and not refreshed:  # a revoked or expired cached token: once more, fresh
                self.credential.drop(self._token)
                self._token, refreshed = None, True
                continue
            return response
        raise BackendError(f"DPS {self.host} unavailable")  # pragma: no cover - loop always returns or raises

    def _send(self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]) -> Any:
        """One attempt over the Key Vault store's HTTPS client (proxy, trust store, keep-alive)."""
        import http.client
        import json

        from kvpki_cli.keystores.azure.errors import RETRY_STATUSES
        from kvpki_cli.keystores.azure.http import Response
        from kvpki_cli.keystores.azure.retry import Retryable, parse_retry_after

        data = json.dumps(body).encode() if body is not None else b""
        sent = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Content-Length": str(len(data)),
            "User-Agent": "kvpki",
            "Authorization": f"Bearer {self._token}",
            **headers,
        }
        try:
            conn = self.http._connection(TIMEOUT_S)
            conn.request(method, path, body=data, headers=sent)
            raw = conn.getresponse()
            payload = raw.read()
            received = {k.lower(): v for k, v in raw.getheaders()}
            if raw.will_close:
                self.http.close()
        except TimeoutError as exc:
            self.http.close()
            raise Retryable(f"timed out talking to {self.host}") from exc
        except ssl.SSLCertVerificationError:
            self.http.close()
            raise
        except (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError) as exc:
            self.http.close()
            raise Retryable(f"connection to {self.host} failed ({type(exc).__name__})") from exc
        try:
            parsed = json.loads(payload) if payload else {}
        except ValueError:
            parsed = {}
        response = Response(raw.status, received, parsed if isinstance(parsed, dict) else {})
        if response.status in RETRY_STATUSES:
            raise Retryable(f"HTTP {response.status}", parse_retry_after(received.get("retry-after")))
        return response


def _error(host: str, response: Any) -> BackendError:
    """One line from DPS's ProvisioningServiceErrorDetails (errorCode, message, trackingId)."""
    body = response.body if isinstance(response.body, dict) else {}
    code = str(body.get("errorCode") or response.headers.get("x-ms-error-code") or "")[:100]
    message = " ".join(str(body.get("message") or "").split())[:300]
    tracking = str(body.get("trackingId") or "")[:100]  # every field bounded: one line, whatever the server sends
    detail = f"{code}: {message}" if code and message else str(code or message or "no details")
    suffix = f" (trackingId {tracking})" if tracking else ""
    if response.status == 401:
        return BackendError(f"DPS {host} rejected the Azure token (401 {detail}){suffix}: check the identity")
    if response.status == 403:
        return BackendError(
            f"DPS {host} denied access (403 {detail}){suffix}: the identity needs the role '{DATA_CONTRIBUTOR}'"
        )
    return BackendError(f"DPS {host} answered {response.status} ({detail}){suffix}")


def _writable(existing: dict[str, Any], target: DpsTarget) -> dict[str, Any]:
    """An existing enrollment as a PUT body: read-only fields dropped, provisioning disabled.

    DPS answers an X.509 attestation with the certificate's ``info`` only, and a PUT must
    carry a certificate again: then the revoked certificate is sent (the enrollment is
    disabled either way, and its other settings are kept).
    """
    body = {
        k: v
        for k, v in existing.items()
        if k not in ("registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag")
    }
    attestation = body.get("attestation")
    primary = _primary(attestation) if isinstance(attestation, dict) else None
    if not (isinstance(primary, dict) and primary.get("certificate")) and (
        not isinstance(attestation, dict) or attestation.get("type") in (None, "x509")
    ):
        body["attestation"] = _new_enrollment(target)["attestation"]
    body["provisioningStatus"] = "disabled"
    return body


def _primary(attestation: dict[str, Any]) -> Any:
    x509_part = attestation.get("x509")
    certificates = x509_part.get("clientCertificates") if isinstance(x509_part, dict) else None
    return certificates.get("primary") if isinstance(certificates, dict) else None


def _new_enrollment(target: DpsTarget) -> dict[str, Any]:
    return {
        "registrationId": target.registration_id,
        "attestation": {
            "type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": target.certificate_pem}}},
        },
        "provisioningStatus": "disabled",
    }


def disable_enrollment(target: DpsTarget, home: Any) -> DpsResult:
    """Make the device's individual enrollment exist and be disabled (idempotent).

    GET first: absent -> PUT without If-Match (create); present -> PUT the same record with
    ``provisioningStatus: disabled`` and ``If-Match: <etag>``, so a concurrent edit is not
    overwritten blindly (412 or 409 -> read again, a few times).
    """
    client = _Client(target.url, home)
    path = f"/enrollments/{quote(target.registration_id, safe='')}?api-version={API_VERSION}"
    try:
        for _round in range(3):
            current = client.request("GET", path, None, {})
            if current.status == 200:
                if current.body.get("provisioningStatus") == "disabled":
                    return DpsResult(target.registration_id, target.url, "already-disabled", current.body.get("etag"))
                etag = current.body.get("etag") or current.headers.get("etag")
                headers = {"If-Match": etag} if etag else {}
                body, outcome = _writable(current.body, target), "disabled"
            elif current.status == 404:
                body, headers, outcome = _new_enrollment(target), {}, "created"  # no If-Match: create only
            else:
                raise _error(client.host, current)
            answer = client.request("PUT", path, body, headers)
            if answer.status in (409, 412):  # created or changed meanwhile: look again
                continue
            if answer.status != 200:
                raise _error(client.host, answer)
            if answer.body.get("provisioningStatus", "disabled") != "disabled":
                raise BackendError(f"DPS {client.host} did not disable enrollment {target.registration_id}")
            return DpsResult(target.registration_id, target.url, outcome, answer.body.get("etag"))
        raise BackendError(f"DPS {client.host}: enrollment {target.registration_id} kept changing; try again")
    finally:
        client.close()
