"""The checks of MNT, CACHE and BASE as paths before a mount: MNT usable (bounded: a hung
mount there must not hold `corfs mount`), and the three apart where overlapping breaks it."""

from __future__ import annotations

import errno
import os

from .control_client import ANSWER_TIMEOUT_S, call_bounded
from .errors import UsageError


def check_mountpoint(path: str) -> str:
    """The absolute mountpoint as the user spells it, or UsageError: missing, not a directory,
    already mounted. Checked with symlinks resolved (os.path.ismount() of a symlink is False:
    a second mount went on top of one reached through a symlink), but served as spelled: QEMU
    and libvirt name its images through that spelling, and a live handoff finds QEMU's nodes
    by their file names as strings (handoff.py: resolving them could touch the mount).
    Bounded: a FUSE mount at MNT whose daemon is stopped or hung would hold every stat of it
    (and `corfs mount`) for ever."""
    try:
        return call_bounded(lambda: _check_mountpoint(path))
    except TimeoutError:
        raise UsageError(
            f"{path} does not answer within {ANSWER_TIMEOUT_S:g} s: a mount whose daemon is "
            f"stopped or hung? (fusermount3 -u -z {path} detaches it)"
        ) from None


def _check_mountpoint(path: str) -> str:
    mountpoint = os.path.realpath(path)  # strict=False: a dead mount still gets its hint below
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(
                f"{path} is a dead FUSE mount (its daemon was killed); clear it with: "
                f"fusermount3 -u -z {path}"
            ) from None
        raise UsageError(f"mountpoint {path}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{path} is already a mountpoint")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    return os.path.abspath(path)


def _at_or_below(path: str, top: str) -> bool:
    return os.path.commonpath([path, top]) == top


def check_overlaps(base_url: str, cache_dir: str, mountpoint: str) -> None:
    """UsageError if BASE, CACHE and MNT (resolved) overlap where that breaks the mount: a
    CACHE at or below MNT is hidden by the mount, and the daemon touching it after mounting
    waits on itself for ever; a directory BASE at or below MNT would be read through the
    mount; CACHE == BASE writes the cache into BASE (its files then listed as images); a
    BASE below CACHE was made private with it (its files chmod'ed 0600, its directories 0700:
    BASE changed, and refused if another user owns any of it); a MNT below CACHE hides what
    is there (MNT at CACHE/data: the data files a new image or a handoff makes would go
    through the mount, served by the daemon that waits for them)."""
    cache = os.path.realpath(cache_dir)
    if _at_or_below(cache, mountpoint) or _at_or_below(mountpoint, cache):
        raise UsageError(f"CACHE {cache_dir} and MNT {mountpoint} overlap: keep them apart")
    if "://" in base_url:
        return
    base = os.path.realpath(base_url)
    if _at_or_below(base, mountpoint):
        raise UsageError(f"BASE {base_url} and MNT {mountpoint} overlap: keep them apart")
    if _at_or_below(base, cache):
        raise UsageError(f"BASE {base_url} and CACHE {cache_dir} overlap: keep them apart")


