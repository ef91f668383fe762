"""Running the synchronous issuance core off the event loop with bounded concurrency.

The pool size is the signing concurrency.  Each worker thread keeps its own
``CertificateAuthority`` objects and one inventory connection they share (an
SQLite connection may not cross threads); each CA loads its chain and key once,
not per request.  ``serve`` runs two pools: signing, and publishing (CRL, OCSP).

A pool with a ``deadline`` gives each job that many seconds from its submission
(``kvpki_cli.deadline``): a job that would queue for the Key Vault budget past
it fails at once with a ``BackendError`` carrying ``retry_after`` (a 503 with
Retry-After for the client) instead of answering after the client gave up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from kvpki_cli import deadline
from kvpki_cli.authority import CertificateAuthority
from kvpki_cli.config import Settings
from kvpki_cli.inventory import open_inventory
from kvpki_cli.inventory.base import Inventory

T = TypeVar("T")


class CaWorkers:
    """A thread pool whose jobs receive the calling thread's ``CertificateAuthority``."""

    def __init__(self, settings: Settings, concurrency: int, deadline: float | None = None) -> None:
        self.settings = settings
        self.deadline = deadline
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kvpki-ca")
        self._local = threading.local()
        self._waiting = 0  # jobs submitted and not yet started: the queue depth metric
        self._waiting_lock = threading.Lock()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def authority(self, name: str) -> CertificateAuthority:
        """This thread's CA object (call only from a worker, or at start-up)."""
        cache: dict[str, CertificateAuthority] | None = getattr(self._local, "cas", None)
        if cache is None:
            cache = self._local.cas = {}
        ca = cache.get(name)
        if ca is None:
            ca = cache[name] = CertificateAuthority.open(self.settings, name, self._inventory())
        return ca

    def _inventory(self) -> Inventory:
        """One inventory connection per thread, shared by its CAs (SQLite: 3 open files per connection)."""
        inventory: Inventory | None = getattr(self._local, "inventory", None)
        if inventory is None:
            inventory = self._local.inventory = open_inventory(self.settings.inventory_url, self.settings.home)
        return inventory

    async def run(self, ca_name: str, job: Callable[[CertificateAuthority], T]) -> T:
        loop = asyncio.get_running_loop()
        at = time.monotonic() + self.deadline if self.deadline is not None else None
        with self._waiting_lock:
            self._waiting += 1
        return await loop.run_in_executor(self._pool, lambda: self._run(at, ca_name, job))

    def _run(self, at: float | None, ca_name: str, job: Callable[[CertificateAuthority], T]) -> T:
        with self._waiting_lock:
            self._waiting -= 1
        with deadline.until(at):
            return job(self.authority(ca_name))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
