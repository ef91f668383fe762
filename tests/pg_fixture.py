"""A throwaway PostgreSQL server for tests: a pytest plugin others can reuse.

Enable it with ``pytest_plugins = ["tests.pg_fixture"]`` (in ``tests/conftest.py``
or a test module).  ``postgres_server`` is one server per session (initdb and
start-up cost about a second, so it is shared); ``postgres_url`` is a fresh,
empty database per test, so tests cannot see each other's rows.

The server listens on 127.0.0.1 only, on a free port, with password (SCRAM)
authentication so URLs carry a real password, and trades durability for speed
(``fsync=off``).  initdb refuses to run as root, so as root the cluster is
created and run by an unprivileged account (``postgres`` if it exists, else
``nobody``).  Tests are skipped, with the reason, when the binaries or psycopg
are missing; set ``KVPKI_TEST_PG_BINDIR`` to pick the binaries explicitly.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest

SUPERUSER = "kvpki_test"
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "60",
    "log_min_messages": "warning",
}


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates = [os.environ.get("KVPKI_TEST_PG_BINDIR", "")]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)  # Debian/Ubuntu layout
    for candidate in filter(None, candidates):
        if all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def _unprivileged_account() -> pwd.struct_passwd | None:
    """Who runs the server: ourselves unless we are root, which initdb and postgres refuse."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    if shutil.which("runuser") is None:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    """A running test server; ``url()`` builds connection URLs, ``create_database()`` isolates tests."""

    bindir: Path
    base: Path
    account: pwd.struct_passwd
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    port: int = 0
    _names: Iterator[int] = field(default_factory=count)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if os.geteuid() == 0:  # drop privileges (util-linux runuser: no PAM session, no password)
            command = ["runuser", "-u", self.account.pw_name, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.base)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    def init(self) -> None:
        """initdb with a password-protected superuser; no fsync during initdb either."""
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.datadir),
            "--username",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        pwfile.unlink()

    def start(self, attempts: int = 3) -> None:
        """Start on a free port (retrying if another process grabs it first)."""
        for attempt in range(attempts):
            self.port = _free_port()
            options = " ".join(f"-c {key}={value}" for key, value in SERVER_SETTINGS.items())
            options += f" -c port={self.port} -c unix_socket_directories={self.base}"
            result = self._run(
                str(self.bindir / "pg_ctl"),
                "start",
                "--pgdata",
                str(self.datadir),
                "--wait",
                "--timeout=60",
                "--log",
                str(self.base / "server.log"),
                "--options",
                options,
                check=False,
            )
            if result.returncode == 0:
                return
            if attempt == attempts - 1:
                log = (self.base / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pg_ctl start failed: {result.stderr or result.stdout}\n{log}")

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "stop", "--pgdata", str(self.datadir), "-m", "immediate", check=False)

    def url(self, database: str = "postgres", *, password: str | None = None, port: int | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{SUPERUSER}:{secret}@127.0.0.1:{port or self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, removed with its data at the end."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; set KVPKI_TEST_PG_BINDIR")
    account = _unprivileged_account()
    if account is None:
        pytest.skip("running as root without runuser or an unprivileged account (postgres, nobody) to run PostgreSQL")
    # Not under pytest's tmp_path: that is private to root (0700) and the server account must reach it.
    base = Path(tempfile.mkdtemp(prefix="kvpki-pg-"))
    os.chown(base, account.pw_uid, account.pw_gid)
    server = PostgresServer(bindir, base, account)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL (with password) of a fresh, empty database on the session server."""
    return postgres_server.create_database()
