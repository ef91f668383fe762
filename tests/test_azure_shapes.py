"""The Key Vault test server answers in the shapes of real Key Vault responses.

Each test replays requests from a recording in ``tests/data/kv-recordings`` (real
vault exchanges published by the Azure SDK) against ``tests/kvserver`` and
compares status codes, JSON key structure and the headers clients depend on.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import re
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.kvserver.server import KeyVaultTestServer

RECORDINGS = Path(__file__).parent / "data" / "kv-recordings"
CHALLENGE = re.compile(r'^Bearer authorization="https://[^"/]+/[^"/]+", resource="https://vault\.azure\.net"$')


def recording(name: str) -> list[dict[str, Any]]:
    return json.loads((RECORDINGS / name).read_text(encoding="utf-8"))["Entries"]  # type: ignore[no-any-return]


def shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys (recursively), list element shape, scalar type."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else "str"


class Client:
    """Raw HTTPS to the test server (no SDK), so we see exactly what it sends."""

    def __init__(self, server: KeyVaultTestServer) -> None:
        self.server = server
        self.context = ssl.create_default_context(cafile=str(server.ca_bundle))
        self.token = self._token()

    def _token(self) -> str:
        form = urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": self.server.client_id,
                "client_secret": self.server.client_secret,
                "scope": "https://vault.azure.net/.default",
            }
        )
        status, _, body = self.send(
            "POST",
            f"/{self.server.tenant_id}/oauth2/v2.0/token",
            form.encode(),
            auth=False,
            content_type="application/x-www-form-urlencoded",
        )
        assert status == 200, body
        return str(body["access_token"])

    def send(
        self, method: str, path: str, body: Any = None, *, auth: bool = True, content_type: str = "application/json"
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.server.port, context=self.context, timeout=10)
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        headers = {"Content-Type": content_type, "Content-Length": str(len(data))}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else None

    def replay(self, entry: dict[str, Any], body: Any = "recorded") -> tuple[int, dict[str, str], Any]:
        url = urllib.parse.urlsplit(entry["RequestUri"])
        path = f"{url.path}?{url.query}"
        unauthenticated = "Authorization" not in entry["RequestHeaders"] and entry["StatusCode"] == 401
        sent = entry.get("RequestBody") if body == "recorded" else body
        return self.send(entry["RequestMethod"], path, None if unauthenticated else sent, auth=not unauthenticated)


def assert_like(entry: dict[str, Any], status: int, headers: dict[str, str], body: Any) -> None:
    """Same status, same JSON structure, same presence of the headers clients read."""
    assert status == entry["StatusCode"], (entry["RequestUri"], body)
    assert shape(body) == shape(entry["ResponseBody"]), entry["RequestUri"]
    recorded = entry["ResponseHeaders"]
    assert headers.get("Content-Type") == recorded.get("Content-Type")
    for name in ("Retry-After", "Location", "WWW-Authenticate"):
        assert (name in headers) == (name in recorded), (name, entry["RequestUri"])
    if "WWW-Authenticate" in recorded:
        assert CHALLENGE.match(recorded["WWW-Authenticate"])
        assert CHALLENGE.match(headers["WWW-Authenticate"])


@pytest.fixture
def client(kv: KeyVaultTestServer) -> Client:
    return Client(kv)


def test_recordings_are_byte_exact_copies() -> None:
    shared = Path("/work/shared/kv-recordings")
    if not shared.is_dir():
        pytest.skip("the shared recordings are not on this machine (CI uses the committed copies)")
    for path in sorted(RECORDINGS.glob("*.json")):
        assert path.read_bytes() == (shared / path.name).read_bytes(), path.name


@pytest.mark.parametrize("curve_entries", [(0, 1, 2), (7, 8)], ids=["P-256", "P-384"])
def test_keys_challenge_create_sign_ec(client: Client, curve_entries: tuple[int, ...]) -> None:
    entries = recording("keys-ec-create-sign.json")
    if curve_entries[0] == 0:
        assert_like(entries[0], *client.replay(entries[0]))  # 401 challenge before body validation
    create, sign = entries[curve_entries[-2]], entries[curve_entries[-1]]
    status, headers, body = client.replay(create)
    assert_like(create, status, headers, body)
    kid_path = urllib.parse.urlsplit(body["key"]["kid"]).path
    recorded_sign = dict(sign, RequestUri=f"https://x{kid_path}/sign?api-version=2025-07-01")
    status, headers, signed = client.replay(recorded_sign)
    assert_like(sign, status, headers, signed)
    raw = base64.urlsafe_b64decode(signed["value"] + "==")
    recorded_raw = base64.urlsafe_b64decode(sign["ResponseBody"]["value"] + "==")
    assert len(raw) == len(recorded_raw)  # raw r||s, fixed length, like the real vault
    assert signed["kid"] == body["key"]["kid"]


def test_keys_rsa_sign_and_bundle(client: Client) -> None:
    entries = recording("keys-rsa-sign-verify.json")
    assert_like(entries[0], *client.replay(entries[0]))  # PUT challenge
    status, headers, body = client.send(
        "POST", "/keys/rsa1/create?api-version=2025-07-01", {"kty": "RSA", "key_size": 2048}
    )
    recorded_bundle = entries[1]
    assert status == 200
    assert shape(body["attributes"]) == shape(recorded_bundle["ResponseBody"]["attributes"])
    assert set(body["key"]) == set(recorded_bundle["ResponseBody"]["key"])
    sign = entries[2]
    path = urllib.parse.urlsplit(body["key"]["kid"]).path
    status, headers, signed = client.send("POST", f"{path}/sign?api-version=2025-07-01", sign["RequestBody"])
    assert_like(sign, status, headers, signed)


def test_certs_crud(client: Client, kv: KeyVaultTestServer) -> None:
    entries = recording("certs-crud.json")
    kv.vault.self_issue_delay = 0.4  # a real vault takes a moment: first poll sees inProgress
    for entry in entries[:2]:
        assert_like(entry, *client.replay(entry))
    assert_like(entries[2], *client.replay(entries[2]))  # pending, inProgress, Retry-After
    time.sleep(0.5)
    for entry in entries[3:9]:  # pending completed, get, pending, get, PATCH tags, DELETE (soft)
        assert_like(entry, *client.replay(entry))
    assert_like(entries[10], *client.replay(entries[10]))  # deleted certificate (entry 9: deletion in progress)
    status, headers, body = client.replay(entries[11])
    assert_like(entries[11], status, headers, body)
    # Re-creating a soft-deleted name is a conflict, as on a real vault.
    status, _, body = client.replay(entries[1])
    assert status == 409
    assert body["error"]["innererror"]["code"] == "ObjectIsDeletedButRecoverable"


def test_certs_pending_csr(client: Client, kv: KeyVaultTestServer) -> None:
    entries = recording("certs-pending-csr.json")
    kv.vault.self_issue_delay = 0.4
    for entry in entries[:3]:
        assert_like(entry, *client.replay(entry))
    time.sleep(0.5)
    for entry in entries[3:]:
        assert_like(entry, *client.replay(entry))
    _, _, op = client.replay(entries[3])
    csr = x509.load_der_x509_csr(base64.b64decode(op["csr"]))
    assert csr.is_signature_valid


def test_certs_merge(client: Client) -> None:
    entries = recording("certs-merge.json")
    for entry in entries[:3]:  # challenge, create (Unknown issuer), pending
        assert_like(entry, *client.replay(entry))
    _, _, op = client.replay(entries[2])
    csr = x509.load_der_x509_csr(base64.b64decode(op["csr"]))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throwaway test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer)
        .public_key(csr.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(minutes=1))
        .sign(ca_key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    status, headers, body = client.replay(entries[3], body={"x5c": [base64.b64encode(der).decode()]})
    assert_like(entries[3], status, headers, body)
    assert base64.b64decode(body["cer"]) == der


def test_certs_404(client: Client) -> None:
    entries = recording("certs-404.json")
    for entry in entries:
        assert_like(entry, *client.replay(entry))
    _, _, body = client.replay(entries[1])
    assert body["error"]["code"] == entries[1]["ResponseBody"]["error"]["code"] == "CertificateNotFound"


def test_challenge_comes_before_body_validation(client: Client) -> None:
    status, headers, body = client.send("POST", "/keys/x/create?api-version=2025-07-01", b"not json", auth=False)
    assert status == 401 and CHALLENGE.match(headers["WWW-Authenticate"])
    assert body["error"]["code"] == "Unauthorized"
    client.token = "forged"
    status, _, _ = client.send("GET", "/keys/x/?api-version=2025-07-01")
    assert status == 401  # only tokens the server issued are accepted
