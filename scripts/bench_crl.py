#!/usr/bin/env python3
"""Benchmark `kvpki crl` against `openssl ca -gencrl` over the same number of revoked entries.

Creates a local-store CA with `kvpki init-ca`, fills its inventory directly (bulk SQL,
same schema as kvpki's) with N revoked and N valid certificates, writes an openssl
`ca` index.txt holding the same N revoked entries (serials, dates, reasons), then
times both tools (best of --rounds), printing each time, the ratio and the peak RSS
(ru_maxrss) of the kvpki process.  Also times `kvpki list --status revoked --json`.
Goals (issue 8, goal 1): 100k revoked: kvpki <= 0.75x openssl; 1M: <= 15 s and <= 1 GiB.

With --partition-size N the certificates are spread over partitions of N (CRL partitioning, issue 8
goal 2) and `kvpki crl --partition 0` is timed too: one partition's CRL, whatever the CA's size.

Usage: scripts/bench_crl.py [--count 100000] [--backend sqlite|postgres] [--rounds 3] [--partition-size N]
PostgreSQL: KVPKI_BENCH_PG_URL=postgresql://... (an empty database), else a throwaway
cluster is started as in tests/pg_fixture.py.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CA = "bench"
# Reasons both tools spell the same way (openssl ca knows no privilegeWithdrawn).
REASONS = ["keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged", "unspecified"]
FAKE_DER = bytes(range(256)) * 2 + bytes(100)  # ~ a device certificate's size: the rows are as large as real ones


def kvpki_env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPKI_", "AZURE_"))}
    env.update(KVPKI_HOME=str(home), KVPKI_INVENTORY_URL=url, KVPKI_REQUESTER="bench", PYTHONPATH=str(REPO))
    return env


# Runs the measured command from a small process: Linux carries a parent's peak RSS at fork into
# the child's ru_maxrss, and this script holds the whole fill in memory.
MEASURE = """
import os, subprocess, sys, time
with open(sys.argv[1], "wb") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=out, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
sys.stderr.buffer.write(err)
print(os.waitstatus_to_exitcode(status), elapsed, usage.ru_maxrss * 1024)
"""


def run_measured(cmd: list[str], env: dict[str, str] | None, out: Path) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one child process writing stdout to ``out``."""
    result = subprocess.run([sys.executable, "-c", MEASURE, str(out), *cmd], env=env, capture_output=True, text=True)
    code, elapsed, rss = result.stdout.split() if result.returncode == 0 else ("-1", "0", "0")
    if code != "0":
        sys.exit(f"bench_crl: {' '.join(cmd)} failed ({code}): {result.stderr.strip()}")
    return float(elapsed), int(rss)


def make_rows(count: int, now: datetime) -> Iterator[tuple[str, str, str, str | None, str | None]]:
    """(serial, not_after, status, revoked_at, reason) for count revoked then count valid certificates."""
    rng = random.Random(8)
    for index in range(2 * count):
        serial = format(rng.getrandbits(158) | (1 << 158), "x")
        not_after = (now + timedelta(days=30 + rng.randrange(700))).strftime("%Y-%m-%dT%H:%M:%SZ")
        if index < count:
            revoked_at = (now - timedelta(seconds=rng.randrange(365 * 86400))).strftime("%Y-%m-%dT%H:%M:%SZ")
            yield serial, not_after, "revoked", revoked_at, rng.choice(REASONS)
        else:
            yield serial, not_after, "valid", None, None


