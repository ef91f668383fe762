"""Connection limits and timeouts below aiohttp, so idle or slow clients cannot exhaust the server.

aiohttp's ``TCPSite`` accepts every connection and waits for it forever (no TLS
handshake timeout, no cap, no deadline for a request that trickles in).  Here a
listener accepts plain TCP itself, counts the connection against a per-server and
a per-client-address cap and closes the excess at once (before any TLS work), runs
the TLS handshake with a deadline, then hands the connection to aiohttp's
protocol through a wrapper that enforces:

* ``idle_timeout``: a connection without a request in progress (after the
  handshake, or after the previous response) is closed after this long;
* ``request_timeout``: once the first byte of a request arrived, its head and
  body must be complete within this long (slow-trickle clients).

The server cap is kept below the open-file limit, which is raised to its hard
limit at start, so ``accept()`` never fails with EMFILE.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("kvpki.serve")

FD_RESERVE_MIN = 64  # files, database, log, key-store connections: never given to clients
SUMMARY_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Timeouts:
    """Seconds; see the module docstring."""

    tls_handshake: float = 10.0
    idle: float = 15.0
    request: float = 15.0


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
    return target


def connection_cap(configured: int, fd_limit: int) -> int:
    """The server-wide cap actually used: the configured one, kept below the open-file limit."""
    reserve = max(FD_RESERVE_MIN, fd_limit // 8)
    return max(1, min(configured, fd_limit - reserve))


class ConnectionLimits:
    """Counts open connections per server and per client address (shared by all listeners)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_address: dict[str, int] = {}
        self.refused = 0
        self.timed_out = 0
        self.accept_errors = 0

    def admit(self, address: str) -> bool:
        held = self._by_address.get(address, 0)
        if self.open >= self.total or held >= self.per_client:
            self.refused += 1
            return False
        self.open += 1
        self._by_address[address] = held + 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        held = self._by_address[address] - 1
        if held:
            self._by_address[address] = held
        else:
            del self._by_address[address]


class Connection(asyncio.Protocol):
    """aiohttp's protocol plus the per-connection deadlines and the slot it holds."""

    def __init__(self, listener: Listener, address: str) -> None:
        self.listener = listener
        self.address = address
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._released = False
        self._busy = 0
        self._waiting_for_request = True  # True: the idle deadline runs; False: the request deadline
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol, delegated to aiohttp ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._inner = self.listener.factory()
        self._inner.connection_made(transport)
        self._arm(self.listener.timeouts.idle)

    def data_received(self, data: bytes) -> None:
        assert self._inner is not None
        if self._waiting_for_request and not self._busy:
            self._waiting_for_request = False
            self._arm(self.listener.timeouts.request)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.release()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # --- deadlines, driven by the middleware below ---

    def request_started(self) -> None:
        """The request's head and body are in: no deadline while the handler works."""
        self._busy += 1
        self._disarm()

    def request_finished(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._waiting_for_request = True
            self._arm(self.listener.timeouts.idle)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._busy or self._transport is None:
            return
        self.listener.limits.timed_out += 1
        self._transport.abort()  # abort, not close: a TLS close would wait for the peer's close_notify

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.listener.limits.release(self.address)


@web.middleware
async def request_deadline(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Read the whole body under the request deadline, then run the handler with no deadline."""
    connection = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(connection, Connection):
        return await handler(request)
    if request.can_read_body:
        try:
            await request.read()  # cached: the handler's own read() returns these bytes
        except web.HTTPRequestEntityTooLarge:
            return web.Response(
                status=413, text=f"request body is larger than {request.client_max_size} bytes\n"
            )
    connection.request_started()
    try:
        return await handler(request)
    finally:
        connection.request_finished()


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


class Listener:
    """One listening socket (HTTPS or plain HTTP) feeding an aiohttp server.

    Its own accept loop takes one connection at a time and closes it at once when
    over a cap, before any transport or TLS state exists (asyncio's own loop
    accepts up to ``backlog`` sockets in a burst before any protocol sees them).
    """

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext | None,
        limits: ConnectionLimits,
        timeouts: Timeouts,
    ) -> None:
        self.factory = factory
        self.context = context
        self.limits = limits
        self.timeouts = timeouts
        self.sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, backlog: int) -> Listener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog)
        sock.setblocking(False)
        self.sockets = [sock]
        self._spawn(self._accept(sock))
        return self

    def close(self) -> None:
        """Stop accepting and drop connections still in their TLS handshake (aiohttp closes the others)."""
        for task in list(self._tasks):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: the caps should prevent it; never spin
                self.limits.accept_errors += 1
                if self.limits.accept_errors == 1:
                    log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            address = client_key(peer)
            if not self.limits.admit(address):
                conn.close()
                continue
            self._spawn(self._connect(conn, address))

    async def _connect(self, conn: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        connection = Connection(self, address)
        try:
            if self.context is None:
                await loop.connect_accepted_socket(lambda: connection, conn)
            else:
                await loop.connect_accepted_socket(
                    lambda: connection,
                    conn,
                    ssl=self.context,
                    ssl_handshake_timeout=self.timeouts.tls_handshake,
                    ssl_shutdown_timeout=min(self.timeouts.tls_handshake, 5.0),
                )
        except BaseException as exc:  # handshake failed or timed out, or the server is stopping
            conn.close()
            connection.release()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not isinstance(exc, OSError):
                log.warning("connection from %s failed: %r", address, exc)


class GatedSite(web.BaseSite):
    """An aiohttp site whose connections go through ``Listener`` (caps, handshake and request deadlines)."""

    __slots__ = ("_host", "_limits", "_port", "_timeouts")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limits: ConnectionLimits,
        timeouts: Timeouts,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._limits = limits
        self._timeouts = timeouts

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        listener = Listener(server, self._ssl_context, self._limits, self._timeouts)
        self._server = await listener.start(self._host, self._port, self._backlog)  # type: ignore[assignment]


async def log_summaries(limits: ConnectionLimits) -> None:
    """Once a minute, one line when connections were refused or timed out (never one line per attacker)."""
    while True:
        await asyncio.sleep(SUMMARY_INTERVAL_S)
        if limits.refused or limits.timed_out or limits.accept_errors:
            log.warning(
                "connections in the last %ds: %d refused over the limits, %d closed by timeouts,"
                " %d accept errors (%d open)",
                SUMMARY_INTERVAL_S,
                limits.refused,
                limits.timed_out,
                limits.accept_errors,
                limits.open,
            )
            limits.refused = limits.timed_out = limits.accept_errors = 0
