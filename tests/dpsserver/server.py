"""HTTPS server speaking the Azure IoT Hub DPS service API (individual enrollments) and Entra ID on 127.0.0.1.

Written from the published REST specification (Azure/azure-rest-api-specs,
specification/deviceprovisioningservices/data-plane, api-version 2021-10-01):

* ``GET|PUT|DELETE /enrollments/{id}?api-version=2021-10-01``; the body is an
  ``IndividualEnrollment`` (``registrationId`` and ``attestation`` required,
  ``provisioningStatus`` ``enabled`` (default) or ``disabled``).
* Errors are ``ProvisioningServiceErrorDetails`` (``errorCode`` int, ``trackingId``,
  ``message``, ``timestampUtc``) with an ``x-ms-error-code`` header.
* ``If-Match`` carries the enrollment's ETag: a stale ETag is 412; a PUT without
  If-Match on an enrollment that exists is 409 (create only); ``*`` matches any.
* X.509 attestation: a PUT must carry ``clientCertificates.primary.certificate`` (PEM
  or base64 DER); replies give the parsed ``info`` instead of the certificate.

Tokens come from the same Entra ID client-credentials flow as the Key Vault test
server, for the DPS audience only (``https://azure-devices-provisioning.net/.default``).
Faults: ``fail_next(status, count)``, ``deny()`` (403, no data-contributor role),
``revoke_tokens()`` (401 for tokens issued earlier).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import ssl
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.kvserver.server import DEFAULT_CLIENT_ID, DEFAULT_SECRET, DEFAULT_TENANT, _aad_error
from tests.kvserver.tlsca import TLSFiles, make_tls_files

API_VERSION = "2021-10-01"
DPS_RESOURCE = "https://azure-devices-provisioning.net"
# Registration IDs: lowercase alphanumerics and - . _ :, at most 128, last character alphanumeric or '-'.
REGISTRATION_ID = re.compile(r"[a-z0-9._:-]{0,127}[a-z0-9-]")
READ_ONLY = ("registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag")
Reply = tuple[int, Any, dict[str, str]]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def dps_error(status: int, code: int, message: str) -> Reply:
    body = {"errorCode": code, "trackingId": str(uuid.uuid4()), "message": message, "timestampUtc": _now()}
    return status, body, {"x-ms-error-code": str(code)}


def _parse_certificate(text: str) -> x509.Certificate | None:
    try:
        if "-----BEGIN" in text:
            return x509.load_pem_x509_certificate(text.encode())
        return x509.load_der_x509_certificate(base64.b64decode(text, validate=True))
    except ValueError:
        return None


def _certificate_info(certificate: x509.Certificate) -> dict[str, Any]:
    der = certificate.public_bytes(Encoding.DER)
    return {
        "subjectName": certificate.subject.rfc4514_string(),
        "sha1Thumbprint": hashlib.sha1(der).hexdigest().upper(),
        "sha256Thumbprint": hashlib.sha256(der).hexdigest().upper(),
        "issuerName": certificate.issuer.rfc4514_string(),
        "notBeforeUtc": certificate.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "notAfterUtc": certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "serialNumber": format(certificate.serial_number, "X"),
        "version": 3,
    }


@dataclass
class Enrollment:
    record: dict[str, Any]  # as the service returns it
    certificate: x509.Certificate | None  # the attestation's primary client certificate
    etag: str


@dataclass
class LoggedRequest:
    method: str
    path: str
    status: int
    if_match: str | None
    body: Any = None


@dataclass
class DpsTestServer:
    """Enrollment state, identity state and the listening socket, on 127.0.0.1."""

    tls_dir: Path | None = None
    tenant_id: str = DEFAULT_TENANT
    enrollments: dict[str, Enrollment] = field(default_factory=dict)
    log: list[LoggedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tmp = None if self.tls_dir else tempfile.TemporaryDirectory(prefix="dpsserver-tls-")
        self.tls: TLSFiles = make_tls_files(self.tls_dir or Path(self._tmp.name))  # type: ignore[union-attr]
        self.tokens: dict[str, float] = {}
        self.token_requests = 0
        self.denied = False
        self.faults: list[tuple[str | None, list[int]]] = []  # (method, [status, remaining])
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.dps = self  # type: ignore[attr-defined]
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert, self.tls.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> DpsTestServer:
        threading.Thread(target=self.httpd.serve_forever, name="dpsserver", daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def reset(self) -> None:
        with self._lock:
            self.enrollments.clear()
            self.log.clear()
            self.tokens.clear()
            self.token_requests = 0
            self.denied = False
            self.faults.clear()

    def client_env(self) -> dict[str, str]:
        """What a kvpki process needs to reach this server through the real DefaultAzureCredential."""
        return {
            "AZURE_AUTHORITY_HOST": self.url,
            "AZURE_TOKEN_CREDENTIALS": "EnvironmentCredential",  # never fall through to managed identity
            "AZURE_TENANT_ID": self.tenant_id,
            "AZURE_CLIENT_ID": DEFAULT_CLIENT_ID,
            "AZURE_CLIENT_SECRET": DEFAULT_SECRET,
            "KVPKI_AZURE_CA_BUNDLE": str(self.tls.ca_bundle),
            "KVPKI_DPS_ALLOWED_HOSTS": "127.0.0.1",  # a DPS URL receives an Azure token: other hosts opt in
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # --------------------------------------------------------------- faults
    def fail_next(self, status: int, count: int = 1, method: str | None = None) -> None:
        """The next ``count`` enrollment requests (of ``method``, or any) answer ``status``."""
        with self._lock:
            self.faults.append((method, [status, count]))

    def deny(self) -> None:
        """The identity lacks 'Device Provisioning Service Data Contributor': every enrollment call is 403."""
        self.denied = True

    def revoke_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    # ------------------------------------------------------------ internals
    def _take_fault(self, method: str) -> int | None:
        with self._lock:
            for only, fault in self.faults:
                if fault[1] > 0 and only in (None, method):
                    fault[1] -= 1
                    return fault[0]
        return None

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self.tokens[token] = time.time() + 3600
            self.token_requests += 1
        return token

    def valid_token(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            expires = self.tokens.get(header[len("Bearer ") :].strip())
        return expires is not None and expires > time.time()

    def enrollment(self, registration_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self.enrollments.get(registration_id)
            return json.loads(json.dumps(found.record)) if found else None

    def stored_certificate(self, registration_id: str) -> x509.Certificate | None:
        with self._lock:
            found = self.enrollments.get(registration_id)
            return found.certificate if found else None

    def count(self, method: str) -> int:
        with self._lock:
            return sum(1 for entry in self.log if entry.method == method and entry.path.startswith("/enrollments/"))

    # --------------------------------------------------------- enrollments
    def put_enrollment(self, registration_id: str, body: Any, if_match: str | None) -> Reply:
        if not isinstance(body, dict):
            return dps_error(400, 400004, "The request body must be a JSON IndividualEnrollment object.")
        given = body.get("registrationId")
        if not isinstance(given, str) or given.lower() != registration_id:
            return dps_error(400, 400004, "registrationId in the body does not match the enrollment id in the URI.")
        attestation = body.get("attestation")
        if not isinstance(attestation, dict) or attestation.get("type") not in ("none", "tpm", "x509", "symmetricKey"):
            return dps_error(400, 400004, "Attestation mechanism is required and its type must be valid.")
        certificate = None
        if attestation["type"] == "x509":
            primary = (attestation.get("x509") or {}).get("clientCertificates", {}).get("primary") or {}
            text = primary.get("certificate") if isinstance(primary, dict) else None
            certificate = _parse_certificate(text) if isinstance(text, str) else None
            if certificate is None:
                return dps_error(400, 400010, "Certificate is not a valid X.509 certificate (PEM or base64 DER).")
        status = body.get("provisioningStatus", "enabled")
        if status not in ("enabled", "disabled"):
            return dps_error(400, 400004, f"Invalid provisioningStatus '{status}'.")
        with self._lock:
            existing = self.enrollments.get(registration_id)
            if if_match is not None and if_match != "*":
                if existing is None:
                    return dps_error(412, 412002, "Precondition failed: the enrollment does not exist.")
                if if_match != existing.etag:
                    return dps_error(412, 412002, "Precondition failed: ETag mismatch.")
            elif if_match is None and existing is not None:
                return dps_error(409, 409201, f"Enrollment {registration_id} already exists; send its ETag to update.")
            etag = f'"{secrets.token_hex(8)}"'
            record = {k: v for k, v in body.items() if k not in READ_ONLY}
            record["registrationId"] = registration_id
            record["provisioningStatus"] = status
            if certificate is not None:
                record["attestation"] = {
                    "type": "x509",
                    "x509": {"clientCertificates": {"primary": {"info": _certificate_info(certificate)}}},
                }
            record["etag"] = etag
            record["createdDateTimeUtc"] = existing.record["createdDateTimeUtc"] if existing else _now()
            record["lastUpdatedDateTimeUtc"] = _now()
            self.enrollments[registration_id] = Enrollment(record, certificate, etag)
        return 200, record, {"ETag": etag}

    def get_enrollment(self, registration_id: str) -> Reply:
        with self._lock:
            found = self.enrollments.get(registration_id)
        if found is None:
            return dps_error(404, 404201, f"Enrollment {registration_id} not found.")
        return 200, found.record, {"ETag": found.etag}

    def delete_enrollment(self, registration_id: str, if_match: str | None) -> Reply:
        with self._lock:
            found = self.enrollments.get(registration_id)
            if found is None:
                return dps_error(404, 404201, f"Enrollment {registration_id} not found.")
            if if_match not in (None, "*", found.etag):
                return dps_error(412, 412002, "Precondition failed: ETag mismatch.")
            del self.enrollments[registration_id]
        return 204, None, {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "dpsserver/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def dps(self) -> DpsTestServer:
        return self.server.dps  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _handle(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 3 and parts[1:3] == ["oauth2", "v2.0"]:
            reply = self._token(parts[0], raw)
        elif "discovery" in parts or ".well-known" in parts:
            reply = self._discovery(parts)
        elif parts[:1] == ["enrollments"] and len(parts) == 2:
            reply = self._enrollments(urllib.parse.unquote(parts[1]), query, raw)
        else:
            reply = dps_error(404, 404001, f"no route for {self.command} {path}")
        if parts[:1] == ["enrollments"]:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            with self.dps._lock:
                self.dps.log.append(LoggedRequest(self.command, path, reply[0], self.headers.get("If-Match"), body))
        self._send(*reply)

    def _enrollments(self, registration_id: str, query: dict[str, list[str]], raw: bytes) -> Reply:
        dps = self.dps
        fault = dps._take_fault(self.command)
        if fault is not None:
            return dps_error(fault, fault * 1000 + 1, "Injected fault.")
        if not dps.valid_token(self.headers.get("Authorization")):
            return dps_error(401, 401002, "Unauthorized: the bearer token is missing, expired or for another audience.")
        if dps.denied:
            return dps_error(
                403, 403002, "The caller does not have the permission to perform this action (data-plane role)."
            )
        if query.get("api-version", [""])[0] != API_VERSION:
            return dps_error(400, 400001, "The api-version query parameter is missing or not supported.")
        if not REGISTRATION_ID.fullmatch(registration_id):
            return dps_error(400, 400004, f"Invalid registration id '{registration_id[:130]}'.")
        if_match = self.headers.get("If-Match")
        if self.command == "GET":
            return dps.get_enrollment(registration_id)
        if self.command == "PUT":
            try:
                body = json.loads(raw)
            except ValueError:
                return dps_error(400, 400004, "The request body is not valid JSON.")
            return dps.put_enrollment(registration_id, body, if_match)
        if self.command == "DELETE":
            return dps.delete_enrollment(registration_id, if_match)
        return dps_error(405, 405001, "Method not allowed.")

    # ------------------------------------------------------------- identity
    def _token(self, tenant: str, raw: bytes) -> Reply:
        dps = self.dps
        form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
        now = int(time.time())
        if tenant != dps.tenant_id:
            return 400, _aad_error("invalid_request", 90002, f"Tenant '{tenant}' not found.", now), {}
        if form.get("grant_type") != "client_credentials":
            return 400, _aad_error("unsupported_grant_type", 70003, "Unsupported grant type.", now), {}
        if form.get("client_id") != DEFAULT_CLIENT_ID or not secrets.compare_digest(
            form.get("client_secret", ""), DEFAULT_SECRET
        ):
            return 401, _aad_error("invalid_client", 7000215, "Invalid client secret provided.", now), {}
        scope = form.get("scope", "")
        if f"{DPS_RESOURCE}/.default" not in scope.split():
            message = f"The provided value for scope {scope} is not valid."
            return 400, _aad_error("invalid_scope", 70011, message, now), {}
        token = dps.issue_token()
        return 200, {"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600, "access_token": token}, {}

    def _discovery(self, parts: list[str]) -> Reply:
        dps = self.dps
        if parts[:3] == ["common", "discovery", "instance"]:
            host = urllib.parse.urlsplit(dps.url).netloc
            document = {
                "tenant_discovery_endpoint": f"{dps.url}/{dps.tenant_id}/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
            return 200, document, {}
        if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            base = f"{dps.url}/{dps.tenant_id}"
            document = {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "EU",
            }
            return 200, document, {}
        return dps_error(404, 404001, "no discovery document here")
