"""Many kvpki processes signing on one CA at once (an EST façade shelling out under load)."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

from cryptography import x509

from tests.conftest import KVPKI, Kvpki
from tests.helpers import ec_csr_pem

WORKERS = 8
SIGNATURES_PER_WORKER = 50


def test_parallel_processes_get_one_row_each_and_distinct_serials(local_kvpki: Kvpki) -> None:
    kvpki = local_kvpki
    kvpki.init_ca("busy", "--subject", "CN=Busy CA")
    csrs = {f"w{w}-d{i}": ec_csr_pem(f"w{w}-d{i}") for w in range(WORKERS) for i in range(SIGNATURES_PER_WORKER)}

    def worker(w: int) -> list[tuple[str, x509.Certificate]]:
        issued = []
        for i in range(SIGNATURES_PER_WORKER):
            name = f"w{w}-d{i}"
            result = subprocess.run(
                [*KVPKI, "sign-csr", "--ca", "busy"], input=csrs[name], capture_output=True, env=kvpki.env, timeout=120
            )
            assert result.returncode == 0, result.stderr.decode()
            issued.append((name, x509.load_pem_x509_certificate(result.stdout)))
        return issued

    with ThreadPoolExecutor(WORKERS) as pool:
        results = [item for batch in pool.map(worker, range(WORKERS)) for item in batch]

    assert len(results) == WORKERS * SIGNATURES_PER_WORKER
    serials = [format(cert.serial_number, "x") for _, cert in results]
    assert len(set(serials)) == len(serials)
    rows = kvpki.inventory("busy")
    assert sorted(row["serial"] for row in rows) == sorted(serials)
    by_serial = {row["serial"]: row["subject"] for row in rows}
    assert all(by_serial[format(cert.serial_number, "x")] == f"CN={name}" for name, cert in results)
