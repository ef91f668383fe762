#!/usr/bin/env python3
"""Benchmark the Key Vault signing budget: how close kvpki runs to the vault's limit without 429 storms.

Starts the Key Vault test server (tests/kvserver) with injected latency and a
throttle that answers 429 Throttled to sign requests above a limit per sliding
window (default 2,000 per 10 s, Key Vault's EC HSM budget), one EC P-256 HSM CA
(default ``sign_rate``: 95% of that limit), then runs in one go:

1. a batch: ``kvpki sign-csr --out-dir D`` over N CSRs with the default ``--jobs``;
2. an EST load: N ``simpleenroll`` requests against ``kvpki serve`` over TLS;
3. the sequential baseline: the same batch with ``--jobs 1``.

For each it prints the sustained signing rate (vault signatures answered 200
between the first and the last, from the server's request log) against the limit,
the share of sign requests answered 429, the wall time, and checks every
certificate was issued (files/answers and inventory rows).  The throttle window
is reset between phases (each phase is a fresh process with a fresh governor).

Usage: scripts/bench_vault_budget.py [--count 3000] [--latency-ms 30] [--limit 2000] [--window 10]
                                     [--baseline-count 3000] [--est-connections 64] [--est-concurrency 24]
                                     [--ungoverned]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

REPO = Path(__file__).resolve().parent.parent
KVPKI = [sys.executable, "-m", "kvpki_cli"]
PASSWORD = "bench-password-1"


class Vault:
    """The test server process and its admin API."""

    def __init__(self, latency_ms: float, limit: int, window: float, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kvserver", "--latency-ms", str(latency_ms), "--token-latency-ms", "0",
             "--throttle", f"{limit}/{window}"],
            stdout=subprocess.PIPE, env=env, cwd=REPO,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.info: dict[str, Any] = json.loads(self.proc.stdout.readline())
        self.context = ssl.create_default_context(cafile=self.info["ca_bundle"])
        self.limit, self.window = limit, window

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.info["url"] + path, data=data, method=method)
        with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
            return json.loads(response.read())

    def fresh_phase(self) -> None:
        self._admin("DELETE", "/_admin/log")
        self._admin("POST", "/_admin/throttle", {"limit": self.limit, "window_s": self.window})

    def signs(self) -> list[dict[str, Any]]:
        entries = self._admin("GET", "/_admin/log")["requests"]
        return [e for e in entries if e["method"] == "POST" and e["path"].rstrip("/").endswith("/sign")]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Result(NamedTuple):
    label: str
    issued: int
    expected: int
    wall_s: float
    signs_ok: int
    throttled: int
    sustained: float  # signatures/s between the first and last accepted signature
    worst_window: int  # most accepted signatures in any window of the throttle's length

    def line(self, limit_rate: float) -> str:
        requests = self.signs_ok + self.throttled
        share = self.throttled / requests * 100 if requests else 0.0
        return (
            f"{self.label:34} {self.issued:>5}/{self.expected:<5} {self.wall_s:8.1f} {self.issued / self.wall_s:9.1f}"
            f" {self.sustained:10.1f} {self.sustained / limit_rate * 100:6.1f}% {self.throttled:6} {share:6.2f}%"
            f" {self.worst_window:8}"
        )


def summarize(label: str, vault: Vault, issued: int, expected: int, wall: float) -> Result:
    signs = vault.signs()
    ok = sorted(e["at"] for e in signs if e["status"] == 200)
    throttled = sum(1 for e in signs if e["status"] == 429)
    span = ok[-1] - ok[0] if len(ok) > 1 else 0.0
    sustained = (len(ok) - 1) / span if span > 0 else 0.0
    worst, start = 0, 0
    for end, stamp in enumerate(ok):  # sliding window over accepted signatures
        while stamp - ok[start] >= vault.window:
            start += 1
        worst = max(worst, end - start + 1)
    return Result(label, issued, expected, wall, len(ok), throttled, sustained, worst)


def run(env: dict[str, str], *args: str, stdin: bytes | None = None, timeout: float = 900) -> bytes:
    result = subprocess.run([*KVPKI, *args], input=stdin, capture_output=True, env=env, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"bench_vault_budget: kvpki {' '.join(args[:4])} ... failed: {result.stderr.decode().strip()}")
    return result.stdout


def csr_der(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


def batch(env: dict[str, str], vault: Vault, home: Path, csrs: list[Path], jobs: int | None, label: str) -> Result:
    out = home / f"out-{label.split()[0]}-{jobs or 'default'}"
    vault.fresh_phase()
    before = len(json.loads(run(env, "list", "--ca", "bench", "--json")))
    extra = ["--jobs", str(jobs)] if jobs else []
    start = time.perf_counter()
    run(env, "sign-csr", "--ca", "bench", "--out-dir", str(out), *extra, *map(str, csrs))
    wall = time.perf_counter() - start
    files = len(list(out.glob("*.pem")))
    rows = len(json.loads(run(env, "list", "--ca", "bench", "--json"))) - before
    return summarize(label, vault, min(files, rows), len(csrs), wall)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_serve(home: Path, env: dict[str, str], port: int, concurrency: int) -> Path:
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
        f'users_file = "users"\nsigning_concurrency = {concurrency}\nmax_connections_per_client = 1024\n\n'
        '[est.default]\nca = "bench"\nprofile = "device"\nusers = ["bench"]\n'
    )
    return config


async def est_load(
    url: str, root: Path, warmup: list[bytes], bodies: list[bytes], connections: int, measure: Any
) -> tuple[int, dict[int, int]]:
    """POST every body once over ``connections`` keep-alive TLS connections; (certificates, other statuses).

    Each connection first enrolls one of ``warmup`` (TLS handshake and the one slow password check per
    connection, as a long-running client fleet has already paid them); ``measure()`` then starts the clock.
    """
    context = ssl.create_default_context(cafile=str(root))
    connector = aiohttp.TCPConnector(limit=connections, ssl=context)
    credentials = base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
    headers = {"Content-Type": "application/pkcs10", "Authorization": f"Basic {credentials}"}
    queue = iter(bodies)
    issued = 0
    failures: dict[int, int] = {}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        for body in queue:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    issued += 1
                else:
                    failures[response.status] = failures.get(response.status, 0) + 1

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        queue = iter(warmup)
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        issued, failures = 0, {}
        measure()
        queue = iter(bodies)
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return issued, failures


def est(
    env: dict[str, str], vault: Vault, home: Path, count: int, connections: int, concurrency: int, label: str
) -> Result:
    port = free_port()
    config = prepare_serve(home, env, port, concurrency)
    bodies = [base64.b64encode(csr_der(f"est-device-{i}")) for i in range(count + connections)]
    warmup, bodies = bodies[:connections], bodies[connections:]
    log_path = home / "serve.log"
    before = len(json.loads(run(env, "list", "--ca", "bench", "--json")))
    with log_path.open("wb") as log:
        server = subprocess.Popen([*KVPKI, "serve", "--config", str(config)], stderr=log, env=env)
    try:
        deadline = time.monotonic() + 30
        while "listening on https" not in log_path.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench_vault_budget: serve did not start: {log_path.read_text()}")
            time.sleep(0.05)
        started: list[float] = []

        def measure() -> None:
            vault.fresh_phase()
            started.append(time.perf_counter())

        url = f"https://127.0.0.1:{port}/.well-known/est/simpleenroll"
        issued, failures = asyncio.run(est_load(url, home / "root.pem", warmup, bodies, connections, measure))
        wall = time.perf_counter() - started[0]
    finally:
        server.terminate()
        server.wait(10)
    rows = len(json.loads(run(env, "list", "--ca", "bench", "--json"))) - before - connections  # minus warm-up
    if failures:
        print(f"EST answers other than 200: {failures}")
    return summarize(label, vault, min(issued, rows), count, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--baseline-count", type=int, default=3000, help="CSRs for the --jobs 1 baseline (0: skip)")
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--limit", type=int, default=2000, help="vault sign requests allowed per window")
    parser.add_argument("--window", type=float, default=10.0, help="the throttle's sliding window, seconds")
    parser.add_argument("--est-connections", type=int, default=64)
    parser.add_argument("--est-concurrency", type=int, default=24, help="serve signing_concurrency")
    parser.add_argument("--skip-est", action="store_true")
    parser.add_argument(
        "--ungoverned", action="store_true", help="also run the EST load with sign_rate 100000 (no governor)"
    )
    args = parser.parse_args()
    if not 1 <= args.count <= 100_000 or not 0 <= args.baseline_count <= 100_000:
        sys.exit("bench_vault_budget: --count must be 1..100000, --baseline-count 0..100000")
    limit_rate = args.limit / args.window

    base = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    base["PYTHONPATH"] = str(REPO)
    work = Path(tempfile.mkdtemp(prefix="kvpki-bench-budget-"))
    vault = Vault(args.latency_ms, args.limit, args.window, base)
    results: list[Result] = []
    try:
        env = {**base, **vault.info["env"], "KVPKI_HOME": str(work)}
        root = run(env, "init-ca", "--name", "bench", "--subject", "CN=Budget Bench CA", "--key-type", "ec-p256",
                   "--store", "azure", "--vault-url", vault.info["url"], "--hsm")  # fmt: skip
        (work / "root.pem").write_bytes(root)
        csr_dir = work / "csrs"
        csr_dir.mkdir()
        csrs = []
        for i in range(max(args.count, args.baseline_count)):
            path = csr_dir / f"device-{i:06d}.csr"
            path.write_bytes(csr_der(f"device-{i:06d}"))
            csrs.append(path)
        results.append(batch(env, vault, work, csrs[: args.count], None, "batch sign-csr --out-dir (default)"))
        print(results[-1].label, "done", flush=True)
        if not args.skip_est:
            label = f"EST simpleenroll, {args.est_concurrency} workers"
            results.append(est(env, vault, work, args.count, args.est_connections, args.est_concurrency, label))
            print(results[-1].label, "done", flush=True)
        if args.ungoverned:
            (work / "config.toml").write_text("[ca.bench.store_settings]\nsign_rate = 100000\n")
            label = "EST, sign_rate 100000 (ungoverned)"
            results.append(est(env, vault, work, args.count, args.est_connections, args.est_concurrency, label))
            (work / "config.toml").unlink()
            print(results[-1].label, "done", flush=True)
        if args.baseline_count:
            results.append(batch(env, vault, work, csrs[: args.baseline_count], 1, "baseline sign-csr --jobs 1"))
    finally:
        vault.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nKey Vault test server: {args.latency_ms:g} ms latency, throttle {args.limit} signatures per "
        f"{args.window:g} s (= {limit_rate:g}/s); EC P-256 HSM CA, default sign_rate"
    )
    print(
        f"{'run':34} {'issued':>11} {'wall s':>8} {'certs/s':>9} {'sustained':>10} {'of lim':>7} {'429s':>6}"
        f" {'429 %':>7} {'max/win':>8}"
    )
    for result in results:
        print(result.line(limit_rate))
    failed = [r.label for r in results if r.issued != r.expected]
    if failed:
        sys.exit(f"bench_vault_budget: not every certificate was issued: {', '.join(failed)}")


if __name__ == "__main__":
    main()
