"""The `sign-csr --out-dir` write protocol: a batch of certificates never outlives its inventory rows, or vice versa.

One batch (one run) in directory D with a random id B:

1. Before anything is signed: every target is checked (nothing, not even a
   dangling symlink, may exist at its name), and the manifest
   ``D/.kvpki-batch-B.json`` is created (``O_EXCL``) and ``flock``-ed for the
   life of the run.  Creating it proves D is writable; the temp files live in D
   itself, so they are on the targets' filesystem and the final step is a link.
2. After signing, before the inventory commit (``stage``): each certificate is
   written to ``D/.kvpki-batch-B.N.tmp`` and fsynced, the manifest
   (CA, inventory fingerprint, [serial, temp, target] per certificate) is
   written and fsynced, then D is fsynced.  A failure here (ENOSPC, EFBIG, EIO)
   removes the batch's files and nothing is committed.
3. The caller commits the rows.
4. ``publish``: each temp file is linked to its target (``link`` never
   overwrites) and unlinked, D is fsynced, the manifest is removed.

After a ``kill -9`` at any point, the next `sign-csr --out-dir D` first settles
every dead batch (one whose manifest lock it can take) with the same rule the
run itself applies on any failure after step 2: a certificate whose serial is
in the inventory is linked into place, any other temp file is removed.  The
manifest is complete before the commit, so a batch without a readable manifest
committed nothing.  Temp files of our prefix without any manifest are removed
(a batch creates its manifest before its first temp file and removes it last).
A manifest written against another inventory (another KVPKI_HOME or database)
is left alone with a warning: this run cannot tell whether those rows exist.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from kvpki_cli.errors import BackendError, UsageError
from kvpki_cli.fileutil import fsync_directory
from kvpki_cli.messages import warn

PREFIX = ".kvpki-batch-"

#: ``lookup(ca, serial)``: is that serial committed in the inventory?
Lookup = Callable[[str, str], bool]


_CRASH_AT = os.environ.get("KVPKI_TEST_CRASH_AT")


def crash_point(name: str) -> None:
    """Test hook: ``KVPKI_TEST_CRASH_AT=<name>`` kills this process right here, as ``kill -9`` would.

    The durability tests use it to hit every step of the protocol exactly;
    they also kill at random moments from outside.
    """
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


class Entry(NamedTuple):
    serial: str
    temp: str
    target: str


def inventory_fingerprint(description: str) -> str:
    """A stable, secret-free name for an inventory (its URL may hold a password)."""
    return hashlib.sha256(description.encode()).hexdigest()[:32]


def check_targets(directory: Path, names: Sequence[str]) -> list[Path]:
    """Refuse any target name that exists in any form (file, directory, symlink, dangling symlink)."""
    targets = [directory / name for name in names]
    if len(set(targets)) != len(targets):
        raise UsageError("two CSRs would write the same output file (their file names collide)")
    for target in targets:
        if target.name.startswith(PREFIX):
            raise UsageError(f"output name {target.name} is reserved for kvpki's temporary files")
        if os.path.lexists(target):
            kind = " (a symlink)" if target.is_symlink() else ""
            raise UsageError(f"refusing to overwrite {target}{kind}")
    return targets


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


SYNC_THREADS = 32


def _write_all_synced(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write and fsync every file; in parallel, because concurrent fsyncs share journal commits.

    One at a time, 3,000 fsyncs took 10-15 s on a busy ext4 disk; 32 threads took 0.4 s.
    """

    def write(index: int) -> None:
        _write_synced(files[index][0], files[index][1], 0o644)
        crash_point(f"stage:{index}")

    if len(files) <= 1:
        for index in range(len(files)):
            write(index)
        return
    from concurrent.futures import ThreadPoolExecutor  # batches only: not on the single-CSR start-up path

    with ThreadPoolExecutor(max_workers=min(SYNC_THREADS, len(files))) as pool:
        for _ in pool.map(write, range(len(files))):  # the first failure is raised once all writes are done
            pass


def _link_into_place(temp: Path, target: Path) -> bool:
    """Link ``temp`` to ``target`` without overwriting; True when ``target`` now holds it."""
    try:
        os.link(temp, target, follow_symlinks=False)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.lstat(temp), os.lstat(target)):
                return True  # placed by an earlier attempt that died before removing the temp file
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(target):  # a filesystem without hard links: check, then rename
            return False
        os.rename(temp, target)
    return True


