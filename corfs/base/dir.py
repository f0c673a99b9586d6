"""A local directory of raw images as a base. Only regular files directly in the directory
are images; symlinks are followed only when they stay inside BASE, devices and fifos are
never exposed, and neither are names or sizes `entry_problem` refuses nor files the mounting
user may not read (each left out with a warning). Reads run in worker threads because a cold
read from a NAS can block."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import weakref
from dataclasses import dataclass, field

import trio

from ..buffers import aligned_buffer
from ..errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseError,
    BaseNotFound,
    BaseProtocolError,
    BaseUnavailable,
    TransientBaseError,
    UsageError,
)
from ..fileio import preadv_full
from . import leave_out, valid_entry

log = logging.getLogger(__name__)

_READ_LIMITER = trio.CapacityLimiter(8)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


def open_beneath(root: str, path: str, flags: int) -> int:
    """open(path, flags) for a `path` below the directory `root` (both resolved), following
    no symbolic link below `root`: O_NOFOLLOW guards only the last component, and a directory
    on the way swapped for a link would lead the open anywhere. OSError as open() raises it
    (ELOOP or ENOTDIR where a link now stands)."""
    parts = os.path.relpath(path, root).split(os.sep)
    if parts[0] in (os.curdir, os.pardir):
        raise OSError(errno.EXDEV, "not below the base", path)
    walk = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    at = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, walk, dir_fd=at)
            os.close(at)
            at = inner
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=at)
    finally:
        os.close(at)


def _identity(st: os.stat_result) -> str:
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns};ino={st.st_ino}"


# An open beneath BASE refused: a symbolic link now (or one on the way, or a file where a
# directory was), a socket
_NOT_A_FILE = (errno.ELOOP, errno.ENOTDIR, errno.ENXIO)


def _open_error(what: str, exc: OSError) -> BaseError:
    """What a failed open of `what` (an image or object of BASE, by open_beneath) means."""
    if isinstance(exc, FileNotFoundError):
        return BaseNotFound(f"{what} does not exist")
    if exc.errno in _NOT_A_FILE:
        return BaseChanged(f"{what} changed since it was listed")
    if isinstance(exc, PermissionError):  # unreadable since the listing: not a bug
        return BaseAccessDenied(f"{what}: permission denied")
    return TransientBaseError(f"opening {what}: {exc.strerror}")


@dataclass
class DirImage:
    name: str
    size: int
    identity: str
    path: str
    root: str  # BASE, resolved: `path` is opened beneath it (open_beneath)
    layout: None = None
    _fd: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        try:
            # What was put in the image's place since the listing is refused, never used:
            # O_NONBLOCK, a FIFO blocked open() for ever, in a thread keeping one of
            # _READ_LIMITER's slots (every image's): eight reads and the whole base stalled;
            # no symbolic link followed on the way (open_beneath): one there now would have
            # the daemon open whatever it names (a device: /dev/watchdog arms on open). The
            # identity check below refuses anything else.
            fd = open_beneath(self.root, self.path, _OPEN_FLAGS)
        except OSError as exc:
            raise _open_error(f"base image {self.path}", exc) from None
        if _identity(os.fstat(fd)) != self.identity:
            os.close(fd)
            raise BaseChanged(f"base image {self.path} changed since it was opened")
        with self._lock:  # first reads open at once, in up to 8 threads: one fd is kept
            kept = self._fd
            if kept is None and not self._closed:
                self._fd = fd
                return fd
        os.close(fd)
        if kept is None:  # closed meanwhile (a read abandoned at --io-timeout): none leaks
            raise BaseUnavailable(f"base image {self.path}: the base is closed")
        return kept

    def _read_sync(self, offset: int, length: int) -> memoryview:
        fd = self._open()
        data = aligned_buffer(length)
        try:
            got = preadv_full(fd, data, offset)
        except OSError as exc:
            raise TransientBaseError(f"reading {self.path}: {exc.strerror}") from exc
        # The identity check on each read catches an image rewritten in place (mtime moves),
        # after the read: a write before it or during it moved mtime by now (checked before,
        # one landing between the check and the read mixed two versions in one chunk).
        if _identity(os.fstat(fd)) != self.identity:
            raise BaseChanged(f"base image {self.path} changed since it was opened")
        if got != length:
            raise BaseChanged(f"base image {self.path} is shorter than it was")
        return data

    async def read(self, offset: int, length: int) -> memoryview:
        # abandon_on_cancel: a read hung on a dead NAS must not outlive --io-timeout.
        return await trio.to_thread.run_sync(
            self._read_sync, offset, length, limiter=_READ_LIMITER, abandon_on_cancel=True
        )

    def close(self) -> None:
        """For good: a read still in a worker thread (abandoned at --io-timeout) opens no
        descriptor after this (it would leak)."""
        with self._lock:
            fd, self._fd, self._closed = self._fd, None, True
        if fd is not None:
            os.close(fd)


class DirBase:
    def __init__(self, root: str) -> None:
        self.root = root
        self.description = root
        # Every image listed and still used: a listing replaces none of the served ones
        # (refetch.py lists again), and aclose closes them all. By id: DirImage compares by
        # value, so it has no hash.
        self._images: weakref.WeakValueDictionary[int, DirImage] = weakref.WeakValueDictionary()

    @classmethod
    def open(cls, path: str) -> DirBase:
        root = os.path.realpath(path)
        if not os.path.exists(root):
            raise UsageError(f"base directory {path} does not exist")
        if not os.path.isdir(root):
            raise UsageError(f"base {path} is not a directory")
        if not os.access(root, os.R_OK | os.X_OK, effective_ids=True):  # as listing will
            raise UsageError(f"base directory {path} is not readable")
        return cls(root)

    def _entry_image(self, entry: os.DirEntry[str]) -> DirImage | None:
        path = entry.path
        if entry.is_symlink():
            target = os.path.realpath(path)
            if os.path.commonpath([target, self.root]) != self.root:
                log.warning("not exposing %s: symlink points outside the base", path)
                return None
            path = target
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                log.warning("not exposing %s: not a regular file", entry.path)
            return None
        if not valid_entry(self.description, entry.name, st.st_size):
            return None
        # effective_ids: as open() will ask (a daemon given CAP_DAC_READ_SEARCH may read it)
        if not os.access(path, os.R_OK, effective_ids=True):  # a user the file is not for
            leave_out(self.description, entry.name, "permission denied")
            return None
        return DirImage(
            name=entry.name, size=st.st_size, identity=_identity(st), path=path, root=self.root
        )

    async def list_images(self) -> list[DirImage]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            raise BaseNotFound(f"cannot list base directory {self.root}: {exc.strerror}") from exc
        images = [img for e in entries if (img := self._entry_image(e)) is not None]
        self._images.update((id(image), image) for image in images)
        return images

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        path = os.path.realpath(os.path.join(self.root, key))
        if os.path.commonpath([path, self.root]) != self.root:
            raise BaseNotFound(f"{key} is outside the base")

        def read() -> bytes:
            try:
                # O_NONBLOCK: a FIFO put in an object's place would block open() for ever, in a
                # thread that keeps a slot of _READ_LIMITER (every base read's) after its
                # caller gave up; a few such reads stalled the whole mount.
                fd = open_beneath(
                    self.root, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                )
            except OSError as exc:
                if exc.errno in _NOT_A_FILE:  # a bad object, as a FIFO there is (below): a
                    # chunk object was never listed, so not "changed" (that fails its image)
                    raise BaseProtocolError(f"{path} is not a regular file") from None
                raise _open_error(path, exc) from None
            try:
                with open(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise BaseProtocolError(f"{path} is not a regular file")
                    data = f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise BaseProtocolError(f"{path} is larger than {max_bytes} bytes")
                return data
            except OSError as exc:
                raise TransientBaseError(f"reading {path}: {exc.strerror}") from exc

        return await trio.to_thread.run_sync(read, limiter=_READ_LIMITER, abandon_on_cancel=True)

    async def aclose(self) -> None:
        for image in list(self._images.values()):
            image.close()
