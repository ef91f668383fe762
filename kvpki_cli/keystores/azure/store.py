"""``AzureKeyStore``: a non-exportable CA key next to a Key Vault certificate.

init-ca (``create_key`` + ``store_chain``, driven by ``initca``): a Self-issued
certificate version gives a completed, signing-capable key; a second version with
issuer Unknown and ``reuse_key`` keeps that key pending; kvpki's core builds the
real CA certificate (self-signed with the completed version's key, or by a parent
CA), we merge it with its chain and disable the temporary version.  A failure
leaves the half-built CA in the vault for the same init-ca to continue from.

Signing processes read the chain, key id and token from disk caches and make a
single ``sign`` request; the Azure SDK is imported only on cold caches and init.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from kvpki_cli.errors import AlreadyExists, BackendError, KvpkiError, NotFound, UsageError
from kvpki_cli.fileutil import write_file_atomic
from kvpki_cli.keystores.azure.auth import DEFAULT_SCOPE, CachingCredential
from kvpki_cli.keystores.azure.cache import CachedCA, ChainCache, TokenCache, install_id, spki_b64
from kvpki_cli.keystores.azure.fastsign import VaultSignClient
from kvpki_cli.keystores.azure.governor import SignBudget, default_jobs, default_rate, governor_for
from kvpki_cli.keystores.azure.http import VaultHTTP
from kvpki_cli.keystores.azure.retry import RetryPolicy
from kvpki_cli.keystores.azure.signer import vault_private_key
from kvpki_cli.keystores.base import CAPrivateKey, CAPublicKey, KeyStore, KeyType
from kvpki_cli.messages import warn
from kvpki_cli.pki.lean import Encoding, PublicFormat

if TYPE_CHECKING:
    from azure.keyvault.certificates import KeyVaultCertificate

    from kvpki_cli.keystores.azure.initca import InitCA, Ready
    from kvpki_cli.keystores.azure.nextkey import NextKey
    from kvpki_cli.keystores.azure.sdk import VaultCertificates

CA_BUNDLE_ENV = "KVPKI_AZURE_CA_BUNDLE"
DEADLINE_ENV = "KVPKI_AZURE_DEADLINE"
GENERATIONS_FILE = "generations.json"  # key generation -> certificate version, key id, chain (after a rollover)
SPKI = PublicFormat.SubjectPublicKeyInfo
DER = Encoding.DER
PEM = Encoding.PEM


def key_name_for(ca_name: str) -> str:
    """Key Vault object names allow only [0-9a-zA-Z-], 1-127 characters."""
    name = re.sub(r"[^0-9a-zA-Z-]+", "-", ca_name).strip("-")[:127]
    return name or "kvpki-ca"


def _check_vault_url(vault_url: str) -> None:
    """``https://HOST[:PORT]`` and nothing else: a bad port or host is a usage error, not a crash
    or thirty seconds of connection retries."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(vault_url)
        port = parts.port
    except ValueError:
        port, parts = -1, None
    host = parts.hostname if parts is not None else None
    if (
        parts is None
        or port == -1
        or port == 0
        or not host
        or not re.fullmatch(r"[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45}", host)
        or parts.username is not None
        or parts.path
        or parts.query
        or parts.fragment
    ):
        raise UsageError(f"vault_url {vault_url!r} is not a Key Vault URL (https://NAME.vault.azure.net)")


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_seconds(value: Any, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"azure store setting {what} must be a number of seconds, got {value!r}") from None
    if not 0 < seconds < 1e6:  # also NaN and inf (float() takes "nan" and "inf" from KVPKI_AZURE_DEADLINE)
        raise UsageError(f"azure store setting {what} must be a positive number of seconds, got {value!r}")
    return seconds


def _as_rate(value: Any) -> float | None:
    if value is None:
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = 0.0
    if not 0.01 <= rate < 1e6:  # as config.MIN_SIGN_RATE: slower would sleep beyond time.sleep's range
        raise UsageError(
            f"azure store setting sign_rate must be from 0.01 to 1e6 signatures per second, got {value!r}"
        )
    return rate


