"""The files of CACHE beside the state and the data: its lock (one mount or offline writer at a
time; a live lock is how `corfs status` and `verify` tell a mount runs) and the small text files
a mount keeps there (mountpoint, trace.json), written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from .cache_layout import LOCK_FILE, ensure_private_dir, private_open
from .errors import CacheLocked, UsageError, cache_os_error


def take_lock(cache_dir: str, shown: str | None = None) -> int:
    """The lock's descriptor, locked; `shown`: CACHE as the user named it, for messages."""
    shown = shown or cache_dir
    try:
        fd = private_open(os.path.join(cache_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # private_open follows no symlink: one was planted
            raise UsageError(
                f"cache {shown}: {LOCK_FILE} is a symbolic link; a cache holds none"
            ) from None
        raise UsageError(f"cache {shown} is not writable: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheLocked(
            f"cache {shown} is in use by another corfs process (a mount that is "
            "stopping holds it until its fetched bytes are stored)"
        ) from None
    return fd


def is_locked(cache_dir: str) -> bool:
    """True when a live process holds CACHE's lock (a mount is running on it)."""
    try:
        fd = os.open(os.path.join(cache_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_small_file(cache_dir: str, relative: str, text: str, shown: str | None = None) -> None:
    """CacheFull / CacheError if it cannot be written (a full cache disk): the caller
    decides what that costs; no temporary file is left behind. `shown`: CACHE as the user
    named it, for the message (cache_dir may be a held_path)."""
    path = os.path.join(cache_dir, relative)
    tmp = f"{path}.tmp"
    try:
        ensure_private_dir(os.path.dirname(path))
        with os.fdopen(private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise cache_os_error(exc, f"writing {os.path.join(shown or cache_dir, relative)}") from None


def read_small_file(cache_dir: str, relative: str) -> str | None:
    try:
        with open(os.path.join(cache_dir, relative)) as f:
            return f.read()
    except OSError:
        return None


def remove_small_file(cache_dir: str, relative: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(cache_dir, relative))