class Batch:
    """One run's files in the output directory; create with ``Batch.begin`` before signing."""

    def __init__(self, directory: Path, batch_id: str, fd: int, ca: str, inventory: str) -> None:
        self.directory = directory
        self.id = batch_id
        self._fd = fd
        self.ca = ca
        self.inventory = inventory
        self.entries: list[Entry] = []

    @property
    def manifest(self) -> Path:
        return self.directory / f"{PREFIX}{self.id}.json"

    @classmethod
    def begin(cls, directory: Path, ca: str, inventory: str) -> Batch:
        """Create and lock this run's manifest: proves the directory is writable, before any signing."""
        for _attempt in range(5):
            batch_id = secrets.token_hex(8)
            path = directory / f"{PREFIX}{batch_id}.json"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise BackendError(f"cannot write in --out-dir {directory}: {exc.strerror}") from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            # a concurrent recovery may have settled (removed) the empty manifest before we locked it
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd)):
                    crash_point("begin")
                    return cls(directory, batch_id, fd, ca, inventory)
            os.close(fd)
        raise BackendError(f"cannot create a batch manifest in {directory}")

    def _temp(self, index: int) -> Path:
        return self.directory / f"{PREFIX}{self.id}.{index}.tmp"

    def stage(self, items: Sequence[tuple[str, Path, bytes]]) -> None:
        """Write every (serial, target, data) to a synced temp file, then the manifest; before the commit."""
        self._remove_temps()  # an earlier attempt (serial collision) committed nothing
        self.entries = []
        try:
            temps = [self._temp(index) for index in range(len(items))]
            pairs = list(zip(temps, items, strict=True))
            self.entries = [Entry(serial, temp.name, target.name) for temp, (serial, target, _) in pairs]
            _write_all_synced([(temp, data) for temp, (_, _, data) in pairs])
            document = {
                "version": 1,
                "ca": self.ca,
                "inventory": self.inventory,
                "entries": [list(entry) for entry in self.entries],
            }
            payload = memoryview(json.dumps(document).encode())
            os.ftruncate(self._fd, 0)
            offset = 0
            while offset < len(payload):  # a short write on a filling disk: the next one raises ENOSPC
                offset += os.pwrite(self._fd, payload[offset:], offset)
            os.fsync(self._fd)
            fsync_directory(self.directory)
            crash_point("staged")
        except OSError as exc:
            self._remove_temps()
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else exc.strerror
            raise BackendError(f"cannot write certificates into {self.directory}: {what}; nothing was issued") from None

    def publish(self) -> list[str]:
        """After the commit: link every temp file to its target. Returns the serials that could not be placed."""
        crash_point("committed")
        unplaced = []
        for index, entry in enumerate(self.entries):
            if not self._place(entry):
                unplaced.append(entry.serial)
            crash_point(f"publish:{index}")
        self.close(remove_manifest=True)
        return unplaced

    def _place(self, entry: Entry) -> bool:
        temp, target = self.directory / entry.temp, self.directory / entry.target
        try:
            placed = _link_into_place(temp, target)
        except OSError:
            return False  # the temp file stays for the next run to settle (its serial is committed)
        crash_point(f"linked:{entry.target}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        return placed

    def settle(self, lookup: Lookup) -> tuple[int, list[str]]:
        """After a failure or a crash: place the committed certificates, remove the rest.

        Returns how many were placed and the serials that could not be.  If the
        inventory cannot be asked, everything stays for a later run.
        """
        placed, unplaced = 0, []
        for entry in self.entries:
            committed = lookup(self.ca, entry.serial)
            if committed and (self.directory / entry.target).exists() and not (self.directory / entry.temp).exists():
                continue  # placed before the crash
            if committed:
                if self._place(entry):
                    placed += 1
                else:
                    unplaced.append(entry.serial)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / entry.temp)
        self._remove_temps()
        self.close(remove_manifest=True)
        return placed, unplaced

    def _remove_temps(self) -> None:
        for path in self.directory.glob(f"{PREFIX}{self.id}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self, remove_manifest: bool) -> None:
        """Release the lock; the manifest goes last, once no temp file of this batch is left."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            if remove_manifest and not any(self.directory.glob(f"{PREFIX}{self.id}.*.tmp")):
                fsync_directory(self.directory)
                self.manifest.unlink(missing_ok=True)
                fsync_directory(self.directory)
        os.close(self._fd)
        self._fd = -1


def recover(directory: Path, inventory: str, lookup: Lookup) -> int:
    """Settle the batches of runs that died in ``directory``; returns how many certificates were placed.

    A batch whose manifest is still locked belongs to a live run and is skipped.
    """
    try:
        names = [name for name in os.listdir(directory) if name.startswith(PREFIX)]
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise BackendError(f"cannot read --out-dir {directory}: {exc.strerror}") from None
    placed = 0
    manifests = {name[len(PREFIX) : -len(".json")] for name in names if name.endswith(".json")}
    try:
        for batch_id in sorted(manifests):
            placed += _recover_batch(directory, batch_id, inventory, lookup)
        for name in names:  # temp files whose manifest is gone: their batch committed nothing
            batch_id = name[len(PREFIX) :].split(".", 1)[0]
            if name.endswith(".tmp") and batch_id not in manifests:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / name)
    except OSError as exc:
        raise BackendError(f"cannot settle an interrupted batch in {directory}: {exc.strerror}") from None
    return placed


def _recover_batch(directory: Path, batch_id: str, inventory: str, lookup: Lookup) -> int:
    path = directory / f"{PREFIX}{batch_id}.json"
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise BackendError(f"cannot settle {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return 0  # a live run
    with contextlib.suppress(FileNotFoundError):
        if not os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd)):
            os.close(fd)
            return 0  # settled and replaced meanwhile
    try:
        document = json.loads(os.pread(fd, 1 << 26, 0) or b"{}")
        ca, recorded_inventory = str(document["ca"]), str(document["inventory"])
        entries = [Entry(*map(str, entry)) for entry in document["entries"]]
    except (ValueError, KeyError, TypeError):
        document, ca, recorded_inventory, entries = None, "", inventory, []  # died before its commit
    if recorded_inventory != inventory:
        warn(f"{path} belongs to a batch recorded in another inventory; left as it is")
        os.close(fd)
        return 0
    batch = Batch(directory, batch_id, fd, ca, inventory)
    batch.entries = entries
    placed, unplaced = batch.settle(lookup)
    for serial in unplaced:
        warn(
            f"certificate {serial} of an interrupted batch could not be written into {directory};"
            f" recover it with: kvpki get-cert {serial} --ca {ca}"
        )
    return placed
