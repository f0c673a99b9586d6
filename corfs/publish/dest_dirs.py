"""The directories of a local publish destination, held by descriptor: DEST may be a directory
other users can write (a shared web root, a directory in /tmp), so a name in it can be theirs.

- DEST/.corfs-tmp (temp files, the index lock; the temp files of killed runs are removed) must
  be a directory of this user's that no other may write: a link of theirs there made a
  publish remove the user's own files where it pointed, and in a directory of theirs they could
  swap a temp file before its rename. "This user's" is judged as the file system shows what
  this user creates (a probe directory): under NFS root squashing, or CIFS and sshfs mounted
  with one owner and mode for every file, that is not the user's own uid and mode.
- The directories of keys (chunks/...) are made and entered by descriptor, never through a
  link: one planted there would have taken the objects, and the mode given to a new directory,
  wherever it pointed.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from dataclasses import dataclass

from ..errors import CorfsError, UsageError

PUBLIC_DIR_MODE = 0o755
TEMP_NAME = re.compile(r"[0-9a-f]{32}\.tmp")  # the only names a run removes from the temp dir
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Ownership:
    """What the file system shows for a directory this user makes: its owner, and whether it
    shows the mode it was made with (some show 0777 for everything)."""

    uid: int
    shows_modes: bool


def _probe(dir_fd: int) -> Ownership:
    """A file made there and looked at by its own descriptor (review: a directory made, then
    looked at by name, could be swapped for another user's in between)."""
    name = f"probe-{uuid.uuid4().hex}"
    fd = create_new(name, dir_fd)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
    return Ownership(st.st_uid, not st.st_mode & 0o077)


def create_new(name: str, dir_fd: int) -> int:
    """A new private file `name` in the directory `dir_fd`, for writing (never through a link,
    never one that was there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dir_fd)


def hold_tmp_dir(path: str) -> int:
    """DEST/.corfs-tmp, opened once and checked (module docstring); UsageError if refused."""
    remove = "remove it: corfs makes its own"
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(f"{path} is a link or not a directory: {remove}") from None
        raise UsageError(f"{path}: {exc.strerror}") from None
    try:
        try:
            own = _probe(fd)
        except OSError as exc:
            raise UsageError(f"{path} is not writable: {exc.strerror}") from None
        st = os.fstat(fd)
        if st.st_uid != own.uid:
            raise UsageError(f"{path} belongs to another user (uid {st.st_uid}): {remove}")
        if own.shows_modes and st.st_mode & 0o022:
            raise UsageError(
                f"{path} may be written by other users (mode {st.st_mode & 0o777:o}): {remove}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_key_dir(root_fd: int, root: str, parts: list[str], *, make: bool = True) -> int:
    """The directory `parts` below DEST (`root_fd`), entered by descriptor, each made where
    missing with PUBLIC_DIR_MODE (`make`; else FileNotFoundError); CorfsError where one is a
    link or not a directory. The caller closes the descriptor returned."""
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(parts):
            made = make
            if make:
                try:
                    os.mkdir(part, PUBLIC_DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    made = False
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = os.path.join(root, *parts[: depth + 1])
                raise CorfsError(f"{where} is a link or not a directory: refused") from None
            os.close(fd)
            fd = child
            if made:
                os.fchmod(fd, PUBLIC_DIR_MODE)  # mkdir's mode went through the umask
        return fd
    except BaseException:
        os.close(fd)
        raise
