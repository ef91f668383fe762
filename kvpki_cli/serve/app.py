"""Assembling and running `kvpki serve`: load everything once, then serve EST, CRL and OCSP over TLS.

Everything a request needs (config, users, CA chains, precomputed /cacerts
bodies, TLS context) is loaded here at start-up; requests never re-read files.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import ssl
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.config import Settings
from kvpki_cli.errors import UsageError
from kvpki_cli.fileutil import read_regular_file
from kvpki_cli.rollover import published_certificates
from kvpki_cli.serve.auth import Authenticator
from kvpki_cli.serve.config import ServeConfig
from kvpki_cli.serve.crl import CrlCache, Publisher
from kvpki_cli.serve.est import EstLabel, EstService
from kvpki_cli.serve.generations import GenerationWatcher
from kvpki_cli.serve.health import Health
from kvpki_cli.serve.limits import ConnectionLimits, connection_cap, log_summaries, raise_fd_limit
from kvpki_cli.serve.listener import GatedSite, Timeouts, request_deadline
from kvpki_cli.serve.logformat import handler_formatter
from kvpki_cli.serve.logsafe import install_library_filters
from kvpki_cli.serve.metrics import ServeMetrics
from kvpki_cli.serve.noncebudget import NonceBudget
from kvpki_cli.serve.ocsp import OcspResponder, Responders, load_delegate
from kvpki_cli.serve.passwd import UserDirectory
from kvpki_cli.serve.wire import certs_only_body
from kvpki_cli.serve.workers import CaWorkers

log = logging.getLogger("kvpki.serve")
PUBLISHING_THREADS = 2  # at least; as many as signing workers otherwise (OCSP with nonces signs per request)


def _load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(read_regular_file(path, 4 * 1024 * 1024))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load certificates from {path}: {exc}") from None
    return certs


# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (Python's ssl has no name for it but passes verify_flags through).
VERIFY_NO_CHECK_TIME = 0x200000


def tls_context(config: ServeConfig, trusted: list[x509.Certificate]) -> ssl.SSLContext:
    """TLS 1.2+, our server certificate, and client certificates requested but optional.

    With ``renew_after_expiry`` on any label, chains are verified without their validity
    time (an offline device's certificate arrives expired); serve/auth.py then checks time
    on every path that accepts a client certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        for path in (config.tls_cert, config.tls_key):  # OpenSSL would block for ever on a FIFO
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS certificate {config.tls_cert} / key {config.tls_key}: {exc}") from None
    context.verify_mode = ssl.CERT_OPTIONAL
    pem = "".join(cert.public_bytes(Encoding.PEM).decode() for cert in trusted)
    context.load_verify_locations(cadata=pem)
    if any(label.renew_after_expiry is not None for label in config.labels.values()):
        context.verify_flags |= VERIFY_NO_CHECK_TIME
    return context


@dataclass
class Apps:
    """The HTTPS application (EST + publishing), the optional plain-HTTP one (publishing only)."""

    https: web.Application
    http: web.Application | None
    context: ssl.SSLContext
    workers: CaWorkers  # signing: runs the issuance core
    publishing: CaWorkers  # CRL/OCSP inventory reads and signatures, so they never queue behind issuance
    ocsp: OcspResponder | None = None  # its maintain() task keeps delegated responders renewed
    metrics: ServeMetrics | None = None
    health: Health | None = None
    ca_names: tuple[str, ...] = ()
    generations: GenerationWatcher | None = None  # its watch() task picks up `kvpki rollover`

    def shutdown(self) -> None:
        self.workers.shutdown()
        self.publishing.shutdown()
        if self.health is not None:
            self.health.pool.shutdown()
        if self.metrics is not None:
            self.metrics.detach()


def build_app(settings: Settings, config: ServeConfig) -> Apps:
    """Validate the configuration against the CAs and profiles, and wire the handlers.

    CRL and OCSP are also offered over plain HTTP (``http_port``) because relying
    parties fetch them before they can trust any TLS server (RFC 5280 4.2.1.13).
    """
    if not config.labels:
        raise UsageError('serve config: define at least one EST label, e.g. [est.default] ca = "issuing"')
    chains: dict[str, list[x509.Certificate]] = {}
    published: dict[str, list[x509.Certificate]] = {}  # with earlier key generations and cross-certificates
    earlier: dict[str, list[x509.Certificate]] = {}  # CA certificates of earlier key generations (rollover)
    first: dict[str, bytes] = {}  # generation 0's CA certificate: what /ca/<ca>.crt serves
    current_generation: dict[str, int] = {}
    for label in config.labels.values():
        label.check_profile(label.profile, settings.profile(label.profile).is_ca)
        for profile in label.identity_profiles:
            settings.profile(profile)
        for name in (label.ca, *label.identity_cas):
            if name not in chains:
                authority = CertificateAuthority.open(settings, name)
                chains[name], published[name] = authority.chain, published_certificates(authority)
                generations = authority.generations()
                earlier[name] = [generation.chain[0] for generation in generations[1:]]
                current_generation[name] = generations[0].number
                first[name] = generations[-1].chain[0].public_bytes(Encoding.DER)
    labels = {
        name: EstLabel(label, certs_only_body(published[label.ca], label.base64_line_length))
        for name, label in config.labels.items()
    }
    client_cas = {
        name: [cert for path in label.client_cas for cert in _load_certificates(path)]
        for name, label in config.labels.items()
    }
    delegates = {
        name: load_delegate(signer, CertificateAuthority.open(settings, name).certificate)
        for name, signer in config.ocsp_signers.items()
    }
    trusted = [cert for certificates in published.values() for cert in certificates]
    trusted += [cert for certs in client_cas.values() for cert in certs]
    context = tls_context(config, trusted)

    workers = CaWorkers(settings, config.signing_concurrency, deadline=config.request_timeout)
    publishing = CaWorkers(settings, max(PUBLISHING_THREADS, config.signing_concurrency))
    auth = Authenticator(
        UserDirectory(config.users_file),
        config.realm,
        {name: chains[label.ca][0] for name, label in config.labels.items()},
        client_cas,
        {name: chains[name][0] for label in config.labels.values() for name in label.identity_cas},
        {name: label.renew_after_expiry for name, label in config.labels.items() if label.renew_after_expiry},
        trusted,
        earlier_ca_certs={name: earlier[label.ca] for name, label in config.labels.items()},
        earlier_identity_cas={name: earlier[name] for label in config.labels.values() for name in label.identity_cas},
    )
    ca_names = set(settings.ca_names())
    ca_certificates = first
    publisher = Publisher(ca_names, publishing, CrlCache(config.crl_validity), config.retry_after, ca_certificates)
    responders = Responders(delegates)
    for name in sorted(ca_names - set(delegates)):  # responders of init-ocsp-responder, renewed if due
        responders.refresh(publishing.authority(name))
    ocsp = OcspResponder(
        ca_names, publishing, delegates, config.ocsp_validity, config.retry_after, config.ocsp_nonces, responders,
        NonceBudget(config.ocsp_nonce_rate, config.ocsp_nonce_burst),
    )  # fmt: skip
    metrics = ServeMetrics()
    metrics.attach(workers)
    health = Health(CaWorkers(settings, 1), sorted(ca_names))
    publish = [*publisher.routes(), *ocsp.routes(), web.get("/healthz", health.handler)]
    est = EstService(config, labels, auth, workers, metrics)
    est.limiter.on_refusal = metrics.refused_by_rate
    https = web.Application(client_max_size=config.max_body_bytes, middlewares=[request_deadline])
    https.add_routes(est.routes())
    https.add_routes(publish)
    http = None
    if config.http_port is not None:  # metrics only here: keep them off the port devices reach
        http = web.Application(client_max_size=config.max_body_bytes, middlewares=[request_deadline])
        http.add_routes([*publish, web.get("/metrics", metrics.handler)])
    watcher = GenerationWatcher(labels, auth, context, publishing, current_generation)
    return Apps(
        https, http, context, workers, publishing, ocsp, metrics, health, tuple(sorted(ca_names)), watcher
    )


async def _start(
    app: web.Application,
    config: ServeConfig,
    port: int,
    context: ssl.SSLContext | None,
    limits: ConnectionLimits,
) -> web.AppRunner:
    timeouts = Timeouts(config.tls_handshake_timeout, config.idle_timeout, config.request_timeout)
    backstop = config.idle_timeout + config.request_timeout + 1  # aiohttp's own idle close; ours come first
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=backstop)
    await runner.setup()
    await GatedSite(runner, config.host, port, ssl_context=context, limits=limits, timeouts=timeouts).start()
    bound = runner.addresses[0]
    log.info("listening on %s://%s:%d", "https" if context else "http", bound[0], bound[1])
    return runner


