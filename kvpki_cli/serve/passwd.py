"""The EST users file: ``user:$scrypt$ln=14,r=8,p=1$<salt>$<hash>`` lines, one per user.

scrypt with a per-user random salt makes a stolen file expensive to crack;
verification compares in constant time, and an unknown user costs the same
scrypt work as a known one (no user enumeration by timing).  Because a slow hash
per request would cap enrollment throughput, successful verifications are
remembered in memory (keyed by an HMAC of the password under a per-process
random key) for a while.

User names are one token of a restricted alphabet (never ``:``, the field
separator, nor whitespace or control characters), so every file kvpki writes
parses back; the file is replaced atomically (temp file, fsync, rename, 0600).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kvpki_cli.errors import UsageError
from kvpki_cli.fileutil import read_error, read_regular_file, write_file_atomic

SCRYPT_LOG_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
MAX_USER_LENGTH = 64
MAX_USERS_BYTES = 4 * 1024 * 1024  # ~20,000 users; a bigger file is a mistake, not a fleet
USER_NAME = re.compile(rf"[A-Za-z0-9_.@+-]{{1,{MAX_USER_LENGTH}}}")  # used with fullmatch: no "\n" slips by
_ENTRY = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
_MAXMEM = 256 * 1024 * 1024
log = logging.getLogger("kvpki.serve")


def valid_user_name(user: str) -> bool:
    return USER_NAME.fullmatch(user) is not None


def _entry_parameters(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(log_n, r, p, salt, hash) of a well-formed entry with sane cost parameters, else None."""
    match = _ENTRY.fullmatch(encoded)
    if match is None:
        return None
    log_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not (10 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    try:
        salt = base64.b64decode(match.group(4), validate=True)
        expected = base64.b64decode(match.group(5), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not salt or len(expected) < 16 or 128 * r * (1 << log_n) > _MAXMEM // 2:
        return None
    return log_n, r, p, salt, expected


def hash_password(password: str, *, log_n: int = SCRYPT_LOG_N) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << log_n, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"$scrypt$ln={log_n},r={SCRYPT_R},p={SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, encoded: str) -> bool:
    parameters = _entry_parameters(encoded)
    if parameters is None:
        return False
    log_n, r, p, salt, expected = parameters
    digest = hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"), salt=salt, n=1 << log_n, r=r, p=p, dklen=len(expected),
        maxmem=_MAXMEM,
    )  # fmt: skip
    return hmac.compare_digest(digest, expected)


def parse_users(text: str, source: str) -> dict[str, str]:
    """user -> encoded hash; blank lines and ``#`` comments are ignored; anything else malformed is refused."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not valid_user_name(user) or _entry_parameters(encoded) is None:
            raise UsageError(f"users file {source} line {number} is malformed")
        if user in users:
            raise UsageError(f"users file {source} line {number} repeats user {user}")
        users[user] = encoded
    return users


def read_users(path: Path) -> dict[str, str]:
    """The users of ``path`` ({} when it does not exist); a malformed file is a ``UsageError``."""
    try:  # a FIFO or device in its place is refused, never waited on (it would hang the event loop)
        data = read_regular_file(path, MAX_USERS_BYTES)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(read_error("users file", path, exc)) from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"users file {path} is not ASCII text") from None
    return parse_users(text, str(path))


def set_user(path: Path, user: str, password: str | None) -> None:
    """Add or replace ``user`` (or remove it when ``password`` is None); the file is replaced atomically, 0600."""
    if not valid_user_name(user):
        raise UsageError(
            f"invalid user name {user!r} (1 to {MAX_USER_LENGTH} of letters, digits and _.@+-; no ':' or spaces)"
        )
    if password is not None:
        if len(password) < 8:
            raise UsageError("password must have at least 8 characters")
        try:
            password.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on stdin: no client could ever send them
            raise UsageError("password must be valid UTF-8 text") from None
    with _directory_lock(path.parent) as directory_fd:  # concurrent edits never lose each other's users
        users = read_users(path)
        if password is None:
            users.pop(user, None)
        else:
            users[user] = hash_password(password)
        data = "".join(f"{name}:{encoded}\n" for name, encoded in sorted(users.items()))
        parse_users(data, str(path))  # never write a file the server cannot read back
        write_file_atomic(path, data.encode("ascii"), mode=0o600)
        os.fsync(directory_fd)  # the rename itself survives a crash


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[int]:
    """An exclusive flock on the users file's directory (no lock file left behind)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise UsageError(f"cannot open directory {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


class UserDirectory:
    """Verifies Basic credentials against the users file, re-reading it when it changes.

    A users file that becomes unreadable or malformed while the server runs fails
    closed: nobody authenticates by password (401) until it is fixed, and the
    problem is logged once per change of the file, not per request.
    """

    CACHE_SECONDS = 300.0
    STAT_INTERVAL = 1.0

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._users: dict[str, str] = read_users(path) if path else {}  # start-up: a broken file is an error
        self._checked = time.monotonic()
        self._key = os.urandom(32)
        self._verified: dict[tuple[str, bytes], float] = {}
        self._dummy = hash_password("unknown user", log_n=SCRYPT_LOG_N)
        self._pick_dummy()

    def _stat(self) -> tuple[int, int, int, int]:
        """What changes when the file is rewritten (inode too: ``serve-passwd`` renames a new file in)."""
        if self.path is None:
            return (0, 0, 0, 0)
        try:
            st = self.path.stat()
        except OSError:
            return (-1, 0, 0, 0)
        return (st.st_mtime_ns, st.st_ino, st.st_size, st.st_ctime_ns)

    def _pick_dummy(self) -> None:
        """Unknown users are checked against an entry with the cost of a real one."""
        for encoded in self._users.values():
            parameters = _entry_parameters(encoded)
            if parameters is not None:
                self._dummy = hash_password("unknown user", log_n=parameters[0])
                return

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.STAT_INTERVAL:
            return
        self._checked = now
        signature = self._stat()
        if signature == self._signature:
            return
        with self._lock:
            self._signature = signature
            self._verified.clear()
            try:
                self._users = read_users(self.path)
            except UsageError as error:
                self._users = {}  # fail closed: a removed user must never survive a broken edit
                log.error("%s; refusing every password until it is fixed", error)
                return
            log.info("users file %s re-read: %d user(s)", self.path, len(self._users))
            self._pick_dummy()

    def _token(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def cached(self, user: str, password: str) -> bool | None:
        """True when recently verified, None when the slow check is needed (call ``verify``).

        Unknown users also need the slow check, so that they cost what a wrong password does.
        """
        self._refresh()
        if user not in self._users:
            return None
        expiry = self._verified.get((user, self._token(user, password)))
        return True if expiry is not None and expiry > time.monotonic() else None

    def verify(self, user: str, password: str) -> bool:
        """The slow scrypt check (run it off the event loop); remembers successes."""
        users = self._users
        encoded = users.get(user)
        if encoded is None:
            check_password(password, self._dummy)  # same work as a known user with a wrong password
            return False
        if not check_password(password, encoded):
            return False
        with self._lock:
            if self._users is not users:  # the file changed while we hashed: decide on the new contents
                return False
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[(user, self._token(user, password))] = time.monotonic() + self.CACHE_SECONDS
        return True
