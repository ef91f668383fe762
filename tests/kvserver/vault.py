"""In-memory Key Vault data plane: keys and certificates with real private keys.

Pure request -> (status, body, headers) logic, no HTTP; ``server.py`` routes to it.
Response shapes follow the recorded real responses in ``tests/data/kv-recordings``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

Reply = tuple[int, dict[str, Any] | None, dict[str, str]]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
_SIGN_ALGS: dict[str, tuple[str, hashes.HashAlgorithm, str | None]] = {
    "RS256": ("RSA", hashes.SHA256(), "pkcs1"),
    "RS384": ("RSA", hashes.SHA384(), "pkcs1"),
    "RS512": ("RSA", hashes.SHA512(), "pkcs1"),
    "PS256": ("RSA", hashes.SHA256(), "pss"),
    "PS384": ("RSA", hashes.SHA384(), "pss"),
    "PS512": ("RSA", hashes.SHA512(), "pss"),
    "ES256": ("EC", hashes.SHA256(), "P-256"),
    "ES384": ("EC", hashes.SHA384(), "P-384"),
    "ES512": ("EC", hashes.SHA512(), "P-521"),
}
_KEY_USAGE_NAMES = (
    "digitalSignature",
    "nonRepudiation",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _now() -> int:
    return int(time.time())


def error(status: int, code: str, message: str, inner: str | None = None) -> Reply:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if inner:
        body["error"]["innererror"] = {"code": inner}
    return status, body, {}


def _new_version() -> str:
    return uuid.uuid4().hex


@dataclass
class KeyVersion:
    """One key version; certificate-backed keys share the certificate's version id."""

    version: str
    private_key: PrivateKey
    kty: str
    key_ops: list[str]
    exportable: bool = False
    enabled: bool = True
    pending: bool = False
    created: int = field(default_factory=_now)
    updated: int = field(default_factory=_now)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class CertVersion:
    version: str
    key_version: str
    der: bytes | None = None
    enabled: bool = True
    created: int = field(default_factory=_now)
    updated: int = field(default_factory=_now)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class PendingOp:
    version: str
    issuer: str
    csr_der: bytes
    request_id: str
    complete_at: float | None  # Self issuer: when the vault "finishes" issuing


@dataclass
class Certificate:
    name: str
    policy: dict[str, Any]
    policy_created: int
    versions: list[CertVersion] = field(default_factory=list)
    pending: PendingOp | None = None
    deleted_at: int | None = None


