"""Prometheus metrics of `kvpki serve`, served at /metrics on the plain-HTTP port only.

Counters move with the requests (enrollments by label and outcome, rate-limit
refusals, signing latency, Key Vault answers and retries through the
``kvpki_cli.observe`` registry); gauges that need the inventory (CRL age,
certificates expiring within 30 days) are computed every ``metrics_interval``
seconds in a worker thread, never per scrape, so a scraper cannot load the
database.  Only this module imports prometheus_client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvpki_cli import observe
from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.serve.workers import CaWorkers

log = logging.getLogger("kvpki.serve")
EXPIRING_WITHIN = timedelta(days=30)
SIGNING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """One registry per server (not the global one), so tests and embedders get clean counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.enrollments = Counter(
            "kvpki_est_enrollments", "EST enrollment requests by label and outcome (issued or HTTP status)",
            ["label", "outcome"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "kvpki_est_rate_limited", "Enrollments refused with 429 by label and limit scope (identity, label)",
            ["label", "scope"], registry=r,
        )  # fmt: skip
        self.signing = Histogram(
            "kvpki_signing_seconds", "Issuance core time per certificate (policy, signature, inventory commit)",
            ["ca"], buckets=SIGNING_BUCKETS, registry=r,
        )  # fmt: skip
        self.vault_requests = Counter(
            "kvpki_vault_requests", "Key Vault HTTP exchanges by status (0: no answer)", ["status"], registry=r
        )
        self.vault_throttled = Counter("kvpki_vault_throttled", "Key Vault 429 answers", registry=r)
        self.vault_retries = Counter(
            "kvpki_vault_retries", "Key Vault retries by cause (HTTP status or error)", ["reason"], registry=r
        )
        self.queue_depth = Gauge("kvpki_signing_queue_depth", "Signing jobs waiting for a worker", registry=r)
        self.crl_age = Gauge("kvpki_crl_age_seconds", "Age of the latest stored CRL per CA", ["ca"], registry=r)
        self.expiring = Gauge(
            "kvpki_certificates_expiring_30d", "Valid certificates expiring within 30 days per CA", ["ca"], registry=r
        )
        self.refreshed = Gauge(
            "kvpki_inventory_gauges_timestamp_seconds", "When CRL age and expiring counts were computed", registry=r
        )

    # --- request hooks (est.py, ratelimit.py)

    def enrollment(self, label: str, outcome: str) -> None:
        self.enrollments.labels(label, outcome).inc()

    def refused_by_rate(self, label: str, scope: str) -> None:
        self.rate_limited.labels(label, scope).inc()

    def signed(self, ca: str, seconds: float) -> None:
        self.signing.labels(ca).observe(seconds)

    # --- Key Vault (kvpki_cli.observe)

    def _vault_response(self, host: str, status: int) -> None:
        self.vault_requests.labels(str(status)).inc()
        if status == 429:
            self.vault_throttled.inc()

    def _vault_retry(self, reason: str) -> None:
        self.vault_retries.labels(reason).inc()

    def attach(self, signing: CaWorkers) -> None:
        observe.subscribe(observe.VAULT_RESPONSE, self._vault_response)
        observe.subscribe(observe.VAULT_RETRY, self._vault_retry)
        self.queue_depth.set_function(lambda: signing.queue_depth)

    def detach(self) -> None:
        observe.unsubscribe(observe.VAULT_RESPONSE, self._vault_response)
        observe.unsubscribe(observe.VAULT_RETRY, self._vault_retry)

    # --- inventory gauges

    def _compute(self, pool: CaWorkers, names: Iterable[str], ca: CertificateAuthority) -> None:
        """Worker thread: one cheap query per CA and gauge (the latest CRL without its DER, a COUNT)."""
        now = datetime.now(UTC)
        inventory = ca.inventory
        for name in names:
            latest = inventory.latest_crl(name, with_der=False)
            if latest is not None:
                self.crl_age.labels(name).set(max(0.0, (now - latest.this_update).total_seconds()))
            self.expiring.labels(name).set(inventory.count_expiring(name, now, now + EXPIRING_WITHIN))
        self.refreshed.set(now.timestamp())

    async def refresh(self, pool: CaWorkers, names: list[str], interval: float) -> None:
        """Recompute the inventory gauges every ``interval`` seconds until cancelled."""
        failing = False
        while True:
            try:
                await pool.run(names[0], lambda ca: self._compute(pool, names, ca))
                failing = False
            except Exception as exc:  # keep the loop; log a failure once, not every interval
                if not failing:
                    log.warning("metrics: inventory gauges not updated: %s: %r", type(exc).__name__, str(exc))
                failing = True
            await asyncio.sleep(interval)

    async def handler(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