def fill_sqlite(path: Path, rows: list[tuple[str, str, str, str | None, str | None]], now: datetime) -> None:
    import sqlite3

    not_before = (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO certificates (ca, serial, subject, sans, profile, requester, not_before, not_after,"
        " csr_sha256, der, status, revoked_at, reason) VALUES (?, ?, ?, '[]', 'device', 'bench', ?, ?, ?, ?, ?, ?, ?)",
        (
            (CA, serial, f"CN=dev-{serial[:12]}", not_before, not_after, "0" * 64, FAKE_DER, status, revoked_at, reason)
            for serial, not_after, status, revoked_at, reason in rows
        ),
    )
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def fill_postgres(url: str, rows: list[tuple[str, str, str, str | None, str | None]], now: datetime) -> None:
    import psycopg

    not_before = now - timedelta(days=1)
    with psycopg.connect(url) as db:
        with db.cursor() as cursor, cursor.copy(
            "COPY kvpki_certificates (ca, serial, subject, sans, profile, requester, not_before, not_after,"
            " csr_sha256, der, status, revoked_at, reason) FROM STDIN"
        ) as copy:
            for serial, not_after, status, revoked_at, reason in rows:
                copy.write_row(
                    (CA, serial, f"CN=dev-{serial[:12]}", [], "device", "bench", not_before, not_after,
                     "0" * 64, FAKE_DER, status, revoked_at, reason)
                )  # fmt: skip
        db.commit()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("VACUUM ANALYZE kvpki_certificates")


def compile_package() -> None:
    """Byte-compile kvpki as an installed package is (PYTHONDONTWRITEBYTECODE may be set here), as
    scripts/bench_sign.py does: otherwise every run would compile kvpki's sources first."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "kvpki_cli")], check=True)


def openssl_time(text: str) -> str:
    """"YYYY-MM-DDTHH:MM:SSZ" -> openssl index's YYMMDDHHMMSSZ."""
    return text[2:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16] + text[17:19] + "Z"


def write_openssl_ca(directory: Path, home: Path, rows: list[tuple[str, str, str, str | None, str | None]]) -> Path:
    """index.txt with the revoked entries, the CA's key and certificate, and a matching config."""
    ca_dir = home / "cas" / CA
    lines = []
    for serial, not_after, status, revoked_at, reason in rows:
        if status != "revoked":
            continue
        assert revoked_at is not None and reason is not None
        hex_serial = serial.upper() if len(serial) % 2 == 0 else "0" + serial.upper()
        lines.append(f"R\t{openssl_time(not_after)}\t{openssl_time(revoked_at)},{reason}\t{hex_serial}\tunknown\t/CN=dev\n")
    (directory / "index.txt").write_text("".join(lines))
    (directory / "index.txt.attr").write_text("unique_subject = no\n")
    (directory / "crlnumber").write_text("01\n")
    config = directory / "openssl.cnf"
    config.write_text(
        f"""[ca]
default_ca = bench
[bench]
database = {directory / "index.txt"}
crlnumber = {directory / "crlnumber"}
certificate = {ca_dir / "chain.pem"}
private_key = {ca_dir / "key.pem"}
default_md = sha256
default_crl_days = 7
unique_subject = no
crl_extensions = crl_ext
[crl_ext]
authorityKeyIdentifier = keyid:always
"""
    )
    return config


@contextmanager
def postgres_database() -> Iterator[str]:
    url = os.environ.get("KVPKI_BENCH_PG_URL")
    if url:
        yield url
        return
    import shutil

    from tests.pg_fixture import PostgresServer, _unprivileged_account, find_bindir

    bindir, account = find_bindir(), _unprivileged_account()
    if bindir is None or account is None:
        sys.exit("bench_crl: no PostgreSQL binaries or account to run them; set KVPKI_BENCH_PG_URL")
    base = Path(tempfile.mkdtemp(prefix="kvpki-bench-pg-"))
    os.chown(base, account.pw_uid, account.pw_gid)
    server = PostgresServer(bindir, base, account)
    try:
        server.init()
        server.start()
        yield server.create_database("bench")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def best(label: str, runs: list[tuple[float, int]]) -> tuple[float, int]:
    time_s = min(t for t, _ in runs)
    rss = max(r for _, r in runs)
    times = ", ".join(f"{t:.2f}" for t, _ in runs)
    print(f"{label:<36} best {time_s:7.2f} s  of {times}  peak RSS {rss / 2**20:6.0f} MiB")
    return time_s, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="revoked certificates (as many valid ones too)")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, help="runs per tool, best counts (default 3, 1 above 200k)")
    parser.add_argument("--skip-list", action="store_true", help="do not time `kvpki list`")
    parser.add_argument("--partition-size", type=int, default=0, help="also time one CRL partition of this size")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.count <= 200_000 else 1)

    from kvpki_cli.inventory import open_inventory

    compile_package()
    with tempfile.TemporaryDirectory(prefix="kvpki-bench-crl-") as tmp, (
        postgres_database() if args.backend == "postgres" else _sqlite_url(Path(tmp))
    ) as url:
        work = Path(tmp)
        home = work / "home"
        env = kvpki_env(home, url)
        kvpki = [sys.executable, "-m", "kvpki_cli"]
        subprocess.run([*kvpki, "init-ca", "--name", CA, "--subject", "CN=Bench CA"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        open_inventory(url, home).close()  # the schema, created by kvpki itself
        now = datetime.now(UTC).replace(microsecond=0)
        start = time.perf_counter()
        rows = list(make_rows(args.count, now))
        if args.backend == "postgres":
            fill_postgres(url, rows, now)
        else:
            fill_sqlite(Path(url.removeprefix("sqlite:///")), rows, now)
        config = write_openssl_ca(work, home, rows)
        del rows
        took = time.perf_counter() - start
        print(f"filled {args.backend} with {args.count:,} revoked + {args.count:,} valid in {took:.1f} s")
        partitioned = None
        if args.partition_size:
            partitions = -(-2 * args.count // args.partition_size)
            partition_certificates(url, home, partitions, args.partition_size)
            partitioned = best(f"kvpki crl --partition 0 (of {partitions})", [
                run_measured([*kvpki, "crl", "--ca", CA, "--format", "der", "--partition", "0", "--new"], env,
                             work / "partition.crl")
                for _ in range(rounds)
            ])  # fmt: skip

        ossl = [
            best("openssl ca -gencrl", [
                run_measured(["openssl", "ca", "-gencrl", "-config", str(config), "-out", str(work / "openssl.crl")],
                             None, work / "openssl.out")
                for _ in range(rounds)
            ])
        ]  # fmt: skip
        ours = best("kvpki crl", [
            run_measured([*kvpki, "crl", "--ca", CA, "--format", "der", "--new"], env, work / "kvpki.crl")
            for _ in range(rounds)
        ])  # fmt: skip
        listed = None
        if not args.skip_list:
            listed = best("kvpki list --status revoked --json", [
                run_measured([*kvpki, "list", "--ca", CA, "--status", "revoked", "--json"], env, work / "list.json")
                for _ in range(rounds)
            ])  # fmt: skip

        check = subprocess.run(
            ["openssl", "crl", "-inform", "DER", "-in", str(work / "kvpki.crl"), "-noout", "-verify",
             "-CAfile", str(home / "cas" / CA / "chain.pem")],
            capture_output=True, text=True,
        )  # fmt: skip
        from cryptography import x509

        crl = x509.load_der_x509_crl((work / "kvpki.crl").read_bytes())
        entries = sum(1 for _ in crl)
        ossl_entries = sum(1 for _ in x509.load_pem_x509_crl((work / "openssl.crl").read_bytes()))
        print(f"entries: kvpki {entries:,}, openssl {ossl_entries:,}; kvpki CRL {(work / 'kvpki.crl').stat().st_size:,}"
              f" bytes; openssl crl -verify: {(check.stderr or check.stdout).strip()}")  # fmt: skip
        ratio = ours[0] / ossl[0][0]
        print(f"ratio kvpki/openssl: {ratio:.2f} (goal <= 0.75)")
        if args.count >= 1_000_000:
            print(f"1M goal: {ours[0]:.1f} s (<= 15), peak RSS {ours[1] / 2**30:.2f} GiB (<= 1)")
        if listed:
            print(f"list: {args.count / listed[0]:,.0f} rows/s")
        if partitioned:
            part = x509.load_der_x509_crl((work / "partition.crl").read_bytes())
            print(f"partition 0: {sum(1 for _ in part):,} entries, {(work / 'partition.crl').stat().st_size:,} bytes,"
                  f" {partitioned[0]:.2f} s")  # fmt: skip
        if entries != args.count or "verify OK" not in (check.stderr + check.stdout):
            sys.exit("bench_crl: the kvpki CRL is wrong")


def partition_certificates(url: str, home: Path, partitions: int, size: int) -> None:
    """Spread the filled certificates over ``partitions`` CRL partitions (round robin: each gets its share of
    revoked ones) and configure the CA for them, as if it had issued them with ``crl_partition_size``."""
    (home / "config.toml").write_text(f'[ca.{CA}]\nbase_url = "http://bench.example"\ncrl_partition_size = {size}\n')
    if url.startswith("sqlite"):
        import sqlite3

        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        db.execute("UPDATE certificates SET crl_partition = rowid % ?", (partitions,))
        db.execute("INSERT INTO crl_partitions VALUES (?, ?, ?)", (CA, partitions - 1, size))
        db.execute("ANALYZE")
        db.close()
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("UPDATE kvpki_certificates SET crl_partition = id %% %s", (partitions,))
        pg.execute("INSERT INTO kvpki_crl_partitions VALUES (%s, %s, %s)", (CA, partitions - 1, size))
        pg.execute("VACUUM ANALYZE kvpki_certificates")


@contextmanager
def _sqlite_url(work: Path) -> Iterator[str]:
    yield f"sqlite:///{work / 'inventory.sqlite3'}"


if __name__ == "__main__":
    main()
