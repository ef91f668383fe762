"""`sign-csr --out-dir` never loses a certificate: no row without its file (after recovery), no file without its row.

Failures are real where the kernel allows (a full tmpfs, a read-only mount, a
dangling symlink, kill -9 at random points and at each phase of the write
protocol); every issued certificate stays recoverable with `get-cert`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvpki_cli.outdir import PREFIX
from tests.conftest import KVPKI, Kvpki
from tests.helpers import load_cert, openssl, write

BATCH = int(os.environ.get("KVPKI_KILL_BATCH", "200"))  # the issue saw it with 3,000


def write_csrs(directory: Path, count: int, stem: str = "dev") -> list[str]:
    """``count`` CSR files (one key, distinct CNs): made in-process because only the batch size matters here."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    paths = []
    for i in range(count):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{stem}-{i}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        path = directory / f"{stem}-{i}.csr"
        path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        paths.append(str(path))
    return paths


def rows_by(kvpki: Kvpki, ca: str, requester: str) -> list[dict[str, object]]:
    return [row for row in kvpki.inventory(ca) if row["requester"] == requester]


def stray(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(PREFIX)]


def outputs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


@pytest.fixture
def ca(local_kvpki: Kvpki) -> Kvpki:
    local_kvpki.init_ca("batch", "--subject", "CN=Batch CA")
    return local_kvpki