class Vault:
    """Thread-safe vault state; ``base`` is the scheme://host:port clients use (ids echo it)."""

    def __init__(self, self_issue_delay: float = 0.0, purge_protection: bool = False) -> None:
        self.base = ""
        self.self_issue_delay = self_issue_delay
        self.purge_protection = purge_protection  # as `az keyvault create --enable-purge-protection true`
        self._lock = threading.RLock()
        self.keys: dict[str, list[KeyVersion]] = {}
        self.certs: dict[str, Certificate] = {}

    # ------------------------------------------------------------------ keys
    def _key_by(self, name: str, version: str | None) -> KeyVersion | None:
        versions = self.keys.get(name)
        if not versions:
            return None
        if version:
            return next((kv for kv in versions if kv.version == version), None)
        visible = [kv for kv in versions if not kv.pending]
        return visible[-1] if visible else None

    def _key_not_found(self, name: str, version: str | None) -> Reply:
        ident = f"{name}/{version}" if version else name
        return error(
            404,
            "KeyNotFound",
            f"A key with (name/id) {ident} was not found in this key vault. If you recently deleted this key you "
            "may be able to recover it using the correct recovery command. For help resolving this issue, "
            "please see https://go.microsoft.com/fwlink/?linkid=2125182",
        )

    def jwk(self, name: str, kv: KeyVersion) -> dict[str, Any]:
        out: dict[str, Any] = {"kid": f"{self.base}/keys/{name}/{kv.version}", "kty": kv.kty, "key_ops": kv.key_ops}
        public = kv.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            out["n"] = b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            out["e"] = b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
        else:
            size = (public.curve.key_size + 7) // 8
            point = public.public_numbers()
            out["crv"] = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[public.curve.name]
            out["x"] = b64url(point.x.to_bytes(size, "big"))
            out["y"] = b64url(point.y.to_bytes(size, "big"))
        return out

    def key_bundle(self, name: str, kv: KeyVersion) -> dict[str, Any]:
        attributes: dict[str, Any] = {"enabled": kv.enabled}
        if isinstance(kv.private_key, rsa.RSAPrivateKey):
            attributes["key_size"] = kv.private_key.key_size
        attributes.update(
            {
                "created": kv.created,
                "updated": kv.updated,
                "recoveryLevel": "CustomizedRecoverable+Purgeable",
                "recoverableDays": 7,
                "exportable": kv.exportable,
                "hsmPlatform": "0",
            }
        )
        body: dict[str, Any] = {"key": self.jwk(name, kv), "attributes": attributes}
        if kv.tags:
            body["tags"] = kv.tags
        return body

    @staticmethod
    def _generate(kty: str, key_size: int | None, crv: str | None) -> PrivateKey | str:
        if kty in ("EC", "EC-HSM"):
            curve = _CURVES.get(crv or "P-256")
            if curve is None:
                return f"The value of the property 'crv' ({crv}) is not supported"
            return ec.generate_private_key(curve)
        if kty in ("RSA", "RSA-HSM"):
            size = key_size or 2048
            if size not in (2048, 3072, 4096):
                return f"The value of the property 'key_size' ({size}) is not supported"
            return rsa.generate_private_key(public_exponent=65537, key_size=size)
        return f"The value of the property 'kty' ({kty}) is not supported"

    def create_key(self, name: str, body: dict[str, Any]) -> Reply:
        kty = body.get("kty")
        if not isinstance(kty, str):
            return error(400, "BadParameter", "Property 'kty' is required")
        with self._lock:
            cert = self.certs.get(name)
            if cert is not None:
                return error(409, "Conflict", f"Key {name} is managed by certificate {name} and cannot be modified")
            generated = self._generate(kty, body.get("key_size"), body.get("crv"))
            if isinstance(generated, str):
                return error(400, "BadParameter", generated)
            attrs = body.get("attributes") or {}
            ops = body.get("key_ops") or (
                ["sign", "verify"]
                if kty.startswith("EC")
                else ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
            )
            kv = KeyVersion(
                _new_version(),
                generated,
                kty,
                list(ops),
                exportable=bool(attrs.get("exportable", False)),
                enabled=bool(attrs.get("enabled", True)),
                tags=dict(body.get("tags") or {}),
            )
            self.keys.setdefault(name, []).append(kv)
            return 200, self.key_bundle(name, kv), {}

    def get_key(self, name: str, version: str | None) -> Reply:
        with self._lock:
            kv = self._key_by(name, version)
            if kv is None or (version is None and name in self.certs and self.certs[name].deleted_at):
                return self._key_not_found(name, version)
            return 200, self.key_bundle(name, kv), {}

    def sign(self, name: str, version: str | None, body: dict[str, Any]) -> Reply:
        alg, value = body.get("alg"), body.get("value")
        if not isinstance(alg, str) or not isinstance(value, str):
            return error(400, "BadParameter", "Properties 'alg' and 'value' are required")
        with self._lock:
            kv = self._key_by(name, version)
            if kv is None:
                return self._key_not_found(name, version)
            if not kv.enabled or kv.pending:
                return error(403, "Forbidden", "Operation sign is not allowed on a disabled key.", "KeyDisabled")
            if "sign" not in kv.key_ops:
                return error(403, "Forbidden", "Operation sign is not permitted on this key.", "KeyOperationForbidden")
            key = kv.private_key
        spec = _SIGN_ALGS.get(alg)
        if spec is None:
            return error(400, "BadParameter", f"Algorithm {alg} is not supported")
        family, hash_alg, detail = spec
        try:
            digest = b64url_decode(value)
        except ValueError:
            return error(400, "BadParameter", "Property 'value' is not valid base64url")
        if len(digest) != hash_alg.digest_size:
            return error(400, "BadParameter", f"Invalid length of 'value': {len(digest)} bytes for {alg}")
        prehashed = utils.Prehashed(hash_alg)
        if family == "RSA" and isinstance(key, rsa.RSAPrivateKey):
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if detail == "pkcs1"
                else padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
            )
            signature = key.sign(digest, pad, prehashed)
        elif family == "EC" and isinstance(key, ec.EllipticCurvePrivateKey):
            size = (key.curve.key_size + 7) // 8
            curve_name = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
            if curve_name != detail:
                return error(400, "BadParameter", f"Algorithm {alg} is not valid for curve {curve_name}")
            r, s = utils.decode_dss_signature(key.sign(digest, ec.ECDSA(prehashed)))
            signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        else:
            return error(400, "BadParameter", f"Algorithm {alg} is not valid for key type {kv.kty}")
        return 200, {"kid": f"{self.base}/keys/{name}/{kv.version}", "value": b64url(signature)}, {}

    # ---------------------------------------------------------- certificates
    def _cert_not_found(self, ident: str) -> Reply:
        return error(
            404,
            "CertificateNotFound",
            f"A certificate with (name/id) {ident} was not found in this key vault. If you recently deleted this "
            "certificate you may be able to recover it using the correct recovery command. For help resolving "
            "this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
        )

    @staticmethod
    def _full_policy(requested: dict[str, Any]) -> dict[str, Any]:
        """Fill in the defaults a real vault adds (see certs-crud.json)."""
        key_props = {"exportable": True, "kty": "RSA", "key_size": 2048, "reuse_key": False}
        key_props.update(requested.get("key_props") or {})
        if str(key_props["kty"]).startswith("EC"):
            key_props.pop("key_size", None)
            key_props.setdefault("crv", "P-256")
        x509_props: dict[str, Any] = {
            "subject": "CN=DefaultPolicy",
            "sans": {},
            "ekus": ["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"],
            "key_usage": ["digitalSignature", "keyEncipherment"],
            "validity_months": 12,
            "basic_constraints": {"ca": False},
        }
        x509_props.update(requested.get("x509_props") or {})
        issuer = requested.get("issuer") or {"name": "Unknown"}
        action = "EmailContacts" if issuer.get("name") == "Unknown" else "AutoRenew"
        return {
            "key_props": key_props,
            "secret_props": requested.get("secret_props") or {"contentType": "application/x-pkcs12"},
            "x509_props": x509_props,
            "lifetime_actions": requested.get("lifetime_actions")
            or [{"trigger": {"lifetime_percentage": 80}, "action": {"action_type": action}}],
            "issuer": issuer,
        }

    def _policy_json(self, cert: Certificate) -> dict[str, Any]:
        policy = dict(cert.policy)
        policy["id"] = f"{self.base}/certificates/{cert.name}/policy"
        policy["attributes"] = {"enabled": True, "created": cert.policy_created, "updated": cert.policy_created}
        order = ["id", "key_props", "secret_props", "x509_props", "lifetime_actions", "issuer", "attributes"]
        return {k: policy[k] for k in order if k in policy}

    def _bundle(self, cert: Certificate, cv: CertVersion) -> dict[str, Any]:
        assert cv.der is not None
        parsed = x509.load_der_x509_certificate(cv.der)
        body: dict[str, Any] = {
            "id": f"{self.base}/certificates/{cert.name}/{cv.version}",
            "kid": f"{self.base}/keys/{cert.name}/{cv.key_version}",
            "sid": f"{self.base}/secrets/{cert.name}/{cv.version}",
            "x5t": b64url(hashlib.sha1(cv.der).digest()),
            "cer": base64.b64encode(cv.der).decode(),
            "attributes": {
                "enabled": cv.enabled,
                "nbf": int(parsed.not_valid_before_utc.timestamp()),
                "exp": int(parsed.not_valid_after_utc.timestamp()),
                "created": cv.created,
                "updated": cv.updated,
                "recoveryLevel": "Recoverable" if self.purge_protection else "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }
        if cv.tags:
            body["tags"] = cv.tags
        body["policy"] = self._policy_json(cert)
        body["pending"] = {"id": f"{self.base}/certificates/{cert.name}/pending"}
        return body

    def _operation(self, cert: Certificate, just_created: bool = False) -> dict[str, Any]:
        op = cert.pending
        assert op is not None
        body: dict[str, Any] = {
            "id": f"{self.base}/certificates/{cert.name}/pending",
            "issuer": {"name": op.issuer},
            "csr": base64.b64encode(op.csr_der).decode(),
            "cancellation_requested": False,
        }
        if not just_created and op.complete_at is not None and time.time() >= op.complete_at:
            body["status"] = "completed"
            body["target"] = f"{self.base}/certificates/{cert.name}"
        else:
            body["status"] = "inProgress"
            body["status_details"] = (
                "Pending certificate created. Please Perform Merge to complete the request."
                if op.issuer == "Unknown"
                else "Pending certificate created. Certificate request is in progress. This may take some time "
                "based on the issuer provider. Please check again later."
            )
        body["request_id"] = op.request_id
        return body

    def _latest(self, cert: Certificate) -> CertVersion | None:
        self._complete_due(cert)
        done = [cv for cv in cert.versions if cv.der is not None]
        return done[-1] if done else None

    def _complete_due(self, cert: Certificate) -> None:
        """Finish a Self-issued request once its (simulated) issuance time has passed."""
        op = cert.pending
        if op is None or op.complete_at is None or time.time() < op.complete_at:
            return
        cv = next(cv for cv in cert.versions if cv.version == op.version)
        if cv.der is None:
            kv = self._key_by(cert.name, cv.key_version)
            assert kv is not None
            cv.der = _self_signed(kv.private_key, cert.policy).public_bytes(serialization.Encoding.DER)
            kv.pending = False

    def _live(self, name: str) -> Certificate | None:
        cert = self.certs.get(name)
        return cert if cert is not None and cert.deleted_at is None else None

    def create_certificate(self, name: str, body: dict[str, Any]) -> Reply:
        requested = body.get("policy")
        if not isinstance(requested, dict):
            return error(400, "BadParameter", "Property 'policy' is required")
        policy = self._full_policy(requested)
        issuer = str(policy["issuer"].get("name", "Unknown"))
        if issuer not in ("Self", "Unknown"):
            return error(400, "BadParameter", f"Issuer {issuer} is not configured in this vault")
        with self._lock:
            cert = self.certs.get(name)
            if cert is not None and cert.deleted_at is not None:
                return error(
                    409,
                    "Conflict",
                    f"Certificate {name} is currently in a deleted but recoverable state, and its name cannot be "
                    "reused; in this state, the certificate can only be recovered or purged.",
                    "ObjectIsDeletedButRecoverable",
                )
            if cert is not None and cert.pending is not None and self._operation(cert)["status"] == "inProgress":
                return error(
                    409, "Conflict", f"There is a pending operation on certificate {name}", "PendingOperationExists"
                )
            if name in self.keys and cert is None:
                return error(409, "Conflict", f"A key named {name} already exists and is not managed by a certificate")
            kp = policy["key_props"]
            previous = self._key_by(name, None) if cert is not None and kp.get("reuse_key") else None
            if previous is not None:
                private_key: PrivateKey = previous.private_key
            else:
                generated = self._generate(str(kp["kty"]), kp.get("key_size"), kp.get("crv"))
                if isinstance(generated, str):
                    return error(400, "BadParameter", generated)
                private_key = generated
            if cert is None:
                cert = Certificate(name, policy, _now())
                self.certs[name] = cert
            else:
                cert.policy = policy
            version = _new_version()
            kty = str(kp["kty"])
            ops = (
                ["sign", "verify"]
                if kty.startswith("EC")
                else ["sign", "verify", "wrapKey", "unwrapKey", "encrypt", "decrypt"]
            )
            self.keys.setdefault(name, []).append(
                KeyVersion(version, private_key, kty, ops, exportable=bool(kp.get("exportable")), pending=True)
            )
            cert.versions.append(CertVersion(version, version, tags=dict(body.get("tags") or {})))
            cert.pending = PendingOp(
                version,
                issuer,
                _csr(private_key, policy).public_bytes(serialization.Encoding.DER),
                uuid.uuid4().hex,
                time.time() + self.self_issue_delay if issuer == "Self" else None,
            )
            headers = {
                "Location": f"{self.base}/certificates/{name}/pending?api-version=2026-04-01",
                "Retry-After": "10",
            }
            return 202, self._operation(cert, just_created=True), headers

    def get_pending(self, name: str) -> Reply:
        with self._lock:
            cert = self._live(name)
            if cert is None or cert.pending is None:
                return error(404, "PendingCertificateNotFound", f"Pending certificate not found: {name}")
            self._complete_due(cert)
            op = self._operation(cert)
            headers = {"Retry-After": "10"} if op["status"] == "inProgress" else {}
            return 200, op, headers

    def merge(self, name: str, body: dict[str, Any]) -> Reply:
        x5c = body.get("x5c")
        if not isinstance(x5c, list) or not x5c:
            return error(400, "BadParameter", "Property 'x5c' is required")
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(item, validate=True)) for item in x5c]
        except ValueError:
            return error(400, "BadParameter", "Merge certificate content must be DER/PEM X.509 certificates (x5c)")
        with self._lock:
            cert = self._live(name)
            if cert is None or cert.pending is None or cert.pending.issuer != "Unknown":
                return error(403, "Forbidden", f"Pending certificate not found or not mergeable: {name}")
            op = cert.pending
            kv = self._key_by(name, op.version)
            assert kv is not None
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if chain[0].public_key().public_bytes(
                serialization.Encoding.DER, spki
            ) != kv.private_key.public_key().public_bytes(serialization.Encoding.DER, spki):
                return error(
                    400, "BadParameter", "Public key from x509 certificate and key of this instance doesn't match"
                )
            cv = next(cv for cv in cert.versions if cv.version == op.version)
            cv.der = chain[0].public_bytes(serialization.Encoding.DER)
            cv.created = cv.updated = _now()
            if isinstance(body.get("tags"), dict):
                cv.tags = dict(body["tags"])
            kv.pending = False
            cert.pending = None
            return (
                201,
                self._bundle(cert, cv),
                {"Location": f"{self.base}/certificates/{name}/pending?api-version=2026-04-01"},
            )

    def get_certificate(self, name: str, version: str | None) -> Reply:
        with self._lock:
            cert = self._live(name)
            if cert is None:
                return self._cert_not_found(name)
            if version:
                self._complete_due(cert)
                cv = next((c for c in cert.versions if c.version == version and c.der is not None), None)
                if cv is None:
                    return self._cert_not_found(f"{name}/versions/{version}")
            else:
                cv = self._latest(cert)
                if cv is None:
                    return self._cert_not_found(name)
            return 200, self._bundle(cert, cv), {}

    def list_versions(self, name: str) -> Reply:
        with self._lock:
            cert = self._live(name)
            if cert is None:
                return self._cert_not_found(name)
            self._complete_due(cert)
            items = []
            for cv in cert.versions:
                if cv.der is None:
                    continue
                full = self._bundle(cert, cv)
                item = {k: full[k] for k in ("id", "x5t", "attributes")}
                if cv.tags:
                    item["tags"] = cv.tags
                items.append(item)
            return 200, {"value": items, "nextLink": None}, {}

    def update_certificate(self, name: str, version: str | None, body: dict[str, Any]) -> Reply:
        with self._lock:
            cert = self._live(name)
            if cert is None:
                return self._cert_not_found(name)
            cv = (
                next((c for c in cert.versions if c.version == version and c.der is not None), None)
                if version
                else self._latest(cert)
            )
            if cv is None:
                return self._cert_not_found(f"{name}/versions/{version}")
            attrs = body.get("attributes") or {}
            if "enabled" in attrs:
                cv.enabled = bool(attrs["enabled"])
                kv = self._key_by(name, cv.key_version)
                if kv is not None:
                    kv.enabled = cv.enabled
                    kv.updated = _now()
            if "tags" in body:
                cv.tags = dict(body.get("tags") or {})
            cv.updated = _now()
            return 200, self._bundle(cert, cv), {}

    def delete_certificate(self, name: str) -> Reply:
        with self._lock:
            cert = self._live(name)
            if cert is None:
                return self._cert_not_found(name)
            cert.deleted_at = _now()
            latest = self._latest(cert)
            body: dict[str, Any] = {
                "recoveryId": f"{self.base}/deletedcertificates/{name}",
                "deletedDate": cert.deleted_at,
                "scheduledPurgeDate": cert.deleted_at + 90 * 86400,
            }
            if latest is not None:
                body.update(self._bundle(cert, latest))
            else:
                body["id"] = f"{self.base}/certificates/{name}"
            return 200, body, {}

    def cancel_pending(self, name: str) -> Reply:
        with self._lock:
            cert = self._live(name)
            if cert is None or cert.pending is None:
                return error(404, "PendingCertificateNotFound", f"Pending certificate not found: {name}")
            op = self._operation(cert)
            version = cert.pending.version
            cert.pending = None
            cert.versions = [cv for cv in cert.versions if cv.version != version]
            self.keys[name] = [kv for kv in self.keys.get(name, []) if kv.version != version]
            return 200, op, {}

    def purge_certificate(self, name: str) -> Reply:
        with self._lock:
            cert = self.certs.get(name)
            if cert is None or cert.deleted_at is None:
                return error(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")
            if self.purge_protection:
                return error(
                    403,
                    "Forbidden",
                    'Operation "purge" is not allowed because purge protection is enabled for this vault. Key Vault '
                    "service will automatically purge it after the retention period has passed.",
                )
            del self.certs[name]
            self.keys.pop(name, None)
            return 204, None, {}

    def recover_certificate(self, name: str) -> Reply:
        with self._lock:
            cert = self.certs.get(name)
            if cert is None or cert.deleted_at is None:
                return error(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")
            cert.deleted_at = None
            latest = self._latest(cert)
            if latest is None:
                return 200, {"id": f"{self.base}/certificates/{name}"}, {}
            return 200, self._bundle(cert, latest), {}

    def get_deleted_certificate(self, name: str) -> Reply:
        with self._lock:
            cert = self.certs.get(name)
            if cert is None or cert.deleted_at is None:
                return error(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")
            latest = self._latest(cert)
            body: dict[str, Any] = {
                "recoveryId": f"{self.base}/deletedcertificates/{name}",
                "deletedDate": cert.deleted_at,
                "scheduledPurgeDate": cert.deleted_at + 90 * 86400,
            }
            if latest is not None:
                body.update(self._bundle(cert, latest))
            return 200, body, {}


def _subject(policy: dict[str, Any]) -> x509.Name:
    subject = str(policy["x509_props"].get("subject") or "CN=DefaultPolicy")
    try:
        return x509.Name.from_rfc4514_string(subject)
    except ValueError:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _csr(key: PrivateKey, policy: dict[str, Any]) -> x509.CertificateSigningRequest:
    return x509.CertificateSigningRequestBuilder().subject_name(_subject(policy)).sign(key, _hash_for(key))


def _self_signed(key: PrivateKey, policy: dict[str, Any]) -> x509.Certificate:
    """What the vault's Self issuer produces: a certificate from the policy's x509_props."""
    props = policy["x509_props"]
    now = datetime.datetime.now(datetime.UTC)
    months = int(props.get("validity_months") or 12)
    name = _subject(policy)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + datetime.timedelta(days=30 * months))
    )
    usages = set(props.get("key_usage") or [])
    if usages:
        flags = {n: n in usages for n in _KEY_USAGE_NAMES}
        builder = builder.add_extension(
            x509.KeyUsage(
                flags["digitalSignature"],
                flags["nonRepudiation"],
                flags["keyEncipherment"],
                flags["dataEncipherment"],
                flags["keyAgreement"],
                flags["keyCertSign"],
                flags["cRLSign"],
                flags["encipherOnly"] and flags["keyAgreement"],
                flags["decipherOnly"] and flags["keyAgreement"],
            ),
            critical=True,
        )
    ekus = [x509.ObjectIdentifier(o) for o in props.get("ekus") or []]
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    basic = props.get("basic_constraints") or {}
    if basic.get("ca"):
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, _hash_for(key))
