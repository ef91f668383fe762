#!/usr/bin/env python3
"""Benchmark `kvpki sign-csr` on the local store against baselines measured in the same run.

Prints the median wall time of one `kvpki sign-csr` process, of `openssl x509 -req`
on the same CSR, and of `python -c "import cryptography.x509"` (the floor for any
Python tool built on cryptography), then the batch throughput of one call signing
1,000 CSRs into --out-dir.  Goals: single call <= 1.3x the import floor; batch >=
1,000 certificates/s with an EC P-256 CA.

Usage: scripts/bench_sign.py [--runs 30] [--batch 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding


def kvpki_command() -> list[str]:
    script = Path(sys.executable).parent / "kvpki"
    if script.exists():
        return [str(script)]
    found = shutil.which("kvpki")
    if not found:
        sys.exit("bench_sign: the kvpki console script is not installed (pip install -e .)")
    return [found]


def compile_package() -> None:
    """Byte-compile kvpki as an installed package would be (PYTHONDONTWRITEBYTECODE may be set here)."""
    import kvpki_cli

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(kvpki_cli.__file__).parent)], check=True)


def make_csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.PEM)


def timed(cmd: list[str], stdin: bytes | None, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, input=stdin, capture_output=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"bench_sign: {' '.join(cmd)} failed: {result.stderr.decode().strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()

    kvpki = kvpki_command()
    compile_package()
    with tempfile.TemporaryDirectory(prefix="kvpki-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = dict(os.environ, KVPKI_HOME=str(tmp / "home"), KVPKI_REQUESTER="bench")
        subprocess.run(
            [*kvpki, "init-ca", "--name", "bench", "--subject", "CN=Bench CA"], env=env, check=True, capture_output=True
        )
        ca_dir = tmp / "home" / "cas" / "bench"
        csr = make_csr("bench-device")
        csr_path = tmp / "device.csr"
        csr_path.write_bytes(csr)
        ext = tmp / "ext.cnf"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        commands = {
            "kvpki sign-csr (local store)": ([*kvpki, "sign-csr", "--ca", "bench"], csr),
            "openssl x509 -req": (
                [
                    "openssl",
                    "x509",
                    "-req",
                    "-in",
                    str(csr_path),
                    "-CA",
                    str(ca_dir / "chain.pem"),
                    "-CAkey",
                    str(ca_dir / "key.pem"),
                    "-set_serial",
                    "0x" + os.urandom(19).hex(),
                    "-days",
                    "365",
                    "-extfile",
                    str(ext),
                    "-sha256",
                ],
                None,
            ),
            "python -c 'import cryptography.x509'": ([sys.executable, "-c", "import cryptography.x509"], None),
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for cmd, stdin in commands.values():  # warm-up (page cache, .pyc)
            timed(cmd, stdin, env)
        for _ in range(args.runs):  # interleaved, so machine noise hits all alike
            for name, (cmd, stdin) in commands.items():
                samples[name].append(timed(cmd, stdin, env))
        medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
        floor = medians["python -c 'import cryptography.x509'"]
        print(f"single call, median of {args.runs} runs:")
        for name, value in medians.items():
            print(f"  {name:<40} {value:8.1f} ms   {value / floor:5.2f}x import floor")

        batch_dir = tmp / "batch"
        batch_dir.mkdir()
        files = []
        for i in range(args.batch):
            path = batch_dir / f"dev{i:05d}.csr"
            path.write_bytes(make_csr(f"batch-{i:05d}"))
            files.append(str(path))
        start = time.perf_counter()
        subprocess.run(
            [*kvpki, "sign-csr", *files, "--ca", "bench", "--out-dir", str(tmp / "out")],
            env=env,
            check=True,
            capture_output=True,
        )
        elapsed = time.perf_counter() - start
        issued = len(list((tmp / "out").iterdir()))
        print(
            f"batch: {issued} certificates in one call: {elapsed:.2f} s = {issued / elapsed:,.0f} certificates/s"
            " (EC P-256 CA, including process start and inventory commit)"
        )


if __name__ == "__main__":
    main()
