"""Run the test server as a process: ``python -m tests.kvserver --port 0 --latency-ms 30 --throttle 2000/10``.

Prints one JSON line (url, tenant, client id/secret, CA bundle) on stdout, then serves until killed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from tests.kvserver.server import KeyVaultTestServer


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kvserver")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--token-latency-ms", type=float, default=None)
    parser.add_argument("--tls-dir", type=Path, default=None)
    parser.add_argument("--throttle", default=None, help="LIMIT/SECONDS: 429 for sign requests above it, e.g. 2000/10")
    parser.add_argument("--purge-protection", action="store_true", help="refuse purges, as the README's vault")
    args = parser.parse_args()
    server = KeyVaultTestServer(port=args.port, tls_dir=args.tls_dir, purge_protection=args.purge_protection)
    server.set_faults(latency_ms=args.latency_ms, token_latency_ms=args.token_latency_ms)
    if args.throttle:
        limit, _, window = args.throttle.partition("/")
        server.set_throttle(int(limit), float(window or 10))
    server.start()
    info = {
        "url": server.url,
        "tenant_id": server.tenant_id,
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "ca_bundle": str(server.ca_bundle),
        "env": server.client_env(),
    }
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
