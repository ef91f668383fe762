#!/usr/bin/env python3
"""Benchmark one `kvpki sign-csr` process on the azure store against the local store and a naive SDK client.

Starts the Key Vault test server (tests/kvserver) as a subprocess with injected
latency, then measures, per fresh process: median wall time, vault requests and
identity requests (token + discovery).  The naive client does what a
straightforward SDK script does each call: new DefaultAzureCredential (token),
fetch the CA certificate, sign through CryptographyClient.

Usage: scripts/bench_vault.py [--runs 15] [--latency-ms 30]
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
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

REPO = Path(__file__).resolve().parent.parent

NAIVE_CLIENT = r"""
import datetime, hashlib, sys
from azure.identity import DefaultAzureCredential
from azure.keyvault.certificates import CertificateClient
from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

vault, name, bundle = sys.argv[1], sys.argv[2], sys.argv[3]
loopback = dict(verify_challenge_resource=False, connection_verify=bundle)
credential = DefaultAzureCredential(disable_instance_discovery=True, connection_verify=bundle)
ca = CertificateClient(vault, credential, **loopback).get_certificate(name)
issuer = x509.load_der_x509_certificate(bytes(ca.cer))
csr = x509.load_pem_x509_csr(sys.stdin.buffer.read())
now = datetime.datetime.now(datetime.timezone.utc)
tbs = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(issuer.subject)
       .public_key(csr.public_key()).serial_number(x509.random_serial_number())
       .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30)))
crypto = CryptographyClient(ca.key_id, credential, **loopback)

class Signer(ec.EllipticCurvePrivateKey):  # the smallest adapter: sign the TBS through the SDK
    curve = property(lambda self: issuer.public_key().curve)
    key_size = property(lambda self: issuer.public_key().curve.key_size)
    def public_key(self): return issuer.public_key()
    def sign(self, data, algorithm):
        raw = crypto.sign(SignatureAlgorithm.es256, hashlib.sha256(data).digest()).signature
        return utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    def exchange(self, *a): raise NotImplementedError
    def private_numbers(self): raise NotImplementedError
    def private_bytes(self, *a): raise NotImplementedError
    def __copy__(self): return self
    def __deepcopy__(self, memo): return self

cert = tbs.sign(Signer(), hashes.SHA256())
sys.stdout.write(cert.public_bytes(serialization.Encoding.PEM).decode())
"""


def kvpki_command() -> list[str]:
    script = Path(sys.executable).parent / "kvpki"
    if script.exists():
        return [str(script)]
    found = shutil.which("kvpki")
    return [found] if found else [sys.executable, "-m", "kvpki_cli"]


def make_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "bench-device")])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.PEM)
    )


class Server:
    """The test server subprocess and its admin API (request log)."""

    def __init__(self, latency_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kvserver", "--port", "0", "--latency-ms", str(latency_ms)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdout is not None
        self.info: dict[str, Any] = json.loads(self.proc.stdout.readline())
        self.context = ssl.create_default_context(cafile=self.info["ca_bundle"])

    def _admin(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.info["url"] + path, method=method)
        with urllib.request.urlopen(request, context=self.context, timeout=10) as response:
            return json.loads(response.read())

    def clear(self) -> None:
        self._admin("DELETE", "/_admin/log")

    def counts(self) -> tuple[int, int]:
        entries = self._admin("GET", "/_admin/log")["requests"]
        vault = sum(1 for e in entries if e["kind"] == "vault")
        identity = sum(1 for e in entries if e["kind"] in ("token", "discovery"))
        return vault, identity

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure(server: Server | None, cmd: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    times, vault, identity = [], [], []
    for _ in range(runs):
        csr = make_csr()
        if server:
            server.clear()
        start = time.perf_counter()
        result = subprocess.run(cmd, input=csr, capture_output=True, env=env, timeout=120)
        times.append(time.perf_counter() - start)
        if result.returncode != 0 or b"BEGIN CERTIFICATE" not in result.stdout:
            sys.exit(f"bench_vault: {' '.join(cmd[:3])} failed: {result.stderr.decode()}")
        if server:
            v, i = server.counts()
            vault.append(v)
            identity.append(i)
    return {
        "median_ms": statistics.median(times) * 1000,
        "vault": statistics.mean(vault) if vault else 0,
        "identity": statistics.mean(identity) if identity else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    args = parser.parse_args()
    server = Server(args.latency_ms)
    work = Path(tempfile.mkdtemp(prefix="kvpki-bench-vault-"))
    try:
        info = server.info
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
        base["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "netguard"), str(REPO)])
        azure_env = {**base, **info["env"]}
        kvpki = kvpki_command()
        homes = {"azure": work / "azure", "local": work / "local"}
        envs = {
            "azure": {**azure_env, "KVPKI_HOME": str(homes["azure"])},
            "local": {**base, "KVPKI_HOME": str(homes["local"])},
        }
        init_extra = {"azure": ["--store", "azure", "--vault-url", info["url"]], "local": []}
        for store in ("azure", "local"):
            homes[store].mkdir()
            subprocess.run(
                [
                    *kvpki,
                    "init-ca",
                    "--name",
                    "bench",
                    "--subject",
                    "CN=Bench CA",
                    "--key-type",
                    "ec-p256",
                    *init_extra[store],
                ],
                env=envs[store],
                check=True,
                capture_output=True,
                timeout=120,
            )
        sign = [*kvpki, "sign-csr", "--ca", "bench"]
        measure(server, sign, envs["azure"], 1)  # warm-up: caches are filled by init-ca already
        results = {
            "kvpki sign-csr, azure store (warm caches)": measure(server, sign, envs["azure"], args.runs),
            "kvpki sign-csr, local store": measure(None, sign, envs["local"], args.runs),
        }
        (work / "naive.py").write_text(NAIVE_CLIENT)
        naive = [sys.executable, str(work / "naive.py"), info["url"], "bench", info["ca_bundle"]]
        results["naive SDK client (token + CA fetch + sign)"] = measure(server, naive, azure_env, args.runs)
        cold_env = envs["azure"]
        cold_times = []
        for _ in range(max(3, args.runs // 3)):
            shutil.rmtree(homes["azure"] / "cache", ignore_errors=True)
            cold_times.append(measure(server, sign, cold_env, 1))
        results["kvpki sign-csr, azure store (cold caches)"] = {
            key: statistics.median(r[key] for r in cold_times) for key in ("median_ms", "vault", "identity")
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"Key Vault test server latency: {args.latency_ms:g} ms per request; {args.runs} runs per row")
    print(f"{'client':48} {'median ms':>10} {'vault req':>10} {'identity req':>13}")
    for label, row in results.items():
        print(f"{label:48} {row['median_ms']:10.1f} {row['vault']:10.1f} {row['identity']:13.1f}")


if __name__ == "__main__":
    main()
