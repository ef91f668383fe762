"""Write files so readers never see a partial one: temp file in the same directory, fsync, rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from kvpki_cli.errors import AlreadyExists, BackendError


def write_file_atomic(
    path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = True, durable: bool = True
) -> None:
    """Create ``path`` with ``data`` atomically; with ``overwrite=False`` an existing file is an error.

    ``durable=False`` skips the fsync for outputs that can be regenerated (issued
    certificates are also kept in the inventory).
    """
    import tempfile  # not on the start-up path of commands that write nothing

    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise BackendError(f"cannot write in {directory}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                raise AlreadyExists(f"{path} already exists") from None
            os.unlink(tmp_name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_directory(directory)  # the new name itself survives a crash


def fsync_directory(directory: Path) -> None:
    """Make the entries created, renamed or removed in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotReadable(OSError):
    """A path that exists but is not a small regular file; ``str()`` completes "<what> <path> ..."."""


def read_regular_file(path: Path, limit: int, check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes, else ``OSError``.

    A FIFO or a device (``/dev/zero``) named in a config file would otherwise hang or
    exhaust memory instead of being refused in one line.  ``check`` sees the opened
    file's status (e.g. its owner and mode) before anything is read from it.
    """
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise NotReadable("is not a regular file")
        if check is not None:
            check(status)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotReadable(f"is larger than {limit} bytes")
    return data


def read_error(what: str, path: Path, exc: OSError) -> str:
    """One line for a failed ``read_regular_file``: "users file P is not a regular file", "cannot read ..."."""
    if isinstance(exc, NotReadable):
        return f"{what} {path} {exc}"
    return f"cannot read {what} {path}: {exc.strerror or exc}"


SECRET_PIPE_TIMEOUT_S = 10.0


def read_secret_file(path: Path, limit: int, timeout: float | None = None) -> bytes:
    """A regular file, or a pipe/FIFO read to end of file within ``timeout`` seconds, else ``OSError``.

    A passphrase file may legitimately be a process-substitution pipe (``<(vault read ...)``)
    or a FIFO fed by a secrets agent; one without a writer must not hang kvpki for ever,
    and a device (``/dev/zero``, a terminal) or socket is not a file.
    """
    import select
    import stat
    import time

    timeout = SECRET_PIPE_TIMEOUT_S if timeout is None else timeout
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(limit + 1)
        elif stat.S_ISFIFO(mode):
            # Linux: poll() on a FIFO nobody has opened for writing yet waits for a writer (no POLLHUP)
            chunks: list[bytes] = []
            size = 0
            deadline = time.monotonic() + timeout
            while size <= limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    raise OSError(f"{path} is a pipe that gave no end of file within {timeout:g}s")
                try:
                    chunk = os.read(fd, limit + 1 - size)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
        else:
            raise OSError(f"{path} is not a regular file or a pipe")
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(f"{path} is larger than {limit} bytes")
    return data
