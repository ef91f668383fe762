"""Checks that use outside tools: openssl for chains and CRLs, pkilint for RFC 5280 linting."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding


def _pkilint_tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    return found


def pkilint_findings(path: Path, kind: str = "cert") -> str:
    """pkilint findings of severity NOTICE or worse ('' when clean)."""
    if kind == "cert":
        cmd = [_pkilint_tool("lint_pkix_cert"), "lint", "-s", "NOTICE", str(path)]
    elif kind == "ocsp":
        cmd = [_pkilint_tool("lint_ocsp_response"), "lint", "-s", "NOTICE", str(path)]
    else:
        cmd = [_pkilint_tool("lint_crl"), "lint", "-t", "CRL", "-p", "PKIX", "-s", "NOTICE", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    if result.returncode not in (0, 1):
        raise AssertionError(f"pkilint failed to run: {output}")
    return output


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def openssl_verify(
    tmp: Path, root: bytes, leaf: bytes, untrusted: bytes = b"", *extra: str
) -> subprocess.CompletedProcess[str]:
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(write(tmp / "v-root.pem", root))]
    if untrusted:
        args += ["-untrusted", str(write(tmp / "v-untrusted.pem", untrusted))]
    args += [*extra, str(write(tmp / "v-leaf.pem", leaf))]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def openssl(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed: {result.stderr.decode()}")
    return result


def ec_csr_pem(name: str) -> bytes:
    """A P-256 CSR with CN=name, made in-process (fast, for load tests)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.PEM)
    )
