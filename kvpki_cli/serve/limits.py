"""How many connections `kvpki serve` holds: caps per server and per client, within the open-file limit.

The server cap is kept below the open-file limit, which is raised to its hard
limit at start, so ``accept()`` never fails with EMFILE (systemd's default soft
limit is 1024).  ``listener.py`` asks ``ConnectionLimits`` before it does any
work for a new connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from typing import Protocol

log = logging.getLogger("kvpki.serve")

FD_RESERVE_MIN = 64  # files, database, log, key-store connections: never given to clients
CLOSING_SLACK = 32  # sockets of replaced connections still closing, on top of the cap (inside the reserve)
SUMMARY_INTERVAL_S = 60.0


class Slot(Protocol):
    """What the limits need to know about a connection."""

    @property
    def address(self) -> str: ...

    @property
    def busy(self) -> bool: ...

    def evict(self) -> None:
        """Drop the connection; it must call ``ConnectionLimits.release`` before returning."""


def raise_fd_limit() -> int:
    """Raise the open-file soft limit to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    log.info("open-file limit raised from %d to %d", soft, target)
    return target


def connection_cap(configured: int, fd_limit: int) -> int:
    """The server-wide cap actually used: the configured one, kept below the open-file limit."""
    reserve = max(FD_RESERVE_MIN, fd_limit // 8)
    return max(1, min(configured, fd_limit - reserve))


class ConnectionLimits:
    """Open connections per server and per client address (shared by all listeners).

    Over the per-client cap a new connection is refused.  When the server is full, a
    new connection replaces an idle one (not inside a request handler): the oldest of
    the client holding the most connections if it holds at least two more than the
    newcomer would, else the oldest overall; with no idle connection it is refused.
    So a crowd of idle connections from many addresses cannot lock out a client
    that is about to send a request.
    """

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._all: dict[Slot, None] = {}  # insertion order = age
        self._by_address: dict[str, dict[Slot, None]] = {}
        self.sockets = 0  # admitted sockets not yet closed (a replaced connection closes a moment later)
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self.accept_errors = 0

    @property
    def open(self) -> int:
        return len(self._all)

    def admit(self, connection: Slot) -> bool:
        held = self._by_address.get(connection.address, {})
        if len(held) >= self.per_client:
            self.refused += 1
            return False
        if len(self._all) >= self.total:
            victim = self._victim(len(held) + 1)
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            victim.evict()
        self._all[connection] = None
        self._by_address.setdefault(connection.address, {})[connection] = None
        self.sockets += 1
        return True

    def may_accept(self) -> bool:
        """False while replaced connections are still closing: accepting more could exceed the file limit."""
        return self.sockets < self.total + CLOSING_SLACK

    def _victim(self, newcomer_count: int) -> Slot | None:
        largest = max(self._by_address.values(), key=len)
        if len(largest) > newcomer_count:
            victim = next((c for c in largest if not c.busy), None)
            if victim is not None:
                return victim
        return next((c for c in self._all if not c.busy), None)

    def release(self, connection: Slot) -> None:
        self._all.pop(connection, None)
        held = self._by_address.get(connection.address)
        if held is not None:
            held.pop(connection, None)
            if not held:
                del self._by_address[connection.address]


def client_key(peer: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """What the per-client cap counts: the IPv4 address, or the IPv6 /64 (one host's usual share)."""
    host = str(peer[0]).split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)



async def log_summaries(limits: ConnectionLimits) -> None:
    """Once a minute, one line when connections were refused or timed out (never one line per attacker)."""
    while True:
        await asyncio.sleep(SUMMARY_INTERVAL_S)
        if limits.refused or limits.evicted or limits.timed_out or limits.accept_errors:
            log.warning(
                "connections in the last %ds: %d refused over the limits, %d idle ones replaced by newer ones,"
                " %d closed by timeouts, %d accept errors (%d open)",
                SUMMARY_INTERVAL_S,
                limits.refused,
                limits.evicted,
                limits.timed_out,
                limits.accept_errors,
                limits.open,
            )
            limits.refused = limits.evicted = limits.timed_out = limits.accept_errors = 0
