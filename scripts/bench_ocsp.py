#!/usr/bin/env python3
"""OCSP throughput of one `kvpki serve`: cached responses/s (POST and GET) beside the uncached rate.

Sets up a throwaway KVPKI_HOME (local store: root -> issuing CA, a delegated
responder from `kvpki init-ocsp-responder`, ``--serials`` issued certificates),
starts `kvpki serve` with a plain-HTTP port and sends a bounded number of OCSP
requests over keep-alive connections from several client processes (a minimal
HTTP/1.1 client on raw sockets, so the clients cost the shared CPU little):

* cached POST / cached GET: nonce-less requests for the issued serials (after one
  warm-up request each, every answer comes from memory);
* uncached, nonce: each request carries a new nonce, echoed: one responder-key
  signature per request (``ocsp_nonces = "echo"``, the default);
* uncached, distinct serials: serials the inventory does not know, each asked once
  (an inventory read and a responder signature per request, like the first
  request for each certificate of a fleet).

The clients run on the same machine as the server: on a small machine they take
part of the CPU the server would otherwise have.  Example:
    .venv/bin/python scripts/bench_ocsp.py --requests 5000 --processes 2 --connections 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

REPO = Path(__file__).resolve().parent.parent
KVPKI = [sys.executable, "-m", "kvpki_cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(env: dict[str, str], *args: str, input: bytes | None = None) -> bytes:
    result = subprocess.run([*KVPKI, *args], input=input, capture_output=True, env=env, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"kvpki {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout


def csr_pem(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def setup(
    home: Path, env: dict[str, str], serials: int, http_port: int, responder: bool
) -> tuple[x509.Certificate, list[int]]:
    run(env, "init-ca", "--name", "root", "--subject", "CN=Bench Root")
    issuer = x509.load_pem_x509_certificate(
        run(env, "init-ca", "--name", "issuing", "--parent", "root", "--subject", "CN=Bench Issuing CA")
    )
    if responder:
        run(env, "init-ocsp-responder", "--ca", "issuing")
    csr_dir, out_dir = home / "csrs", home / "certs"
    csr_dir.mkdir()
    for i in range(serials):
        (csr_dir / f"dev{i}.csr").write_bytes(csr_pem(f"dev{i}"))
    run(env, "sign-csr", *map(str, sorted(csr_dir.iterdir())), "--ca", "issuing", "--out-dir", str(out_dir))
    numbers = [x509.load_pem_x509_certificate(p.read_bytes()).serial_number for p in sorted(out_dir.iterdir())]
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(home / "tls.key"), "-out", str(home / "tls.pem"), "-subj", "/CN=localhost",
                    "-days", "2"], check=True, capture_output=True)  # fmt: skip
    tls_port = next(p for p in iter(free_port, None) if p != http_port)
    (home / "serve.toml").write_text(
        f'[server]\nport = {tls_port}\nhttp_port = {http_port}\ntls_cert = "tls.pem"\ntls_key = "tls.key"\n'
        'max_connections_per_client = 1024\n[est.default]\nca = "issuing"\n'
    )
    return issuer, numbers


def ocsp_request(issuer: x509.Certificate, serial: int, nonce: bytes | None = None) -> bytes:
    from kvpki_cli.pki.ocsp import _digest, _key_bits

    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        _digest(hashes.SHA1(), issuer.subject.public_bytes()), _digest(hashes.SHA1(), _key_bits(issuer)), serial,
        hashes.SHA1(),
    )  # fmt: skip
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def http_post(der: bytes) -> bytes:
    head = "POST /ocsp/issuing HTTP/1.1\r\nHost: bench\r\nContent-Type: application/ocsp-request\r\n"
    return (head + f"Content-Length: {len(der)}\r\n\r\n").encode() + der


def http_get(der: bytes) -> bytes:
    path = "/ocsp/issuing/" + urllib.parse.quote(base64.b64encode(der).decode(), safe="")
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


async def _connection(port: int, requests: list[bytes], latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    failures = 0
    for request in requests:
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - start)
        failures += not head.startswith(b"HTTP/1.1 200")
    writer.close()
    return failures


def _client(port: int, batches: list[list[bytes]], barrier: object, results: object) -> None:
    async def main() -> tuple[float, int, list[float]]:
        latencies: list[float] = []
        barrier.wait()  # type: ignore[attr-defined]
        start = time.perf_counter()
        failures = await asyncio.gather(*(_connection(port, batch, latencies) for batch in batches))
        return time.perf_counter() - start, sum(failures), latencies

    results.put(asyncio.run(main()))  # type: ignore[attr-defined]


def phase(port: int, requests: list[bytes], processes: int, connections: int) -> tuple[float, int, list[float]]:
    """Send ``requests`` spread over processes x connections; (wall seconds, failures, latencies)."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    slices = [requests[i :: processes * connections] for i in range(processes * connections)]
    workers = [
        ctx.Process(target=_client, args=(port, slices[p * connections : (p + 1) * connections], barrier, results))
        for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    outcomes = [results.get(timeout=600) for _ in workers]
    elapsed = time.perf_counter() - start
    for worker in workers:
        worker.join()
    latencies = [lat for outcome in outcomes for lat in outcome[2]]
    return elapsed, sum(outcome[1] for outcome in outcomes), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per cached phase (default 4000)")
    parser.add_argument("--uncached", type=int, default=1000, help="requests per uncached phase (default 1000)")
    parser.add_argument("--serials", type=int, default=10, help="issued certificates asked about (default 10)")
    parser.add_argument("--processes", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections per process (default 8)")
    parser.add_argument("--no-responder", action="store_true", help="sign with the CA key (no init-ocsp-responder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvpki-bench-ocsp-") as tmp:
        home = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
        env.update({"KVPKI_HOME": str(home), "PYTHONPATH": str(REPO), "KVPKI_REQUESTER": "bench"})
        port = free_port()
        issuer, serials = setup(home, env, args.serials, port, not args.no_responder)
        log = (home / "serve.log").open("wb")
        server = subprocess.Popen([*KVPKI, "serve", "--config", str(home / "serve.toml")], stdout=log, stderr=log,
                                  env=env, cwd=home)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while b"listening on https" not in (home / "serve.log").read_bytes():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("kvpki serve did not start: " + (home / "serve.log").read_text())
                time.sleep(0.05)
            known = [ocsp_request(issuer, s) for s in serials]
            phase(port, [http_post(der) for der in known], 1, 1)  # warm-up: one signature per serial
            plans = {
                "cached POST": [http_post(known[i % len(known)]) for i in range(args.requests)],
                "cached GET": [http_get(known[i % len(known)]) for i in range(args.requests)],
                "uncached POST, nonce": [
                    http_post(ocsp_request(issuer, serials[i % len(serials)], os.urandom(16)))
                    for i in range(args.uncached)
                ],
                "uncached POST, new serial": [
                    http_post(ocsp_request(issuer, int.from_bytes(os.urandom(19), "big") | 1))
                    for _ in range(args.uncached)
                ],
            }
            print(f"kvpki serve OCSP, {os.cpu_count()} CPUs (clients on the same machine), "
                  f"{args.processes} client processes x {args.connections} keep-alive connections, "
                  f"signer: {'CA key' if args.no_responder else 'delegated responder'}")  # fmt: skip
            print(f"{'mode':28} {'requests':>8} {'seconds':>8} {'responses/s':>12} {'p50 ms':>7} {'p99 ms':>7} fail")
            for name, requests in plans.items():
                elapsed, failures, latencies = phase(port, requests, args.processes, args.connections)
                latencies.sort()
                p50 = statistics.median(latencies) * 1000
                p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
                print(f"{name:28} {len(requests):8d} {elapsed:8.2f} {len(requests) / elapsed:12.0f} "
                      f"{p50:7.1f} {p99:7.1f} {failures}")  # fmt: skip
        finally:
            server.terminate()
            server.wait(10)
            log.close()


if __name__ == "__main__":
    main()
