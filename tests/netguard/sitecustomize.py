"""Network guard: refuse connections and name lookups that leave the loopback interface.

Put this directory on PYTHONPATH so every test subprocess imports it at start-up
(Python imports ``sitecustomize`` automatically); the pytest process installs it
through ``tests.kvserver.fixtures``.  It exists so no test can ever reach the
managed-identity endpoint (169.254.169.254), login.microsoftonline.com or any
other real host, whatever the credential chain decides to try.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

_ALLOWED_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class NetguardError(ConnectionRefusedError):
    """A test tried to reach a non-loopback address."""


def _is_loopback(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%", 1)[0].strip("[]")
    if host.lower() in _ALLOWED_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(address: Any) -> None:
    if isinstance(address, tuple) and address and not _is_loopback(address[0]):
        raise NetguardError(f"netguard: connection to non-loopback address {address[0]!r} blocked in tests")


def install() -> None:
    """Patch socket connect/connect_ex/getaddrinfo once per process."""
    if getattr(socket, "_kvpki_netguard", False):
        return
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            raise socket.gaierror(socket.EAI_NONAME, f"netguard: lookup of {host!r} blocked in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    socket._kvpki_netguard = True  # type: ignore[attr-defined]


install()
