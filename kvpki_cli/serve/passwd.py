"""The EST users file: ``user:$scrypt$ln=14,r=8,p=1$<salt>$<hash>`` lines, one per user.

scrypt with a per-user random salt makes a stolen file expensive to crack;
verification compares in constant time.  Because a slow hash per request would
cap enrollment throughput, successful verifications are remembered in memory
(keyed by an HMAC of the password under a per-process random key) for a while.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from pathlib import Path

from kvpki_cli.errors import UsageError
from kvpki_cli.fileutil import write_file_atomic

SCRYPT_LOG_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
USER_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
_ENTRY = re.compile(r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


def hash_password(password: str, *, log_n: int = SCRYPT_LOG_N) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << log_n, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"$scrypt$ln={log_n},r={SCRYPT_R},p={SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, encoded: str) -> bool:
    match = _ENTRY.match(encoded)
    if match is None:
        return False
    log_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not 10 <= log_n <= 20:
        return False
    salt, expected = base64.b64decode(match.group(4)), base64.b64decode(match.group(5))
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=1 << log_n, r=r, p=p, dklen=len(expected), maxmem=256 * 1024 * 1024
    )
    return hmac.compare_digest(digest, expected)


def read_users(path: Path) -> dict[str, str]:
    """user -> encoded hash; blank lines and ``#`` comments are ignored."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read users file {path}: {exc.strerror}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not USER_NAME.match(user) or not _ENTRY.match(encoded):
            raise UsageError(f"users file {path} line {number} is malformed")
        users[user] = encoded
    return users


def set_user(path: Path, user: str, password: str | None) -> None:
    """Add or replace ``user`` (or remove it when ``password`` is None); the file stays 0600."""
    if not USER_NAME.match(user):
        raise UsageError(f"invalid user name {user!r} (letters, digits and _.@+-, up to 64)")
    users = read_users(path)
    if password is None:
        users.pop(user, None)
    else:
        if len(password) < 8:
            raise UsageError("password must have at least 8 characters")
        users[user] = hash_password(password)
    data = "".join(f"{name}:{encoded}\n" for name, encoded in sorted(users.items()))
    write_file_atomic(path, data.encode(), mode=0o600)


class UserDirectory:
    """Verifies Basic credentials against the users file, re-reading it when it changes."""

    CACHE_SECONDS = 300.0
    STAT_INTERVAL = 5.0

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._users: dict[str, str] = read_users(path) if path else {}
        self._mtime = self._stat()
        self._checked = time.monotonic()
        self._key = os.urandom(32)
        self._verified: dict[tuple[str, bytes], float] = {}

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime if self.path else 0.0
        except OSError:
            return 0.0

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.STAT_INTERVAL:
            return
        self._checked = now
        mtime = self._stat()
        if mtime != self._mtime:
            self._users, self._mtime = read_users(self.path), mtime
            self._verified.clear()

    def cached(self, user: str, password: str) -> bool | None:
        """True when recently verified, None when a slow check is needed (call ``verify``)."""
        self._refresh()
        if user not in self._users:
            return False
        token = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        expiry = self._verified.get((user, token))
        return True if expiry is not None and expiry > time.monotonic() else None

    def verify(self, user: str, password: str) -> bool:
        """The slow scrypt check (run it off the event loop); remembers successes."""
        encoded = self._users.get(user)
        if encoded is None or not check_password(password, encoded):
            return False
        token = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[(user, token)] = time.monotonic() + self.CACHE_SECONDS
        return True