class AzureSettings(NamedTuple):
    vault_url: str
    key_name: str
    hsm: bool
    ca_bundle: str | None
    deadline: float  # overall retry deadline per vault operation
    cache_ttl: float  # how long a cached chain/key id is trusted without asking the vault
    create_timeout: float  # how long init-ca waits for the vault to issue the temporary certificate
    sign_rate: float | None = None  # signatures/s this process may ask of the vault (None: from the key type)

    @classmethod
    def from_mapping(cls, ca_name: str, settings: Mapping[str, Any]) -> AzureSettings:
        vault_url = str(settings.get("vault_url") or "").strip().rstrip("/")
        if not vault_url:
            raise UsageError(
                f"CA {ca_name!r} uses the azure store but has no vault_url "
                "(kvpki init-ca --store azure --vault-url https://NAME.vault.azure.net)"
            )
        if not vault_url.lower().startswith("https://"):
            raise UsageError(f"vault_url must start with https:// (got {vault_url})")
        _check_vault_url(vault_url)
        key_name = str(settings.get("key_name") or key_name_for(ca_name))
        if not re.fullmatch(r"[0-9a-zA-Z-]{1,127}", key_name):
            raise UsageError(f"key_name {key_name!r} is not a valid Key Vault name ([0-9a-zA-Z-], 1-127 chars)")
        ca_bundle = os.environ.get(CA_BUNDLE_ENV) or settings.get("ca_bundle") or None
        if ca_bundle and not Path(str(ca_bundle)).expanduser().is_file():
            raise UsageError(f"CA bundle {ca_bundle} does not exist")
        return cls(
            vault_url=vault_url,
            key_name=key_name,
            hsm=_as_bool(settings.get("hsm", False)),
            ca_bundle=str(Path(str(ca_bundle)).expanduser()) if ca_bundle else None,
            deadline=_as_seconds(os.environ.get(DEADLINE_ENV) or settings.get("deadline", 30), "deadline"),
            cache_ttl=_as_seconds(settings.get("cache_ttl", 3600), "cache_ttl"),
            create_timeout=_as_seconds(settings.get("create_timeout", 120), "create_timeout"),
            sign_rate=_as_rate(settings.get("sign_rate")),
        )


def _links_verify(chain: Sequence[x509.Certificate]) -> bool:
    """Each certificate is signed by the next one (the saved issuers really issued the vault's certificate)."""
    try:
        for child, parent in itertools.pairwise(chain):
            child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _version(cert: KeyVaultCertificate) -> str | None:
    return cert.properties.version if cert.properties is not None else None


class _PendingCA(NamedTuple):
    """State between create_key and store_chain (one init-ca process)."""

    kid: str  # the completed Self-issued version's key: it signs a root
    public_key: CAPublicKey


class _Pinned(NamedTuple):
    """One generation's key version and the token scope that signs with it."""

    kid: str
    scope: str | None
    tenant: str | None


