"""A small HTTPS JSON client for Key Vault calls on the fast path (stdlib only).

Importing azure-core and the Key Vault SDK costs far more than one signature, and
the SDK pays a challenge round trip per fresh process; with a cached token and
key id one ``POST .../sign`` is all a signing process needs.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import threading
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from kvpki_cli import observe
from kvpki_cli.keystores.azure.errors import RETRY_STATUSES, VaultError, parse_error
from kvpki_cli.keystores.azure.retry import Retryable, parse_retry_after

KEYS_API_VERSION = "2025-07-01"


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def error(self) -> VaultError:
        return parse_error(self.status, self.body)

    @property
    def error_code(self) -> str:
        return self.error.most_specific_code

    @property
    def error_message(self) -> str:
        return self.error.message


def _env_cafile() -> str | None:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or None


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """TLS verification against ``ca_bundle``, else the environment's bundle or the system store."""
    return ssl.create_default_context(cafile=ca_bundle or _env_cafile())


_HASH_LINK = re.compile(r"[0-9a-f]{8}\.[0-9]+")


def _has_hash_links(directory: str) -> bool:
    try:
        with os.scandir(directory) as entries:
            return any(_HASH_LINK.fullmatch(entry.name) for entry in entries)
    except OSError:
        return False


class TrustStore:
    """The CA certificates vault connections trust: exactly what ``ssl_context`` loads, found more cheaply.

    Loading the system CA file parses every certificate in it (~25 ms, more than the
    rest of a warm signing process).  With no ``ca_bundle`` and no environment bundle
    (``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE``), ``ssl_context`` trusts the default file
    *and* OpenSSL's default hashed certificate directory; the first handshake uses the
    directory alone (a subset), where OpenSSL reads just the certificates a chain needs.
    If that fails to verify, this process switches to the ``ssl_context`` store and the
    connection is tried once more.  An explicit or environment bundle is used as before.
    """

    def __init__(self, ca_bundle: str | None) -> None:
        self._ca_bundle = ca_bundle
        self._full: ssl.SSLContext | None = None
        self._fast: ssl.SSLContext | None = None
        self._fast_decided = False

    def full(self) -> ssl.SSLContext:
        if self._full is None:
            self._full = ssl_context(self._ca_bundle)
        return self._full

    def fast(self) -> ssl.SSLContext | None:
        """The directory-only context, or None when it does not apply (or already failed)."""
        if not self._fast_decided:
            self._fast_decided = True
            capath = ssl.get_default_verify_paths().capath  # SSL_CERT_DIR, else OpenSSL's default directory
            if not self._ca_bundle and _env_cafile() is None and capath and _has_hash_links(capath):
                self._fast = ssl.create_default_context(capath=capath)
        return self._fast

    def context(self) -> ssl.SSLContext:
        return self.fast() or self.full()

    def demote(self) -> None:
        self._fast = None


def _wire_name(host: str) -> str | bytes:
    """``host`` as the bytes the ``idna`` codec would make of it, when that is a plain ASCII copy.

    ``getaddrinfo`` and ``SSLContext.wrap_socket`` encode a ``str`` host name with the
    ``idna`` codec, whose first use imports encodings.idna, stringprep and unicodedata
    (about 1.5 ms of a signing process).  For an ASCII name with valid label lengths
    the codec returns ``host.encode("ascii")``, so passing those bytes changes nothing;
    anything else stays a ``str`` and takes the codec's path (and errors) as before.
    """
    if host.isascii():
        labels = host.split(".")
        if all(0 < len(label) < 64 for label in labels[:-1]) and len(labels[-1]) < 64:
            return host.encode("ascii")
    return host


def _create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
    host, port = address
    return socket.create_connection((_wire_name(host), port), *args, **kwargs)  # type: ignore[arg-type]


