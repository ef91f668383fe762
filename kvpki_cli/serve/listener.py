"""Accepting connections below aiohttp, so idle or slow clients cannot exhaust the server.

aiohttp's ``TCPSite`` accepts every connection and waits for it forever (no TLS
handshake timeout, no cap, no deadline for a request that trickles in).  Here a
listener accepts plain TCP itself, asks ``ConnectionLimits`` (``limits.py``)
before any TLS work, runs the TLS handshake with a deadline, then hands the
connection to aiohttp's protocol through a wrapper that enforces:

* ``idle_timeout``: a connection without a request in progress (after the
  handshake, or after the previous response) is closed after this long;
* ``request_timeout``: once the first byte of a request arrived, its head and
  body must be complete within this long (slow-trickle clients).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvpki_cli.errors import UsageError
from kvpki_cli.serve.limits import ConnectionLimits, client_key

log = logging.getLogger("kvpki.serve")


@dataclass(frozen=True)
class Timeouts:
    """Seconds; see the module docstring."""

    tls_handshake: float = 10.0
    idle: float = 15.0
    request: float = 15.0


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
        self._socket_open = True
        self.task: asyncio.Task[None] | None = None  # accepting it (TLS handshake)

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
        self.socket_closed()
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

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def evict(self) -> None:
        """Make room for a newer connection: give back the slot now, then drop the connection."""
        self.release()
        if self._transport is not None:
            self._transport.abort()
        elif self.task is not None:  # still in the TLS handshake
            self.task.cancel()

    def socket_closed(self) -> None:
        if self._socket_open:
            self._socket_open = False
            self.listener.limits.sockets -= 1

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.listener.limits.release(self)


@web.middleware
async def request_deadline(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Read the whole body under the request deadline, then run the handler with no deadline."""
    connection = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(connection, Connection):
        return await handler(request)
    length = request.content_length
    if request.can_read_body and (length is None or length <= request.client_max_size):  # else: handler's 413
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
        """Listen on every address ``host`` resolves to, as ``loop.create_server`` would."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise UsageError(f"serve: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                self.close()
                raise UsageError(f"serve: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            sock.setblocking(False)
            self.sockets.append(sock)
        for sock in self.sockets:
            self._spawn(self._accept(sock))
        return self

    def close(self) -> None:
        """Stop accepting and drop connections still in their TLS handshake (aiohttp closes the others)."""
        for task in list(self._tasks):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.limits.may_accept():
                await asyncio.sleep(0.005)
                continue
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: the caps should prevent it; never spin
                self.limits.accept_errors += 1
                if self.limits.accept_errors == 1:
                    log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            connection = Connection(self, client_key(peer))
            if not self.limits.admit(connection):
                conn.close()
                continue
            connection.task = task = self._spawn(self._connect(conn, connection))
            task.add_done_callback(functools.partial(_abandoned, conn=conn, connection=connection))
            await asyncio.sleep(0)  # sock_accept does not yield while connections are pending: let others run

    async def _connect(self, conn: socket.socket, connection: Connection) -> None:
        loop = asyncio.get_running_loop()
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
            connection.socket_closed()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not isinstance(exc, OSError):
                log.warning("connection from %s failed: %r", connection.address, exc)
        finally:
            connection.task = None


def _abandoned(task: asyncio.Task[None], conn: socket.socket, connection: Connection) -> None:
    """A connect task cancelled before it ran its own cleanup (replaced at once): close and count here."""
    if task.cancelled():
        conn.close()
        connection.release()
        connection.socket_closed()


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
