"""Private directories and ssh-style trust checks for the files that decide what kvpki signs.

A config file or CA directory that someone else can write is someone else's
policy: like ssh's StrictModes, kvpki refuses them (owned by another user than
the caller or root, or writable by group/others) instead of trusting them.
Directories kvpki creates are 0700 whatever the umask.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kvpki_cli.errors import BackendError

PRIVATE_DIR_MODE = 0o700


def check_trusted(path: Path, st: os.stat_result, what: str, *, allow_sticky: bool = False) -> None:
    """Refuse ``path`` (already stat'ed) if another user owns it or group/others may write it.

    ``allow_sticky`` accepts a root-owned sticky directory such as /tmp, where
    others can create files but cannot replace ours.
    """
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise BackendError(f"refusing {what} {path}: owned by uid {st.st_uid}, not by uid {uid} or root")
    sticky = stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX) and st.st_uid == 0
    if st.st_mode & 0o022 and not (allow_sticky and sticky):
        raise BackendError(f"refusing {what} {path}: writable by group or others (chmod go-w it)")


def check_trusted_path(path: Path, what: str, *, allow_sticky: bool = False) -> bool:
    """``check_trusted`` for a path that may be missing; True when it exists."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise BackendError(f"cannot inspect {what} {path}: {exc.strerror}") from None
    check_trusted(path, st, what, allow_sticky=allow_sticky)
    return True


def make_private_dir(path: Path, what: str = "directory") -> None:
    """Create ``path`` and its missing parents as 0700 (explicit chmod: the umask may be 000 or 077).

    Directories that already exist are not changed, only checked: an existing
    one that others can write is refused rather than silently trusted.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created concurrently; checked below like any existing directory
        except OSError as exc:
            raise BackendError(f"cannot create {what} {directory}: {exc.strerror}") from None
        os.chmod(directory, PRIVATE_DIR_MODE)
    if not check_trusted_path(path, what) or not path.is_dir():
        raise BackendError(f"cannot create {what} {path}: not a directory")