async def _serve(apps: Apps, config: ServeConfig) -> None:
    fd_limit = raise_fd_limit()
    cap = connection_cap(config.max_connections, fd_limit)
    if cap < config.max_connections:
        log.warning("max_connections lowered to %d: the open-file limit is %d", cap, fd_limit)
    limits = ConnectionLimits(cap, config.max_connections_per_client)
    summaries = asyncio.get_running_loop().create_task(log_summaries(limits))
    maintenance = asyncio.get_running_loop().create_task(apps.ocsp.maintain()) if apps.ocsp else None
    watcher = asyncio.get_running_loop().create_task(apps.generations.watch()) if apps.generations else None
    gauges = None
    if apps.metrics is not None and apps.ca_names:
        gauges = asyncio.get_running_loop().create_task(
            apps.metrics.refresh(apps.publishing, list(apps.ca_names), config.metrics_interval)
        )
    runners = []
    if apps.http is not None and config.http_port is not None:
        runners.append(await _start(apps.http, config, config.http_port, None, limits))
    runners.append(await _start(apps.https, config, config.port, apps.context, limits))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        summaries.cancel()
        if gauges is not None:
            gauges.cancel()
        if maintenance is not None:
            maintenance.cancel()
        if watcher is not None:
            watcher.cancel()
        for runner in runners:
            await runner.cleanup()


def run(settings: Settings, config: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(handler_formatter(config.log_format))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    install_library_filters()  # a malformed request: one escaped line, never a traceback
    apps = build_app(settings, config)
    try:
        asyncio.run(_serve(apps, config))
    finally:
        apps.shutdown()
