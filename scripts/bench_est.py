#!/usr/bin/env python3
"""Benchmark `kvpki serve` EST enrollment over TLS on loopback: enrollments/s and latency percentiles.

Sets up a throwaway KVPKI_HOME (root CA, server certificate, one EST user),
starts `kvpki serve` as a subprocess, pre-generates CSRs, then runs a fixed
number of `simpleenroll` requests from an aiohttp client with N keep-alive TLS
connections.  Every request must succeed, and the inventory must hold exactly
one row per enrollment afterwards.

With ``--store azure`` the CA key lives in the Key Vault test server
(``python -m tests.kvserver``) with injected latency; throughput should then be
about signing_concurrency / latency.

Usage: scripts/bench_est.py [--count 3000] [--connections 32] [--concurrency 4]
                            [--store local|azure] [--latency-ms 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

REPO = Path(__file__).resolve().parent.parent
KVPKI = [sys.executable, "-m", "kvpki_cli"]
PASSWORD = "bench-password-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(env: dict[str, str], *args: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run([*KVPKI, *args], input=stdin, capture_output=True, env=env, timeout=120)
    if result.returncode != 0:
        sys.exit(f"bench_est: kvpki {' '.join(args)} failed: {result.stderr.decode().strip()}")
    return result.stdout


def start_vault(latency_ms: float, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """The Key Vault test server as a process, and the variables kvpki needs to use it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.kvserver", "--latency-ms", str(latency_ms), "--token-latency-ms", "0"],
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    assert process.stdout is not None
    info = json.loads(process.stdout.readline())
    return process, {**info["env"], "_VAULT_URL": info["url"]}


def prepare(home: Path, env: dict[str, str], port: int, concurrency: int, vault_url: str | None) -> Path:
    store = ["--store", "azure", "--vault-url", vault_url] if vault_url else []
    (home / "root.pem").write_bytes(run(env, "init-ca", "--name", "bench", "--subject", "CN=Bench CA", *store))
    key = ec.generate_private_key(ec.SECP256R1())
    (home / "server.key").write_bytes(
        key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
        .sign(key, hashes.SHA256())
    )
    (home / "server.csr").write_bytes(csr.public_bytes(Encoding.PEM))
    chain = run(env, "sign-csr", str(home / "server.csr"), "--ca", "bench", "--profile", "server",
                "--san", "IP:127.0.0.1", "--san", "DNS:localhost", "--chain")  # fmt: skip
    (home / "server-chain.pem").write_bytes(chain)
    run(env, "serve-passwd", str(home / "users"), "bench", "--password-stdin", stdin=PASSWORD.encode() + b"\n")
    config = home / "serve.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\ntls_cert = "server-chain.pem"\ntls_key = "server.key"\n'
        f'users_file = "users"\nsigning_concurrency = {concurrency}\n'
        "max_connections_per_client = 1024\n\n"  # every benchmark connection comes from 127.0.0.1
        '[est.default]\nca = "bench"\nprofile = "device"\nusers = ["bench"]\n'
    )
    return config


def make_bodies(count: int) -> list[bytes]:
    """Pre-generated CSR bodies (base64, as clients send them) so the client measures the server."""
    bodies = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"bench-device-{index}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        bodies.append(base64.b64encode(csr.public_bytes(Encoding.DER)))
    return bodies


async def load(url: str, root: Path, bodies: list[bytes], connections: int, deadline_s: float) -> list[float]:
    """POST every body once over ``connections`` keep-alive TLS connections; returns latencies (s)."""
    context = ssl.create_default_context(cafile=str(root))
    connector = aiohttp.TCPConnector(limit=connections, ssl=context, force_close=False)
    credentials = base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
    headers = {"Content-Type": "application/pkcs10", "Authorization": f"Basic {credentials}"}
    latencies: list[float] = []
    queue = iter(bodies)
    stop_at = time.monotonic() + deadline_s

    async def worker(session: aiohttp.ClientSession) -> None:
        for body in queue:
            if time.monotonic() > stop_at:
                return
            start = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                payload = await response.read()
                if response.status != 200:
                    raise SystemExit(f"bench_est: HTTP {response.status}: {payload[:200]!r}")
            latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up: the first request per connection pays for TLS and the one slow password check.
        async with session.post(url, data=bodies[0], headers=headers) as response:
            await response.read()
        queue = iter(bodies[1:])
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="enrollments (bounded)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent client connections")
    parser.add_argument("--concurrency", type=int, default=4, help="server signing_concurrency")
    parser.add_argument("--store", choices=("local", "azure"), default="local")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="Key Vault test server latency (azure)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop the load after this long")
    args = parser.parse_args()
    if not 1 <= args.count <= 100_000 or not 1 <= args.connections <= 512:
        sys.exit("bench_est: --count must be 1..100000 and --connections 1..512")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    with tempfile.TemporaryDirectory(prefix="bench-est-") as tmp:
        home = Path(tmp)
        env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(REPO)})
        vault = None
        vault_url = None
        if args.store == "azure":
            vault, extra = start_vault(args.latency_ms, env)
            vault_url = extra.pop("_VAULT_URL")
            env.update(extra)
        port = free_port()
        server = None
        try:
            config = prepare(home, env, port, args.concurrency, vault_url)
            bodies = make_bodies(args.count + 1)
            log = (home / "serve.log").open("wb")
            server = subprocess.Popen([*KVPKI, "serve", "--config", str(config)], stderr=log, env=env)
            deadline = time.monotonic() + 30
            while "listening on https" not in (home / "serve.log").read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"bench_est: server did not start: {(home / 'serve.log').read_text()}")
                time.sleep(0.05)
            url = f"https://127.0.0.1:{port}/.well-known/est/simpleenroll"
            started = time.perf_counter()
            latencies = asyncio.run(load(url, home / "root.pem", bodies, args.connections, args.max_seconds))
            elapsed = time.perf_counter() - started
            rows = json.loads(run(env, "list", "--ca", "bench", "--json"))
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
            if vault is not None:
                vault.terminate()
                vault.wait(10)
    done = len(latencies)
    store = f"azure (test vault, {args.latency_ms:g} ms latency)" if args.store == "azure" else "local"
    print(f"store: {store}; signing_concurrency={args.concurrency}; client connections={args.connections}")
    print(f"enrollments: {done} in {elapsed:.2f} s = {done / elapsed:.0f} enrollments/s")
    print(
        f"latency ms: p50={percentile(latencies, 0.5) * 1000:.1f} p95={percentile(latencies, 0.95) * 1000:.1f} "
        f"p99={percentile(latencies, 0.99) * 1000:.1f} mean={statistics.mean(latencies) * 1000:.1f}"
    )
    print(f"inventory rows: {len(rows)} (expected {done + 1} enrollments + server certificate = {done + 2})")
    if len(rows) != done + 2:
        sys.exit("bench_est: inventory does not match the enrollments")


if __name__ == "__main__":
    main()