class AzureKeyStore(KeyStore):
    """One CA in one vault: certificate object ``key_name`` and its key."""

    def __init__(self, ca_name: str, settings: Mapping[str, Any], home: Path) -> None:
        self.ca_name = ca_name
        self.settings = AzureSettings.from_mapping(ca_name, settings)
        self.home = home
        directory = settings.get("directory")
        self.directory = Path(directory).expanduser() if directory else home / "cas" / ca_name
        self.chain_path = self.directory / "chain.pem"
        self.retry = RetryPolicy(deadline=self.settings.deadline)
        self.credential = CachingCredential(TokenCache(home), self.settings.ca_bundle)
        self.chain_cache = ChainCache(home, self.settings.vault_url, self.settings.key_name)
        self._http: VaultHTTP | None = None
        self._sdk: VaultCertificates | None = None
        self._pending: _PendingCA | None = None
        self._active: CachedCA | None = None
        self._init: InitCA | None = None
        self._init_lock_fd: int | None = None
        self._next: tuple[int, Ready, NextKey] | None = None  # a rollover's pending generation
        self.generations_path = self.directory / GENERATIONS_FILE
        self.merging_path = self.directory / "generation-merging.json"
        self._sign_clients: dict[str, VaultSignClient] = {}
        self._budget: SignBudget | None = None

    # ------------------------------------------------------------ helpers
    @property
    def name(self) -> str:
        return self.settings.key_name

    def _certs(self) -> VaultCertificates:
        if self._sdk is None:
            from kvpki_cli.keystores.azure.sdk import VaultCertificates

            self._sdk = VaultCertificates(self.settings.vault_url, self.credential, self.settings.ca_bundle, self.retry)
        return self._sdk

    def _initca(self) -> InitCA:
        if self._init is None:
            from kvpki_cli.keystores.azure.initca import InitCA

            self._init = InitCA(
                self._certs(),
                self.ca_name,
                self.name,
                self.settings.deadline,
                self.settings.create_timeout,
                home_id=install_id(self.home),
            )
        return self._init

    def _vault_http(self) -> VaultHTTP:
        if self._http is None:
            self._http = VaultHTTP(self.settings.vault_url, self.settings.ca_bundle)
        return self._http

    def _cached_ca(self) -> CachedCA:
        """The CA's chain and key id: memory, then disk cache, then the vault (SDK)."""
        if self._active is None:
            self._active = self.chain_cache.load(self.settings.cache_ttl) or self._reload()
        return self._active

    def _reload(self) -> CachedCA:
        cert = self._certs().get(self.name)
        version = _version(cert) if cert is not None else None
        if cert is None or not cert.cer or not cert.key_id or not version:
            raise NotFound(
                f"CA {self.ca_name!r} has no certificate {self.name!r} in {self.settings.vault_url} "
                f"(run 'kvpki init-ca --name {self.ca_name} --store azure')"
            )
        leaf = x509.load_der_x509_certificate(bytes(cert.cer))
        chain = self._with_issuers(leaf)
        cached = CachedCA(
            key_spki=spki_b64(leaf.public_key()),
            vault_url=self.settings.vault_url,
            cert_name=self.name,
            cert_version=version,
            kid=cert.key_id,
            chain_pem=[c.public_bytes(PEM).decode() for c in chain],
            scope=self.credential.last_scope or DEFAULT_SCOPE,
            tenant=self.credential.last_tenant,
            fetched_at=time.time(),
        )
        self.chain_cache.save(cached)
        return cached

    def _with_issuers(self, leaf: x509.Certificate) -> list[x509.Certificate]:
        """The vault returns only the CA certificate; its issuers come from the chain saved at init-ca."""
        try:
            saved = x509.load_pem_x509_certificates(self.chain_path.read_bytes())
        except (OSError, ValueError):
            saved = []
        if saved and saved[0] == leaf and _links_verify(saved):
            return saved
        if leaf.issuer == leaf.subject:
            return [leaf]
        if len(saved) > 1 and saved[1].subject == leaf.issuer and _links_verify([leaf, *saved[1:]]):
            return [leaf, *saved[1:]]
        warn(f"issuer chain of CA {self.ca_name!r} is unknown ({self.chain_path} missing or stale)")
        return [leaf]

    def _stale_key(self) -> None:
        self.chain_cache.clear()
        self._active = None

    # ----------------------------------------------------------- interface
    def exists(self) -> bool:
        """True for a CA this home already knows (warm cache, no request); False for an empty name or for
        this CA's own half-built state, which ``create_key`` continues.  Anything else the vault holds
        under the name (another CA, a CA certificate merged by another installation, a foreign pending
        operation) raises ``AlreadyExists`` with one line naming that state.
        """
        if self.chain_cache.load(self.settings.cache_ttl) is not None:
            return True
        self._lock_init()
        return self._initca().check_absent_or_resumable()

    def _lock_init(self, command: str = "init-ca") -> None:
        """One init-ca per CA name and home at a time: a second one would resume the first one's state.

        The lock is held until the process exits (an flock dies with its process, even on SIGKILL).
        """
        import fcntl

        path = self.chain_cache.path.with_suffix(".init.lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            raise BackendError(f"cannot create {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AlreadyExists(f"another {command} for CA {self.ca_name!r} is running in {self.home}") from None
        self._init_lock_fd = fd

    def create_key(self, key_type: KeyType) -> CAPublicKey:
        ready = self._initca().run(key_type, self.settings.hsm)
        self._pending = _PendingCA(ready.kid, ready.public_key)
        return ready.public_key

    def signer(self) -> CAPrivateKey:
        if self._pending is not None:
            public: CAPublicKey = self._pending.public_key
        else:
            recorded = self._recorded()
            if recorded:  # after a rollover: the current generation's pinned key version
                return self.signer_for(max(recorded))
            found = x509.load_pem_x509_certificate(self._cached_ca().chain_pem[0].encode()).public_key()
            if not isinstance(found, CAPublicKey):
                raise BackendError(f"CA {self.ca_name!r} has an unsupported key type")
            public = found
        return self._vault_signer(public, None)

    def _vault_signer(self, public: CAPublicKey, pinned: _Pinned | None) -> CAPrivateKey:
        """A signer for ``public``: with the pinned key version, or (None) the version current at each call."""
        self._budget = SignBudget(
            governor_for(self.settings.vault_url), self.settings.sign_rate or default_rate(public, self.settings.hsm)
        )

        def sign(alg: str, digest: bytes) -> bytes:
            return self._sign(alg, digest, pinned)

        return vault_private_key(public, sign, on_mismatch=self._stale_key)

    def signing_jobs(self) -> int:
        """Enough signatures in flight to use this process's share of the vault budget."""
        if self._budget is None:
            self.signer()
        assert self._budget is not None
        return default_jobs(self._budget.rate)

    def _sign(self, alg: str, digest: bytes, pinned: _Pinned | None = None) -> bytes:
        """Sign with ``pinned`` (one generation's key version) or the key version that is current now
        (it changes when init-ca merges)."""
        if pinned is not None:
            kid, scope, tenant = pinned
        elif self._pending is not None:
            kid, scope, tenant = self._pending.kid, self.credential.last_scope, self.credential.last_tenant
        else:
            active = self._cached_ca()
            kid, scope, tenant = active.kid, active.scope, active.tenant
        client = self._sign_clients.get(kid)
        if client is None:
            client = VaultSignClient(
                self.settings.vault_url,
                kid,
                self.credential,
                self._vault_http(),
                self.retry,
                scope,
                tenant,
                on_stale_key=self._stale_key,
                budget=self._budget,
            )
            self._sign_clients[kid] = client
        return client.sign(alg, digest)

    def store_chain(self, chain: Sequence[x509.Certificate]) -> None:
        pending = self._pending
        if pending is None:
            raise BackendError(
                f"no pending vault certificate for CA {self.ca_name!r}: the azure store merges "
                "a chain only during init-ca"
            )
        if not chain or chain[0].public_key().public_bytes(DER, SPKI) != pending.public_key.public_bytes(DER, SPKI):
            raise BackendError(f"CA certificate does not match the vault key of {self.name}")
        init = self._initca()
        merged_version, merged_kid = init.merge(chain)
        init.disable_others(merged_version)
        pem = b"".join(cert.public_bytes(PEM) for cert in chain)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_file_atomic(self.chain_path, pem, mode=0o644, overwrite=True)
        except OSError as exc:
            raise BackendError(
                f"cannot write {self.chain_path}: {exc.strerror}; the CA certificate is merged in the vault, "
                "run the same init-ca again to continue"
            ) from None
        self._active = CachedCA(
            key_spki=spki_b64(pending.public_key),
            vault_url=self.settings.vault_url,
            cert_name=self.name,
            cert_version=merged_version,
            kid=merged_kid,
            chain_pem=[c.public_bytes(PEM).decode() for c in chain],
            scope=self.credential.last_scope or DEFAULT_SCOPE,
            tenant=self.credential.last_tenant,
            fetched_at=time.time(),
        )
        self.chain_cache.save(self._active)
        self._pending = None

    def load_chain(self) -> list[x509.Certificate]:
        if self._pending is not None:
            raise NotFound(f"CA {self.ca_name!r} has no certificate yet (init-ca in progress)")
        recorded = self._recorded()
        if recorded:
            return self.chain_for(max(recorded))
        return [x509.load_pem_x509_certificate(pem.encode()) for pem in self._cached_ca().chain_pem]

    # ---------------------------------------------------- key generations (``kvpki rollover``)
    # generations.json (next to chain.pem) pins each generation to its certificate version and key id,
    # with its chain.  It is written when the first rollover starts (generation 0 = the merged init-ca
    # version, pinned before the vault gets a newer latest version) and again, as the switch, after the
    # next generation's certificate is merged.  Without it the CA has generation 0 only (as before).

    def _recorded(self) -> dict[int, dict[str, Any]]:
        try:
            raw = self.generations_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BackendError(f"cannot read {self.generations_path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            found = {int(number): entry for number, entry in data.items()}
            for entry in found.values():
                if not (isinstance(entry.get("kid"), str) and isinstance(entry.get("chain"), list)):
                    raise ValueError(entry)
        except (ValueError, TypeError, AttributeError):
            raise BackendError(f"{self.generations_path} is corrupt") from None
        return found

    def _record(self, recorded: dict[int, dict[str, Any]]) -> None:
        data = {str(number): entry for number, entry in sorted(recorded.items())}
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file_atomic(self.generations_path, json.dumps(data, indent=1).encode(), mode=0o644, overwrite=True)

    def generations(self) -> list[int]:
        recorded = self._recorded()
        found = [0]
        while found[-1] + 1 in recorded:
            found.append(found[-1] + 1)
        return found

    def current_generation(self) -> int:
        return self.generations()[-1]

    def chain_for(self, generation: int) -> list[x509.Certificate]:
        recorded = self._recorded()
        if not recorded and generation == 0:
            return self.load_chain()
        if self._next is not None and generation == self._next[0]:
            raise NotFound(f"CA {self.ca_name!r} generation {generation} has no certificate yet (rollover running)")
        entry = recorded.get(generation)
        if entry is None:
            raise NotFound(f"CA {self.ca_name!r} has no key generation {generation}")
        return [x509.load_pem_x509_certificate(pem.encode()) for pem in entry["chain"]]

    def signer_for(self, generation: int) -> CAPrivateKey:
        """The key version of ``generation``, named explicitly in every sign request."""
        if self._next is not None and generation == self._next[0]:
            ready = self._next[1]
            pinned = _Pinned(ready.kid, self.credential.last_scope, self.credential.last_tenant)
            return self._vault_signer(ready.public_key, pinned)
        recorded = self._recorded()
        if not recorded and generation == 0:
            return self.signer()
        entry = recorded.get(generation)
        if entry is None:
            raise NotFound(f"CA {self.ca_name!r} has no key generation {generation}")
        public = self.chain_for(generation)[0].public_key()
        if not isinstance(public, CAPublicKey):
            raise BackendError(f"CA {self.ca_name!r} has an unsupported key type")
        return self._vault_signer(public, _Pinned(entry["kid"], entry.get("scope"), entry.get("tenant")))

    def _entry(self, version: str, kid: str, chain: Sequence[x509.Certificate]) -> dict[str, Any]:
        return {
            "version": version,
            "kid": kid,
            "chain": [c.public_bytes(PEM).decode() for c in chain],
            "scope": self.credential.last_scope or DEFAULT_SCOPE,
            "tenant": self.credential.last_tenant,
        }

    def create_next_key(self, key_type: KeyType) -> tuple[int, CAPublicKey]:
        """Pin the current generation, then make the next one's key in the vault (resuming a stopped rollover)."""
        self._lock_init("rollover")
        try:
            return self._create_next_key(key_type)
        except BaseException:
            self._unlock()
            raise

    def _create_next_key(self, key_type: KeyType) -> tuple[int, CAPublicKey]:
        recorded = self._recorded()
        if not recorded:
            active = self._cached_ca()
            chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in active.chain_pem]
            latest = self._certs().get(self.name)
            if latest is None or bytes(latest.cer or b"") != chain[0].public_bytes(DER) or _version(latest) is None:
                raise BackendError(
                    f"the latest version of certificate {self.name!r} in {self.settings.vault_url} is not the CA "
                    f"certificate CA {self.ca_name!r} uses (get-ca): a version this home did not make; nothing was "
                    "changed"
                )
            active = active._replace(cert_version=str(_version(latest)), kid=latest.key_id or active.kid)
            recorded = {0: self._entry(active.cert_version, active.kid, chain)}
            self._record(recorded)
        generation = max(recorded) + 1
        self._finish_merged(recorded, generation)
        from kvpki_cli.keystores.azure.nextkey import NextKey

        steps = NextKey(
            self._certs(),
            self.ca_name,
            self.name,
            self.settings.deadline,
            self.settings.create_timeout,
            home_id=install_id(self.home),
        )
        ready = steps.start(generation, key_type, self.settings.hsm)
        self._next = (generation, ready, steps)
        return generation, ready.public_key

    def store_generation_chain(self, generation: int, chain: Sequence[x509.Certificate]) -> None:
        """Merge the new CA certificate into its pending version, then record it: the switch."""
        if self._next is None or self._next[0] != generation:
            raise BackendError(f"no pending vault key for generation {generation} of CA {self.ca_name!r}")
        _, ready, steps = self._next
        if not chain or chain[0].public_key().public_bytes(DER, SPKI) != ready.public_key.public_bytes(DER, SPKI):
            raise BackendError(f"CA certificate does not match the new vault key of {self.name}")
        # What is about to be merged, so a rerun after a merge whose recording failed can finish it.
        marker = {"generation": generation, "chain": [c.public_bytes(PEM).decode() for c in chain]}
        write_file_atomic(self.merging_path, json.dumps(marker).encode(), mode=0o644, overwrite=True)
        version, kid = steps.merge(chain)
        steps.disable_temporary()
        self._record_merged(generation, version, kid, chain)
        self._next = None
        self._unlock()

    def _record_merged(self, generation: int, version: str, kid: str, chain: Sequence[x509.Certificate]) -> None:
        recorded = self._recorded()
        recorded[generation] = self._entry(version, kid, chain)
        try:
            self._record(recorded)
        except (OSError, KvpkiError) as exc:
            raise BackendError(
                f"cannot write {self.generations_path} ({exc}): generation {generation} of CA {self.ca_name!r} "
                f"is merged in the vault as version {version} but not recorded here; nothing was deleted: run "
                "the same 'kvpki rollover' again to record it"
            ) from None
        self.merging_path.unlink(missing_ok=True)
        self._stale_key()

    def _finish_merged(self, recorded: dict[int, dict[str, Any]], generation: int) -> None:
        """A rollover whose merge succeeded but whose recording did not: record it now, and say so."""
        try:
            marker = json.loads(self.merging_path.read_bytes())
            chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in marker["chain"]]
            pending = int(marker["generation"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError):
            raise BackendError(f"{self.merging_path} is corrupt") from None
        if pending != generation:
            self.merging_path.unlink(missing_ok=True)  # stale: that generation is recorded
            return
        cert = self._certs().get(self.name)
        version = _version(cert) if cert is not None else None
        if cert is None or not version or not cert.key_id or bytes(cert.cer or b"") != chain[0].public_bytes(DER):
            self.merging_path.unlink(missing_ok=True)  # the merge was not applied: the rollover continues
            return
        self._record_merged(generation, version, cert.key_id, chain)
        raise AlreadyExists(
            f"the interrupted rollover of CA {self.ca_name!r} had merged generation {generation} in the vault "
            f"(version {version}); it is recorded now and current (get-ca --ca {self.ca_name}); no new key was made"
        )

    def discard_generation(self, generation: int) -> None:
        """Forget the pending generation locally; the vault keeps it for the next rollover to continue."""
        self._next = None
        self._unlock()

    def _unlock(self) -> None:
        if self._init_lock_fd is not None:
            os.close(self._init_lock_fd)  # closing the only descriptor releases the flock
            self._init_lock_fd = None

    def discard(self) -> None:
        """Forget local state only: the half-built CA stays in the vault for the same init-ca to continue."""
        self.chain_cache.clear()
        with contextlib.suppress(OSError):
            self.chain_path.unlink(missing_ok=True)
        self._pending = None
        self._active = None

    def reachable(self) -> bool:
        """The latest exchange with the vault (any CA of this process) got an answer that is not a 5xx."""
        from urllib.parse import urlsplit

        from kvpki_cli import observe

        return observe.vault_reachable(urlsplit(self.settings.vault_url).hostname or "")