@contextlib.contextmanager
def tmpfs(mountpoint: Path, *options: str) -> Iterator[Path]:
    """A real small or read-only filesystem (needs root and mount(2); skipped otherwise)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(("mode=0755", *options)), "kvpki-test", str(mountpoint)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def assert_refused_cleanly(result: subprocess.CompletedProcess[bytes], code: int, ca: Kvpki, requester: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stdout == b""
    assert result.stderr.count(b"kvpki: error:") == 1 and b"Traceback" not in result.stderr
    assert rows_by(ca, "batch", requester) == []


def test_dangling_symlink_or_any_existing_name_refuses_before_signing(ca: Kvpki, tmp_path: Path) -> None:
    files = write_csrs(tmp_path / "csrs", 5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dev-3.pem").symlink_to(tmp_path / "nowhere")  # dangling: exists() says False, link() says EEXIST
    result = ca.run("sign-csr", *files, "--ca", "batch", "--out-dir", str(out), "--requester", "symlink")
    assert_refused_cleanly(result, 2, ca, "symlink")
    assert b"dev-3.pem" in result.stderr and b"symlink" in result.stderr
    assert sorted(os.listdir(out)) == ["dev-3.pem"] and not (tmp_path / "nowhere").exists()
    (out / "dev-3.pem").unlink()
    (out / "dev-1.pem").mkdir()  # a directory at a target name
    result = ca.run("sign-csr", *files, "--ca", "batch", "--out-dir", str(out), "--requester", "symlink")
    assert_refused_cleanly(result, 2, ca, "symlink")


def test_unwritable_directory_issues_nothing(ca: Kvpki, tmp_path: Path) -> None:
    files = write_csrs(tmp_path / "csrs", 3)
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as out:  # read-only even for root
        result = ca.run("sign-csr", *files, "--ca", "batch", "--out-dir", str(out), "--requester", "ro")
        assert_refused_cleanly(result, 6, ca, "ro")
        assert b"cannot write" in result.stderr and os.listdir(out) == []
        result = ca.run("sign-csr", *files, "--ca", "batch", "--out-dir", str(out / "new"), "--requester", "ro")
        assert_refused_cleanly(result, 6, ca, "ro")  # a directory that cannot be created: the same exit


@pytest.mark.parametrize("size_kib", [8, 24, 64])
def test_full_disk_issues_nothing_and_leaves_nothing(ca: Kvpki, tmp_path: Path, size_kib: int) -> None:
    """A tmpfs smaller than the batch fills up while staging (at the manifest or at any temp file)."""
    files = write_csrs(tmp_path / "csrs", 40)
    with tmpfs(tmp_path / "full", f"size={size_kib}k") as out:
        result = ca.run("sign-csr", *files, "--ca", "batch", "--out-dir", str(out), "--requester", "full")
        assert_refused_cleanly(result, 6, ca, "full")
        assert b"disk full" in result.stderr or b"No space" in result.stderr
        assert os.listdir(out) == []
        # the same directory still takes a batch that fits, and nothing of the failed one resurfaces
        ca.run("sign-csr", *files[:1], "--ca", "batch", "--out-dir", str(out), "--requester", "fits", check=True)
        assert os.listdir(out) == ["dev-0.pem"] and len(rows_by(ca, "batch", "fits")) == 1
    assert rows_by(ca, "batch", "full") == []


def test_file_size_limit_efbig_issues_nothing(local_kvpki: Kvpki, tmp_path: Path, postgres_url: str) -> None:
    """RLIMIT_FSIZE with SIGXFSZ ignored makes file writes fail with EFBIG (no root needed).

    The inventory is PostgreSQL, whose server the limit does not reach: only the output files fail.
    """
    ca = local_kvpki
    ca.env["KVPKI_INVENTORY_URL"] = postgres_url
    ca.init_ca("batch", "--subject", "CN=Batch CA")
    files = write_csrs(tmp_path / "csrs", 3)
    out = tmp_path / "out"
    out.mkdir()

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # a certificate is ~600 bytes

    args = [*KVPKI, "sign-csr", *files, "--ca", "batch", "--out-dir", str(out), "--requester", "efbig"]
    result = subprocess.run(args, capture_output=True, env=ca.env, preexec_fn=limit, timeout=60)
    assert_refused_cleanly(result, 6, ca, "efbig")
    assert os.listdir(out) == []


def committed_serials(kvpki: Kvpki, requester: str) -> set[str]:
    """The serials a requester got, straight from the inventory the CLI uses (faster than `kvpki list`)."""
    from kvpki_cli.inventory import open_inventory

    inventory = open_inventory(kvpki.env.get("KVPKI_INVENTORY_URL"), kvpki.home)
    try:
        rows = inventory.list_certificates("batch", None, datetime.now(UTC))
    finally:
        inventory.close()
    return {row.serial for row in rows if row.requester == requester}


def settle_and_check(ca: Kvpki, out: Path, after: list[str], requester: str, label: str, size: int = BATCH) -> None:
    """Any later run into the directory settles the dead batch first; then rows == 0 or files == rows."""
    ca.run("sign-csr", *after, "--ca", "batch", "--out-dir", str(out), "--requester", "after", check=True)
    rows = committed_serials(ca, requester)
    written = [p for p in outputs(out) if not p.name.startswith("after")]
    assert len(rows) in (0, size), (label, len(rows))
    assert len(written) == len(rows), (label, len(rows), len(written))
    assert {format(load_cert(p.read_bytes()).serial_number, "x") for p in written} == rows, label
    assert stray(out) == [], (label, stray(out))
    (out / "after-0.pem").unlink()


def _batch(ca: Kvpki, files: list[str], out: Path, requester: str) -> list[str]:
    return [*KVPKI, "sign-csr", *files, "--ca", "batch", "--out-dir", str(out), "--requester", requester]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_at_every_protocol_step(
    backend: str, local_kvpki: Kvpki, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGKILL exactly at each step (test hook in kvpki_cli.outdir): before the commit no rows, after it every file."""
    if backend == "postgresql":
        local_kvpki.env["KVPKI_INVENTORY_URL"] = str(request.getfixturevalue("postgres_url"))
    local_kvpki.init_ca("batch", "--subject", "CN=Batch CA")
    ca = local_kvpki
    size = 60  # the steps are exact, so a small batch hits each of them
    files = write_csrs(tmp_path / "csrs", size)
    after = write_csrs(tmp_path / "after", 1, stem="after")
    rng = random.Random(int(os.environ.get("KVPKI_KILL_SEED", "7")))
    middle = rng.randrange(1, size - 1)
    steps = {  # step -> rows committed when the process dies there
        "begin": 0,
        "stage:0": 0,
        f"stage:{middle}": 0,
        "staged": 0,
        "committed": size,
        f"linked:dev-{middle}.pem": size,  # linked, its temp file not yet removed
        f"publish:{middle}": size,
        f"publish:{size - 1}": size,  # every file placed, the manifest not yet removed
    }
    if backend == "postgresql":  # the inventory's part: just before and just after the commit
        steps = {step: rows for step, rows in steps.items() if step in ("staged", "committed")}
    for index, (step, expected_rows) in enumerate(steps.items()):
        out, requester = tmp_path / f"out{index}", f"step{index}"
        env = dict(ca.env, KVPKI_TEST_CRASH_AT=step)
        result = subprocess.run(_batch(ca, files, out, requester), env=env, capture_output=True, timeout=60)
        assert result.returncode == -signal.SIGKILL, (step, result.stderr)
        assert len(committed_serials(ca, requester)) == expected_rows, step
        assert stray(out), step  # something was left for the next run to settle
        settle_and_check(ca, out, after, requester, step, size)


