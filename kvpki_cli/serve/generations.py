"""A running ``kvpki serve`` picks up ``kvpki rollover`` without a restart.

Issuance already follows the key store at every request (``CertificateAuthority.current``).
What the server computed at start-up from the CA chains is refreshed here when a
label's CA gains a key generation: the label's ``/cacerts`` body, the CA
certificates the authenticator accepts for re-enrollment, and the TLS trust store
(so client certificates of the new generation are accepted).  One cheap check per
CA every few seconds on the publishing pool (a ``stat`` for the local store).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable

from cryptography import x509

from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.errors import KvpkiError
from kvpki_cli.pki.keys import Encoding
from kvpki_cli.rollover import published_certificates
from kvpki_cli.serve.auth import Authenticator
from kvpki_cli.serve.est import EstLabel
from kvpki_cli.serve.wire import certs_only_body
from kvpki_cli.serve.workers import CaWorkers

CHECK_S = 5.0
log = logging.getLogger("kvpki.serve")


class GenerationWatcher:
    """Refreshes the start-up state of every label's CA after a rollover (see the module docstring)."""

    def __init__(
        self,
        labels: dict[str, EstLabel],
        auth: Authenticator,
        context: ssl.SSLContext,
        workers: CaWorkers,
        known: dict[str, int],
    ) -> None:
        self.labels = labels
        self.auth = auth
        self.context = context
        self.workers = workers
        self.known = dict(known)  # CA name -> current generation when last seen

    async def watch(self, interval: float = CHECK_S) -> None:
        while True:
            await asyncio.sleep(interval)
            for name in sorted(self.known):
                try:
                    await self.check(name)
                except KvpkiError as error:
                    log.error("key generation check for CA %s failed: %s", name, error)

    async def check(self, name: str) -> None:
        state = await self.workers.run(name, _state_if_changed(self.known[name]))
        if state is None:
            return
        generation, current, earlier, published = state
        pem = "".join(cert.public_bytes(Encoding.PEM).decode() for cert in published)
        self.context.load_verify_locations(cadata=pem)  # new handshakes trust the new generation
        self.auth.trusted = (*self.auth.trusted, *published)  # chains checked here when TLS relaxes time
        for label_name, label in list(self.labels.items()):
            if label.config.ca == name:
                body = certs_only_body(published, label.config.base64_line_length)
                self.labels[label_name] = dataclasses.replace(label, cacerts_body=body)
                self.auth.ca_certs[label_name] = current
                self.auth.earlier_ca_certs[label_name] = earlier
        if name in self.auth.identity_cas:
            self.auth.identity_cas[name] = current
            self.auth.earlier_identity_cas[name] = earlier
        self.known[name] = generation
        log.info("CA %s: now issuing with key generation %d; /cacerts and client trust updated", name, generation)


State = tuple[int, x509.Certificate, list[x509.Certificate], list[x509.Certificate]]


def _state_if_changed(known: int) -> Callable[[CertificateAuthority], State | None]:
    """Publishing thread: (generation, CA certificate, earlier CA certificates, published) if it changed."""

    def job(ca: CertificateAuthority) -> State | None:
        current = ca.current()
        if current.number == known:
            return None
        earlier = [generation.chain[0] for generation in ca.generations()[1:]]
        return current.number, current.chain[0], earlier, published_certificates(ca)

    return job
