"""HTTPS server speaking the Key Vault data-plane and Entra ID client-credentials protocols on 127.0.0.1.

Real SDK clients (azure-keyvault-*, azure-identity/MSAL) talk to it unmodified apart
from the documented loopback seams.  Faults are injected at runtime through
``set_faults`` or ``POST /_admin/faults``: latency; the next N requests matching a
method and path answer a status (429, 5xx, a 403 with a chosen inner error code) or
lose their connection before the vault sees them; or the vault *applies* the
request and then the reply is lost (``apply-then-status`` with e.g. 504, as when a
gateway times out after the backend committed; ``apply-then-drop``).  A throttle
(``set_throttle``, ``POST /_admin/throttle``, ``--throttle``) answers 429 Throttled
to sign requests beyond a limit per sliding window, as Key Vault's per-vault budget
does.  Every request is logged (method, path, kind, status, time) so tests can count
round trips.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import secrets
import ssl
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.kvserver.tlsca import TLSFiles, make_tls_files
from tests.kvserver.vault import Reply, Vault, error

KEYS_API = "2025-07-01"
VAULT_RESOURCE = "https://vault.azure.net"
DEFAULT_TENANT = "72f988bf-0000-4000-8000-00000000beef"
DEFAULT_CLIENT_ID = "11111111-2222-4333-8444-555555555555"
DEFAULT_SECRET = "kvserver-test-secret"

# Data-plane permission each route needs (RBAC action names, used in 403 bodies).
PERMISSIONS = {
    "keys/create": "Microsoft.KeyVault/vaults/keys/create/action",
    "keys/get": "Microsoft.KeyVault/vaults/keys/read",
    "keys/sign": "Microsoft.KeyVault/vaults/keys/sign/action",
    "certificates/create": "Microsoft.KeyVault/vaults/certificates/create/action",
    "certificates/get": "Microsoft.KeyVault/vaults/certificates/read",
    "certificates/update": "Microsoft.KeyVault/vaults/certificates/update/action",
    "certificates/delete": "Microsoft.KeyVault/vaults/certificates/delete",
    "certificates/purge": "Microsoft.KeyVault/vaults/deletedcertificates/delete",
    "certificates/recover": "Microsoft.KeyVault/vaults/deletedcertificates/recover/action",
}


# Error bodies for injected statuses, as Key Vault and its gateway send them.
FAULT_ERRORS = {
    408: ("RequestTimeout", "The request timed out."),
    429: (
        "Throttled",
        "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
    ),
    500: ("InternalServerError", "The server encountered an internal error."),
    502: ("BadGateway", "The gateway received an invalid response from the service."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable. Please retry."),
    504: ("GatewayTimeout", "The gateway did not receive a response from the service in time."),
    403: ("Forbidden", "Client address is not authorized and caller is not a trusted service."),
}
FAULT_KINDS = ("status", "drop", "apply-then-status", "apply-then-drop")


@dataclass
class FaultRule:
    """A fault for matching requests, ``count`` times (None = always).

    ``status``/``drop`` answer instead of the vault (it never sees the request);
    ``apply-then-status``/``apply-then-drop`` let the vault apply the request and lose its
    reply (counted only when the vault succeeded, so a challenge or refusal is not eaten).
    ``code``/``inner_code``/``message`` override the error body (e.g. a 403 with inner
    code ``ForbiddenByFirewall``).
    """

    kind: str = "status"
    status: int = 429
    retry_after: str | None = None
    count: int | None = 1
    path_contains: str = ""
    method: str = ""
    target: str = "vault"  # "vault" | "token" | "any"
    path_regex: str = ""  # re.search on the path, in addition to path_contains
    skip: int = 0  # let this many matching requests through first (e.g. fail only the second create)
    code: str = ""
    inner_code: str = ""
    message: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} not in {FAULT_KINDS}")

    @property
    def applies_first(self) -> bool:
        return self.kind.startswith("apply-then-")

    def matches(self, method: str, path: str, kind: str) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        if self.target != "any" and self.target != kind:
            return False
        if self.method and self.method.upper() != method:
            return False
        if self.path_regex and not re.search(self.path_regex, path):
            return False
        return self.path_contains in path

    def reply(self) -> Reply:
        code, message = FAULT_ERRORS.get(self.status, ("InternalServerError", "The server encountered an error."))
        status, body, _ = error(self.status, self.code or code, self.message or message, self.inner_code or None)
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
        return status, body, headers


@dataclass
class Faults:
    latency_ms: float = 0.0
    token_latency_ms: float | None = None  # None: same as latency_ms
    rules: list[FaultRule] = field(default_factory=list)


@dataclass
class LoggedRequest:
    method: str
    path: str
    kind: str  # "vault" | "token" | "discovery" | "other"
    status: int
    authorized: bool
    at: float = 0.0  # time.time() when answered


@dataclass
class Throttle:
    """At most ``limit`` accepted sign requests in any ``window_s`` (sliding); the rest get 429 Throttled."""

    limit: int = 0  # 0: off
    window_s: float = 10.0
    retry_after: str | None = None  # real throttled replies often carry none
    accepted: collections.deque[float] = field(default_factory=collections.deque)

    def admit(self, now: float) -> bool:
        if self.limit <= 0:
            return True
        while self.accepted and self.accepted[0] <= now - self.window_s:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            return False
        self.accepted.append(now)
        return True


@dataclass
class Client:
    secret: str
    denied: set[str] = field(default_factory=set)


class KeyVaultTestServer:
    """Owns the vault state, the identity state and the listening socket."""

    def __init__(
        self,
        port: int = 0,
        tls_dir: Path | None = None,
        tenant_id: str = DEFAULT_TENANT,
        token_lifetime: int = 3600,
        self_issue_delay: float = 0.0,
        purge_protection: bool = False,
    ) -> None:
        self._tmp = None if tls_dir else tempfile.TemporaryDirectory(prefix="kvserver-tls-")
        self.tls: TLSFiles = make_tls_files(tls_dir or Path(self._tmp.name))  # type: ignore[union-attr]
        self.tenant_id = tenant_id
        self.token_lifetime = token_lifetime
        self.purge_protection = purge_protection  # kept by reset(); tests may also set vault.purge_protection
        self.vault = Vault(self_issue_delay=self_issue_delay, purge_protection=purge_protection)
        self.clients: dict[str, Client] = {DEFAULT_CLIENT_ID: Client(DEFAULT_SECRET)}
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (client_id, expires_at)
        self.faults = Faults()
        self.throttle = Throttle()
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.kv = self  # type: ignore[attr-defined]
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert, self.tls.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.vault.base = self.url
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> KeyVaultTestServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kvserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # --------------------------------------------------------- conveniences
    @property
    def client_id(self) -> str:
        return DEFAULT_CLIENT_ID

    @property
    def client_secret(self) -> str:
        return self.clients[DEFAULT_CLIENT_ID].secret

    @property
    def ca_bundle(self) -> Path:
        return self.tls.ca_bundle

    def client_env(self) -> dict[str, str]:
        """What a kvpki process needs to reach this server through the real DefaultAzureCredential."""
        return {
            "AZURE_AUTHORITY_HOST": self.url,
            "AZURE_TOKEN_CREDENTIALS": "EnvironmentCredential",  # never fall through to managed identity
            "AZURE_TENANT_ID": self.tenant_id,
            "AZURE_CLIENT_ID": self.client_id,
            "AZURE_CLIENT_SECRET": self.client_secret,
            "KVPKI_AZURE_CA_BUNDLE": str(self.ca_bundle),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def set_faults(
        self, latency_ms: float = 0.0, rules: list[FaultRule] | None = None, token_latency_ms: float | None = None
    ) -> None:
        with self._lock:
            self.faults = Faults(latency_ms, token_latency_ms, list(rules or []))

    def set_throttle(self, limit: int, window_s: float = 10.0, retry_after: str | None = None) -> None:
        """Answer 429 to sign requests beyond ``limit`` per sliding ``window_s`` (0: no throttle)."""
        with self._lock:
            self.throttle = Throttle(limit, window_s, retry_after)

    def _throttled(self, method: str, path: str, authorized: bool) -> bool:
        if method != "POST" or not authorized or not path.rstrip("/").endswith("/sign"):
            return False
        with self._lock:
            return not self.throttle.admit(time.monotonic())

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for entry in self.log if entry.kind == kind)

    def deny(self, permission: str, client_id: str = DEFAULT_CLIENT_ID) -> None:
        """Remove a data-plane permission, e.g. ``"keys/sign"``, to provoke a 403."""
        self.clients[client_id].denied.add(permission)

    def allow_all(self, client_id: str = DEFAULT_CLIENT_ID) -> None:
        self.clients[client_id].denied.clear()

    def reset(self) -> None:
        """Empty vault, default faults, empty log, all permissions: a fresh vault on the same port."""
        with self._lock:
            self.vault = Vault(self_issue_delay=self.vault.self_issue_delay, purge_protection=self.purge_protection)
            self.vault.base = self.url
            self.faults = Faults()
            self.throttle = Throttle()
            self.log.clear()
            self.tokens.clear()
            self.clients = {DEFAULT_CLIENT_ID: Client(DEFAULT_SECRET)}

    def revoke_tokens(self) -> None:
        """Forget every issued token: the next vault call with an old token gets a 401."""
        with self._lock:
            self.tokens.clear()

    # ------------------------------------------------------------- internals
    def _take_fault(self, method: str, path: str, kind: str, applied: bool | None = None) -> FaultRule | None:
        """The first matching rule (and count it); ``applied`` selects apply-then rules after a success."""
        with self._lock:
            for rule in self.faults.rules:
                if applied is None and rule.applies_first:
                    continue
                if applied is not None and (not rule.applies_first or not applied):
                    continue
                if rule.matches(method, path, kind):
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    if rule.count is not None:
                        rule.count -= 1
                    return rule
        return None

    def _latency(self, kind: str) -> float:
        faults = self.faults
        if kind == "token" and faults.token_latency_ms is not None:
            return faults.token_latency_ms / 1000
        return faults.latency_ms / 1000

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def issue_token(self, client_id: str) -> tuple[str, int]:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self.tokens[token] = (client_id, time.time() + self.token_lifetime)
        return token, self.token_lifetime

    def token_client(self, header: str | None) -> str | None:
        if not header or not header.startswith("Bearer "):
            return None
        with self._lock:
            found = self.tokens.get(header[len("Bearer ") :].strip())
        if found is None or found[1] < time.time():
            return None
        return found[0]

    def challenge_header(self) -> str:
        return f'Bearer authorization="{self.url}/{self.tenant_id}", resource="{VAULT_RESOURCE}"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid a 40 ms delayed-ACK stall
    server_version = "kvserver/1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet; requests are recorded in KeyVaultTestServer.log

    @property
    def kv(self) -> KeyVaultTestServer:
        return self.server.kv  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ----------------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(status)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Pragma", "no-cache")
        if body is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Expires", "-1")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    @staticmethod
    def _kind(path: str) -> str:
        parts = path.strip("/").split("/")
        if path.startswith("/_admin"):
            return "admin"
        if parts[0] in ("keys", "certificates", "deletedcertificates", "secrets"):
            return "vault"
        if len(parts) >= 3 and parts[1:3] == ["oauth2", "v2.0"]:
            return "token"
        if "discovery" in parts or ".well-known" in parts:
            return "discovery"
        return "other"

    def _handle(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        kind = self._kind(path)
        body = self._read_body()
        if kind == "admin":
            self._admin(path, body)
            return
        kv = self.kv
        delay = kv._latency(kind)
        if delay:
            time.sleep(delay)
        fault = kv._take_fault(self.command, path, kind)
        authorized = kind == "vault" and kv.token_client(self.headers.get("Authorization")) is not None
        if fault is not None and fault.kind == "drop":
            kv._record(LoggedRequest(self.command, path, kind, 0, authorized, time.time()))
            self._drop()
            return
        if fault is None and kind == "vault" and kv._throttled(self.command, path, authorized):
            fault = FaultRule(status=429, retry_after=kv.throttle.retry_after)
        if fault is not None:
            reply: Reply = fault.reply()
        elif kind == "vault":
            reply = self._vault(path, query, body)
        elif kind == "token":
            reply = self._token(path, body)
        elif kind == "discovery":
            reply = self._discovery(path)
        else:
            reply = error(404, "NotFound", f"no route for {path}")
        if fault is None:
            lost = kv._take_fault(self.command, path, kind, applied=200 <= reply[0] < 300)
            if lost is not None and lost.kind == "apply-then-drop":
                kv._record(LoggedRequest(self.command, path, kind, 0, authorized, time.time()))
                self._drop()
                return
            if lost is not None:
                reply = lost.reply()
        kv._record(LoggedRequest(self.command, path, kind, reply[0], authorized, time.time()))
        self._send(*reply)

    # ---------------------------------------------------------------- vault
    def _vault(self, path: str, query: dict[str, list[str]], raw: bytes) -> Reply:
        kv = self.kv
        client = kv.token_client(self.headers.get("Authorization"))
        if client is None:  # the challenge comes before any body validation
            message = (
                "AKV10000: Request is missing a Bearer, PoP, or MTLS_POP token."
                if not self.headers.get("Authorization")
                else "AKV10022: Invalid audience or expired token."
            )
            status, body, _ = error(401, "Unauthorized", message)
            return status, body, {"WWW-Authenticate": kv.challenge_header()}
        if not query.get("api-version"):
            return error(400, "BadParameter", "The request URI contains an invalid or missing api-version.")
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            return error(400, "BadParameter", "The request body is not valid JSON.")
        if not isinstance(payload, dict):
            return error(400, "BadParameter", "The request body must be a JSON object.")
        route = self._route(self.command, [p for p in path.split("/") if p] + ([""] if path.endswith("/") else []))
        if route is None:
            return error(404, "NotFound", f"no route for {self.command} {path}")
        permission, action = route
        if permission in kv.clients[client].denied:
            return error(
                403,
                "Forbidden",
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments "
                "or role definitions were changed recently, please observe propagation time.\r\n"
                f"Caller: appid={client}\r\nAction: '{PERMISSIONS[permission]}'\r\n"
                f"Resource: '{kv.url}{path}'\r\nAssignment: (not found)\r\n",
                "ForbiddenByRbac",
            )
        return action(payload)  # type: ignore[no-any-return]

    def _route(self, method: str, parts: list[str]) -> tuple[str, Any] | None:
        vault = self.kv.vault
        n = len(parts)
        version = parts[2] if n > 2 and parts[2] else None
        if parts[0] == "keys" and n >= 2:
            name = parts[1]
            if method == "POST" and n == 3 and parts[2] == "create":
                return "keys/create", lambda b: vault.create_key(name, b)
            if method == "POST" and n == 4 and parts[3] == "sign":
                return "keys/sign", lambda b: vault.sign(name, parts[2], b)
            if method == "GET" and n <= 3:
                return "keys/get", lambda b: vault.get_key(name, version)
        if parts[0] == "certificates" and n >= 2:
            name = parts[1]
            tail = parts[2:]
            if method == "POST" and tail == ["create"]:
                return "certificates/create", lambda b: vault.create_certificate(name, b)
            if method == "GET" and tail == ["pending"]:
                return "certificates/get", lambda b: vault.get_pending(name)
            if method == "DELETE" and tail == ["pending"]:
                return "certificates/update", lambda b: vault.cancel_pending(name)
            if method == "POST" and tail == ["pending", "merge"]:
                return "certificates/create", lambda b: vault.merge(name, b)
            if method == "GET" and tail == ["versions"]:
                return "certificates/get", lambda b: vault.list_versions(name)
            if method == "GET" and n <= 3:
                return "certificates/get", lambda b: vault.get_certificate(name, version)
            if method == "PATCH" and n <= 3:
                return "certificates/update", lambda b: vault.update_certificate(name, version, b)
            if method == "DELETE" and n == 2:
                return "certificates/delete", lambda b: vault.delete_certificate(name)
        if parts[0] == "deletedcertificates" and n == 3 and method == "POST" and parts[2] == "recover":
            name = parts[1]
            return "certificates/recover", lambda b: vault.recover_certificate(name)
        if parts[0] == "deletedcertificates" and n == 2:
            name = parts[1]
            if method == "GET":
                return "certificates/get", lambda b: vault.get_deleted_certificate(name)
            if method == "DELETE":
                return "certificates/purge", lambda b: vault.purge_certificate(name)
        return None

    # ------------------------------------------------------------- identity
    def _token(self, path: str, raw: bytes) -> Reply:
        kv = self.kv
        tenant = path.strip("/").split("/")[0]
        form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
        now = int(time.time())
        if tenant != kv.tenant_id:
            return 400, _aad_error("invalid_request", 90002, f"Tenant '{tenant}' not found.", now), {}
        if form.get("grant_type") != "client_credentials":
            return (
                400,
                _aad_error("unsupported_grant_type", 70003, "The app requested an unsupported grant type.", now),
                {},
            )
        client = kv.clients.get(form.get("client_id", ""))
        if client is None:
            return (
                400,
                _aad_error(
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{form.get('client_id')}' was not found.",
                    now,
                ),
                {},
            )
        if not secrets.compare_digest(form.get("client_secret", ""), client.secret):
            return (
                401,
                _aad_error(
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
                    "value, not the client secret ID, for a secret added to app.",
                    now,
                ),
                {},
            )
        scope = form.get("scope", "")
        if f"{VAULT_RESOURCE}/.default" not in scope.split():
            return (
                400,
                _aad_error("invalid_scope", 70011, f"The provided value for scope {scope} is not valid.", now),
                {},
            )
        token, lifetime = kv.issue_token(form["client_id"])
        return (
            200,
            {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token},
            {},
        )

    def _discovery(self, path: str) -> Reply:
        kv = self.kv
        parts = path.strip("/").split("/")
        if parts[:3] == ["common", "discovery", "instance"]:
            host = urllib.parse.urlsplit(kv.url).netloc
            return (
                200,
                {
                    "tenant_discovery_endpoint": f"{kv.url}/{kv.tenant_id}/v2.0/.well-known/openid-configuration",
                    "api-version": "1.1",
                    "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
                },
                {},
            )
        tenant = parts[0]
        if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            if tenant not in (kv.tenant_id, "organizations", "common"):
                return 400, _aad_error("invalid_tenant", 90002, f"Tenant '{tenant}' not found.", int(time.time())), {}
            base = f"{kv.url}/{kv.tenant_id}"
            return (
                200,
                {
                    "token_endpoint": f"{base}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                    "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                    "issuer": f"{base}/v2.0",
                    "jwks_uri": f"{base}/discovery/v2.0/keys",
                    "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                    "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                    "scopes_supported": ["openid", "profile", "email", "offline_access"],
                    "tenant_region_scope": "EU",
                },
                {},
            )
        return error(404, "NotFound", f"no discovery document at {path}")

    # ---------------------------------------------------------------- admin
    def _admin(self, path: str, raw: bytes) -> None:
        kv = self.kv
        if path == "/_admin/faults" and self.command == "POST":
            spec = json.loads(raw or b"{}")
            rules = [FaultRule(**rule) for rule in spec.get("rules", [])]
            kv.set_faults(float(spec.get("latency_ms", 0)), rules, spec.get("token_latency_ms"))
            self._send(200, {"ok": True})
        elif path == "/_admin/throttle" and self.command == "POST":
            spec = json.loads(raw or b"{}")
            kv.set_throttle(int(spec.get("limit", 0)), float(spec.get("window_s", 10.0)), spec.get("retry_after"))
            self._send(200, {"ok": True})
        elif path == "/_admin/log" and self.command == "GET":
            with kv._lock:
                entries = [asdict(e) for e in kv.log]
            self._send(200, {"requests": entries})
        elif path == "/_admin/log" and self.command == "DELETE":
            kv.clear_log()
            self._send(200, {"ok": True})
        elif path == "/_admin/health":
            self._send(200, {"ok": True, "url": kv.url})
        else:
            self._send(404, {"error": "no such admin endpoint"})


def _aad_error(code: str, number: int, text: str, now: int) -> dict[str, Any]:
    return {
        "error": code,
        "error_description": f"AADSTS{number}: {text} Trace ID: 0 Correlation ID: 0 Timestamp: {now}",
        "error_codes": [number],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now)),
        "trace_id": "00000000-0000-0000-0000-000000000000",
        "correlation_id": "00000000-0000-0000-0000-000000000000",
    }
