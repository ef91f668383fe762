#!/usr/bin/env python3
"""Benchmark the azure fast path's TLS trust store: per-process cost of context + handshake + one request.

Starts a local HTTPS server (127.0.0.1) whose certificate chains to a throwaway CA,
installs that CA into a temporary hashed directory (the system's hash links plus
the CA, via ``openssl x509 -hash``) passed as ``SSL_CERT_DIR``, and builds a big
bundle (the system CA file plus the CA) that stands in for the system CA file as
the full default store.  Each run is a fresh process that builds ``VaultHTTP`` and
makes one GET; it reports the time from before the context is built to the
response, and the process wall time.

"old" forces the full store (what kvpki did before: parse the whole CA file);
"new" is the current ``TrustStore`` (hashed directory first).

Usage: scripts/bench_tls_trust.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.kvserver.tlsca import make_tls_files  # noqa: E402

CLIENT = r"""
import json, os, sys, time
t0 = time.perf_counter()
from kvpki_cli.keystores.azure import http as azure_http
mode, url = sys.argv[1], sys.argv[2]
import ssl
azure_http.ssl_context = lambda ca_bundle: ssl.create_default_context(cafile=os.environ["BENCH_SYSTEM_FILE"])
if mode == "old":
    azure_http.TrustStore.fast = lambda self: None
t1 = time.perf_counter()
http = azure_http.VaultHTTP(url, None)
response = http.request("GET", "/", None, None, 10.0)
t2 = time.perf_counter()
assert response.status == 200, response
print(json.dumps({"tls_ms": (t2 - t1) * 1000}))
"""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms per response

    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_server(cert: Path, key: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def subject_hash(pem: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(pem)], capture_output=True, check=True)
    return out.stdout.decode().strip()


def hashed_dir(directory: Path, ca: Path | None) -> Path:
    """The system's hash links (as symlinks) plus ``ca`` under its subject hash."""
    directory.mkdir()
    system = ssl.get_default_verify_paths().openssl_capath
    if os.path.isdir(system):
        for entry in os.scandir(system):
            name = entry.name
            if len(name) >= 10 and name[8] == "." and name[9:].isdigit():
                os.symlink(os.path.realpath(entry.path), directory / name)
    if ca is not None:
        prefix = subject_hash(ca)
        n = 0
        while (directory / f"{prefix}.{n}").exists():
            n += 1
        shutil.copy(ca, directory / f"{prefix}.{n}")
    return directory


def run(mode: str, url: str, env: dict[str, str], runs: int) -> tuple[float, float]:
    tls, wall = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, mode, url], capture_output=True, env=env, cwd=REPO, timeout=60
        )
        wall.append((time.perf_counter() - start) * 1000)
        if out.returncode != 0:
            sys.exit(f"bench_tls_trust: {mode} run failed: {out.stderr.decode()}")
        tls.append(json.loads(out.stdout)["tls_ms"])
    return statistics.median(tls), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    system_file = Path(ssl.get_default_verify_paths().openssl_cafile)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp_name:
        tmp = Path(tmp_name)
        tls = make_tls_files(tmp / "tls")
        server = start_server(tls.cert, tls.key)
        url = f"https://127.0.0.1:{server.server_address[1]}"
        system = system_file.read_bytes() if system_file.is_file() else b""
        big = tmp / "bundle.pem"
        big.write_bytes(system + tls.ca_bundle.read_bytes())
        with_ca = hashed_dir(tmp / "certs", tls.ca_bundle)
        without_ca = hashed_dir(tmp / "certs-without", None)
        drop = ("KVPKI_", "AZURE_", "REQUESTS_CA_BUNDLE", "SSL_CERT_", "HTTPS_PROXY", "https_proxy")
        base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        base.update({"PYTHONPATH": str(REPO), "NO_PROXY": "127.0.0.1", "PYTHONDONTWRITEBYTECODE": "1"})
        print(f"system CA file: {system_file} ({len(system) // 1024} KiB); runs per case: {args.runs}")
        print(f"{'case':<58} {'TLS+request ms':>15} {'process ms':>11}")
        cases = [
            ("default store, CA in directory", "old", with_ca),
            ("default store, CA in directory", "new", with_ca),
            ("default store, CA not in directory (fallback)", "old", without_ca),
            ("default store, CA not in directory (fallback)", "new", without_ca),
        ]
        for label, mode, certs in cases:
            env = {**base, "SSL_CERT_DIR": str(certs), "BENCH_SYSTEM_FILE": str(big)}
            tls_ms, wall_ms = run(mode, url, env, args.runs)
            print(f"{label + ' [' + mode + ']':<58} {tls_ms:>15.1f} {wall_ms:>11.1f}")
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
