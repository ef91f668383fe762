"""A tiny event registry: the core reports what happened, whoever listens counts it.

The Key Vault client reports each HTTP answer and each retry here; ``kvpki serve``
subscribes its Prometheus counters (serve/metrics.py), so the core never imports
prometheus_client and costs one empty-list check when nobody listens.  It also
remembers the last outcome per vault host, the cheap "is the key store reachable"
answer of ``/healthz``.  Standard library only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

VAULT_RESPONSE = "vault_response"  # fields: host, status (HTTP status, or 0: no answer)
VAULT_RETRY = "vault_retry"  # fields: reason (HTTP status or "error")

Listener = Callable[..., None]
_listeners: dict[str, list[Listener]] = {}
_last_vault: dict[str, tuple[bool, float]] = {}  # host -> (answered without a server error, monotonic time)


def subscribe(event: str, listener: Listener) -> None:
    _listeners.setdefault(event, []).append(listener)


def unsubscribe(event: str, listener: Listener) -> None:
    if listener in _listeners.get(event, []):
        _listeners[event].remove(listener)


def emit(event: str, **fields: object) -> None:
    """Call every listener; a failing listener never breaks the operation that reported."""
    for listener in _listeners.get(event, ()):
        with contextlib.suppress(Exception):  # observability must not change behaviour
            listener(**fields)


def vault_answered(host: str, status: int) -> None:
    """One vault HTTP exchange ended (status 0: no answer: timeout, refused, TLS failure)."""
    _last_vault[host] = (0 < status < 500, time.monotonic())
    emit(VAULT_RESPONSE, host=host, status=status)


def vault_reachable(host: str) -> bool:
    """False only when the latest exchange with ``host`` got no answer or a server error (no data: True)."""
    last = _last_vault.get(host)
    return last is None or last[0]