def test_kill_9_at_random_moments(ca: Kvpki, tmp_path: Path) -> None:
    """kill -9 from outside at random moments of a 200-CSR batch; a later run settles each one."""
    files = write_csrs(tmp_path / "csrs", BATCH)
    after = write_csrs(tmp_path / "after", 1, stem="after")
    spans = []
    for attempt in range(2):  # the first run also byte-compiles; time the second
        started = time.monotonic()
        ca.run(*_batch(ca, files, tmp_path / f"timing{attempt}", "timing")[len(KVPKI) :], check=True)
        spans.append(time.monotonic() - started)
    rng = random.Random(int(os.environ.get("KVPKI_KILL_SEED", "7")))
    outcomes = []
    for index in range(int(os.environ.get("KVPKI_KILLS", "6"))):
        out, requester = tmp_path / f"out{index}", f"kill{index}"
        out.mkdir()
        delay = rng.uniform(0.45, 1.0) * spans[-1]  # start-up is the first ~40%; signing and writing the rest
        process = subprocess.Popen(
            _batch(ca, files, out, requester), env=ca.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        process.wait()
        outcomes.append((round(delay, 3), process.returncode, len(committed_serials(ca, requester)), len(outputs(out))))
        if process.returncode == 0:  # finished before the kill: aim earlier next time
            spans.append(min(spans[-1], delay))
        settle_and_check(ca, out, after, requester, f"delay {delay:.3f}")
    print("random kills (delay s, exit, rows, files before settling):", outcomes)


def test_live_batch_is_left_alone_by_a_concurrent_run(ca: Kvpki, tmp_path: Path) -> None:
    """A second run settles only dead batches: a batch whose manifest is locked keeps its staged files."""
    from kvpki_cli.outdir import Batch

    out = tmp_path / "out"
    out.mkdir()
    live = Batch.begin(out, "batch", "fingerprint-of-another-process")
    live.stage([("abc", out / "live.pem", b"staged")])
    staged = sorted(stray(out))
    files = write_csrs(tmp_path / "csrs", 1)
    ca.run("sign-csr", *files, "--ca", "batch", "--out-dir", str(out), check=True)
    assert sorted(stray(out)) == staged and not (out / "live.pem").exists()
    live.close(remove_manifest=False)
    # dead now, but recorded against another inventory: left alone, with a warning
    again = ca.run("sign-csr", *write_csrs(tmp_path / "more", 1, stem="more"), "--ca", "batch", "--out-dir", str(out))
    assert again.returncode == 0 and b"another inventory" in again.stderr and sorted(stray(out)) == staged


def test_a_name_taken_after_the_check_loses_nothing(tmp_path: Path) -> None:
    """publish never overwrites: a name that appeared after the check leaves that file alone and reports the serial."""
    from kvpki_cli.outdir import Batch

    out = tmp_path / "out"
    out.mkdir()
    batch = Batch.begin(out, "batch", "inventory")
    batch.stage([("a1", out / "a.pem", b"cert a"), ("b2", out / "b.pem", b"cert b")])
    (out / "b.pem").write_bytes(b"someone else's")
    assert batch.publish() == ["b2"]
    assert (out / "a.pem").read_bytes() == b"cert a" and (out / "b.pem").read_bytes() == b"someone else's"
    assert stray(out) == []


def test_orphan_temp_files_of_our_prefix_are_removed(ca: Kvpki, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{PREFIX}0123456789abcdef.0.tmp").write_bytes(b"half")  # its batch died before/after its manifest
    (out / f"{PREFIX}fedcba9876543210.json").write_bytes(b'{"ca": "batch", "entr')  # died while staging
    (out / f"{PREFIX}fedcba9876543210.0.tmp").write_bytes(b"half")
    (out / ".someone-elses").write_bytes(b"kept")
    ca.run("sign-csr", *write_csrs(tmp_path / "csrs", 1), "--ca", "batch", "--out-dir", str(out), check=True)
    assert sorted(os.listdir(out)) == [".someone-elses", "dev-0.pem"]


def test_issued_certificates_can_be_fetched_again(ca: Kvpki, tmp_path: Path) -> None:
    files = write_csrs(tmp_path / "csrs", 2)
    out = tmp_path / "out"
    ca.run("sign-csr", *files, "--ca", "batch", "--out-dir", str(out), "--format", "json", check=True)
    written = json.loads((out / "dev-0.json").read_text())
    serial = written["serial"]
    assert ca.ok("get-cert", serial, "--ca", "batch").decode() == written["certificate"]
    chain = ca.ok("get-cert", serial.upper(), "--ca", "batch", "--chain")  # serials accept any case
    assert chain.count(b"BEGIN CERTIFICATE") == 2 and chain.endswith(ca.ok("get-ca", "--ca", "batch"))
    der = ca.ok("get-cert", serial, "--ca", "batch", "--format", "der")
    assert (
        openssl("x509", "-inform", "DER", "-noout", "-serial", input=der)
        .stdout.strip()
        .lower()
        .endswith(serial.encode())
    )
    p7 = ca.ok("get-cert", serial, "--ca", "batch", "--format", "pkcs7", "--chain")
    assert openssl("pkcs7", "-print_certs", input=p7).stdout.count(b"BEGIN CERTIFICATE") == 2
    ca.ok("revoke", serial, "--ca", "batch", "--reason", "keyCompromise")
    fetched = json.loads(ca.ok("get-cert", serial, "--ca", "batch", "--format", "json"))
    assert (fetched["status"], fetched["reason"], fetched["certificate"]) == (
        "revoked",
        "keyCompromise",
        written["certificate"],
    )
    missing = ca.run("get-cert", "1234", "--ca", "batch")
    assert missing.returncode == 5 and missing.stdout == b"" and missing.stderr.count(b"\n") == 1
    assert ca.run("get-cert", serial, "--ca", "batch", "--format", "der", "--chain").returncode == 2
    assert ca.run("get-cert", "xyz", "--ca", "batch").returncode == 3


def _csr(tmp_path: Path, stem: str) -> bytes:
    return Path(write_csrs(tmp_path / stem, 1, stem=stem)[0]).read_bytes()


def _sign_to(ca: Kvpki, tmp_path: Path, stdout: int) -> subprocess.CompletedProcess[bytes]:
    csr = _csr(tmp_path, "out")
    return subprocess.run(
        [*KVPKI, "sign-csr", "--ca", "batch", "--requester", "stdout"],
        input=csr,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=ca.env,
        timeout=60,
    )


def _assert_recoverable(ca: Kvpki, result: subprocess.CompletedProcess[bytes]) -> None:
    assert result.returncode == 6, result.stderr
    lines = result.stderr.decode().splitlines()
    errors = [line for line in lines if line.startswith("kvpki: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr.decode() and "Exception" not in result.stderr.decode()
    (row,) = rows_by(ca, "batch", "stdout")
    assert str(row["serial"]) in errors[0] and f"kvpki get-cert {row['serial']} --ca batch" in errors[0]
    recovered = load_cert(ca.ok("get-cert", str(row["serial"]), "--ca", "batch"))
    assert format(recovered.serial_number, "x") == row["serial"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_stdout_full_names_the_serial(ca: Kvpki, tmp_path: Path) -> None:
    with open("/dev/full", "wb") as full:
        result = _sign_to(ca, tmp_path, full.fileno())
    _assert_recoverable(ca, result)
    assert "No space left" in result.stderr.decode()


@pytest.mark.parametrize("fast_path", [True, False])
def test_closed_pipe_names_the_serial(ca: Kvpki, tmp_path: Path, fast_path: bool) -> None:
    if not fast_path:
        ca.env = dict(ca.env, KVPKI_NO_FASTPATH="1")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before kvpki writes: EPIPE (SIGPIPE is ignored by Python)
    try:
        result = _sign_to(ca, tmp_path, write_end)
    finally:
        os.close(write_end)
    _assert_recoverable(ca, result)
    assert "stdout was closed" in result.stderr.decode()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_renew_to_full_stdout_names_the_new_serial(ca: Kvpki, tmp_path: Path) -> None:
    old = write(tmp_path / "old.pem", ca.ok("sign-csr", "--ca", "batch", input=_csr(tmp_path, "renew-old")))
    csr = write(tmp_path / "new.csr", _csr(tmp_path, "renew-new"))
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [*KVPKI, "renew", str(old), str(csr), "--ca", "batch", "--requester", "stdout"],
            stdout=full,
            stderr=subprocess.PIPE,
            env=ca.env,
            timeout=60,
        )
    _assert_recoverable(ca, result)


def test_closed_pipe_on_other_commands_is_one_line(ca: Kvpki) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*KVPKI, "get-ca", "--ca", "batch"], stdout=write_end, stderr=subprocess.PIPE, env=ca.env, timeout=60
        )
    finally:
        os.close(write_end)
    assert result.returncode == 6 and result.stderr.count(b"\n") == 1 and b"kvpki: error:" in result.stderr