class _HTTPSConnection(http.client.HTTPSConnection):
    """``HTTPSConnection`` that resolves and verifies host names via ``_wire_name``.

    ``tls_host`` is the vault host: the TLS peer both directly and through a proxy tunnel.
    """

    def __init__(self, host: str, port: int, *, timeout: float, trust: TrustStore, tls_host: str) -> None:
        super().__init__(host, port, timeout=timeout, context=trust.context())
        self._create_connection = _create_connection  # TCP to ``host`` (and the CONNECT tunnel)
        self._trust = trust
        self._tls_host = tls_host

    def connect(self) -> None:
        server_hostname = _wire_name(self._tls_host)
        http.client.HTTPConnection.connect(self)
        fast = self._trust.fast()
        if fast is not None:
            try:
                self.sock = fast.wrap_socket(self.sock, server_hostname=server_hostname)
                return
            except ssl.SSLCertVerificationError:
                pass  # not in the directory: once more below with the full store
            self._trust.demote()
            self.sock.close()
            http.client.HTTPConnection.connect(self)
        self.sock = self._trust.full().wrap_socket(self.sock, server_hostname=server_hostname)


class VaultHTTP:
    """Keeps one connection per thread (signing threads share the object); every call is a single attempt
    (retries are the caller's)."""

    def __init__(self, vault_url: str, ca_bundle: str | None) -> None:
        parts = urlsplit(vault_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"vault URL must be https://...: {vault_url}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self._trust = TrustStore(ca_bundle)
        self._local = threading.local()

    @property
    def _conn(self) -> http.client.HTTPSConnection | None:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        return conn

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        conn = self._conn
        if conn is None:
            proxy = _proxy_for(self.host)
            host, port = proxy if proxy is not None else (self.host, self.port)
            conn = _HTTPSConnection(host, port, timeout=timeout, trust=self._trust, tls_host=self.host)
            if proxy is not None:
                conn.set_tunnel(self.host, self.port)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = self._conn
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(
        self, method: str, path: str, token: str | None, body: dict[str, Any] | None, timeout: float
    ) -> Response:
        """One attempt; transient failures raise ``Retryable``, others return the response."""
        data = json.dumps(body).encode() if body is not None else b""
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Content-Length": str(len(data)),
            "User-Agent": "kvpki",
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn = self._connection(timeout)
            conn.request(method, path, body=data, headers=headers)
            raw = conn.getresponse()
            payload = raw.read()
            resp_headers = {k.lower(): v for k, v in raw.getheaders()}
            if raw.will_close:
                self.close()
        except TimeoutError as exc:
            self.close()
            observe.vault_answered(self.host, 0)
            raise Retryable(f"timed out talking to {self.host}") from exc
        except ssl.SSLCertVerificationError:
            self.close()
            raise  # not transient: the caller reports it
        except (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError) as exc:
            self.close()
            observe.vault_answered(self.host, 0)
            raise Retryable(f"connection to {self.host}:{self.port} failed ({type(exc).__name__})") from exc
        try:
            parsed = json.loads(payload) if payload else {}
        except ValueError:
            parsed = {}
        response = Response(raw.status, resp_headers, parsed if isinstance(parsed, dict) else {})
        observe.vault_answered(self.host, raw.status)
        if response.status in RETRY_STATUSES:
            code = response.error_code or http.client.responses.get(response.status, "")
            retry_after = parse_retry_after(resp_headers.get("retry-after"))
            raise Retryable(f"HTTP {response.status} {code}".strip(), retry_after, response.status)
        return response


def _proxy_for(host: str) -> tuple[str, int] | None:
    """HTTPS_PROXY/https_proxy unless NO_PROXY covers ``host`` (kept minimal and dependency-free)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if not proxy:
        return None
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for entry in (item.strip().lstrip(".") for item in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return (parts.hostname or "", parts.port or 8080)


def parse_challenge(header: str | None) -> tuple[str | None, str | None]:
    """(scope, tenant) from a Key Vault ``WWW-Authenticate: Bearer authorization=..., resource=...``."""
    if not header or not header.lower().startswith("bearer"):
        return None, None
    params: dict[str, str] = {}
    for item in header[len("bearer") :].split(","):
        key, _, value = item.strip().partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    scope = params.get("scope") or (params["resource"].rstrip("/") + "/.default" if params.get("resource") else None)
    authorization = params.get("authorization") or params.get("authorization_uri")
    tenant = urlsplit(authorization).path.strip("/").split("/")[0] or None if authorization else None
    return scope, tenant
