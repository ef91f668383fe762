"""Connection limits and timeouts below aiohttp, so idle or slow clients cannot exhaust the server.

aiohttp's ``TCPSite`` accepts every connection and waits for it forever (no TLS
handshake timeout, no cap, no deadline for a request that trickles in).  Here a
listener accepts plain TCP, counts the connection against a per-server and a
per-client-address cap and closes the excess at once (before any TLS work), runs
the TLS handshake itself with a deadline, then hands the connection to aiohttp's
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
import logging
import resource
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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


class _Gate(asyncio.Protocol):
    """The protocol ``create_server`` installs: admit or close, then hand over (plain or after TLS)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.connection: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        if not self.listener.limits.admit(address):
            transport.abort()  # refused right after accept: no TLS, no buffers, fd freed at once
            return
        connection = Connection(self.listener, address)
        if self.listener.context is None:
            transport.set_protocol(connection)
            connection.connection_made(transport)
        else:
            self.connection = connection
            transport.pause_reading()  # the ClientHello waits for start_tls
            connection.handshake_task = asyncio.get_running_loop().create_task(connection.handshake(transport))

    def connection_lost(self, exc: Exception | None) -> None:
        """Only reached when the client left before start_tls took the transport over."""
        if self.connection is not None:
            self.connection.abandon()


class Connection(asyncio.Protocol):
    """aiohttp's protocol plus the per-connection deadlines and the slot it holds."""

    def __init__(self, listener: Listener, address: str) -> None:
        self.listener = listener
        self.address = address
        self.handshake_task: asyncio.Task[None] | None = None
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._released = False
        self._busy = 0
        self._waiting_for_request = True  # True: the idle deadline runs; False: the request deadline
        self._timer: asyncio.TimerHandle | None = None
        self._early: list[bytes] = []  # TLS data that arrived before start_tls returned

    async def handshake(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        timeouts = self.listener.timeouts
        try:
            transport = await loop.start_tls(
                raw,
                self,
                self.listener.context,  # type: ignore[arg-type]
                server_side=True,
                ssl_handshake_timeout=timeouts.tls_handshake,
                ssl_shutdown_timeout=min(timeouts.tls_handshake, 5.0),
            )
        except BaseException as exc:  # handshake failed, timed out, or the server is stopping
            raw.abort()
            self._release()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not isinstance(exc, (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
                log.warning("TLS handshake with %s failed: %r", self.address, exc)
            return
        if transport is None or self._released:  # lost between handshake and now
            return
        self.connection_made(transport)

    def abandon(self) -> None:
        if self.handshake_task is not None:
            self.handshake_task.cancel()
        self._release()

    # --- asyncio.Protocol, delegated to aiohttp ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._inner = self.listener.factory()
        self._inner.connection_made(transport)
        self._arm(self.listener.timeouts.idle)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:  # start_tls delivers data from the handshake's last read before it returns
            self._early.append(data)
            return
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
        self._release()
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

    def _release(self) -> None:
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


class Listener:
    """One listening socket (HTTPS or plain HTTP) feeding an aiohttp server."""

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

    async def start(self, host: str, port: int, backlog: int) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Gate(self), host, port, backlog=backlog, reuse_address=True)


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
        self._server = await listener.start(self._host, self._port, self._backlog)


async def log_summaries(limits: ConnectionLimits) -> None:
    """Once a minute, one line when connections were refused or timed out (never one line per attacker)."""
    while True:
        await asyncio.sleep(SUMMARY_INTERVAL_S)
        if limits.refused or limits.timed_out:
            log.warning(
                "connections: %d refused over the limits, %d closed by timeouts in the last %ds (%d open)",
                limits.refused,
                limits.timed_out,
                SUMMARY_INTERVAL_S,
                limits.open,
            )
            limits.refused = limits.timed_out = 0
