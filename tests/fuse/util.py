"""Helpers for the tests/fuse suite: status, O_DIRECT I/O, page-cache drops, snapshots of a
directory tree (to prove a failed command changed nothing), one-line CLI errors."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corfs.control_client import read_status
from corfs.mountinfo import find_mount
from tests.mounting import run_corfs

KIB = 1 << 10
MIB = 1 << 20


def status(path: str | os.PathLike[str]) -> dict:
    """`corfs status PATH --json`, asserted to succeed."""
    result = run_corfs("status", path, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def live_status(mnt: str | os.PathLike[str]) -> dict:
    """The status straight from the mount's xattrs, pages joined (what `corfs status` reads,
    without starting a process)."""
    return read_status(os.fspath(mnt))


def image_status(st: dict, name: str) -> dict:
    (found,) = [image for image in st["images"] if image["name"] == name]
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def wait_stored(mnt: str | os.PathLike[str], name: str, local_bytes: int) -> dict:
    """The live status once `name` has `local_bytes` local: fetched chunks are stored behind
    their readers (write_behind.py), so they count as local a moment after the read returns."""
    return wait_for(
        lambda: image_status(s := live_status(mnt), name)["local_bytes"] == local_bytes and s,
        what=f"{local_bytes} bytes of {name} to be stored",
    )


def wait_complete(mnt: str | os.PathLike[str], name: str, timeout: float = 30.0) -> dict:
    return wait_for(
        lambda: (s := image_status(live_status(mnt), name))["state"] == "complete" and s,
        timeout,
        f"{name} to be streamed completely",
    )


def _aligned(length: int) -> mmap.mmap:
    return mmap.mmap(-1, max(length, 1))  # page aligned, as O_DIRECT wants


def direct_read(path: str | os.PathLike[str], offset: int, length: int) -> bytes:
    """pread with O_DIRECT: bypasses the kernel page cache, so the daemon sees the read."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = _aligned(length)
        n = os.preadv(fd, [memoryview(buf)[:length]], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def direct_write(
    path: str | os.PathLike[str], offset: int, data: bytes, *, fsync: bool = False
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = _aligned(len(data))
        buf[: len(data)] = data
        n = os.pwritev(fd, [memoryview(buf)[: len(data)]], offset)
        assert n == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def snapshot(*roots: str | os.PathLike[str]) -> dict[str, tuple]:
    """Every path below `roots` with its type, size, mtime and (files) content: equal
    snapshots mean nothing was created, removed or changed."""
    found: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            found[str(root)] = ("missing",)
            continue
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in paths:
            st = path.lstat()
            content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            found[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return found


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A failed command: non-zero exit, exactly one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, f"expected failure, got 0: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def mount_options(mnt: str | os.PathLike[str]) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the mount at `mnt` from mountinfo."""
    entry = find_mount(os.path.abspath(mnt))
    if entry is None:
        raise AssertionError(f"{mnt} is not in /proc/self/mountinfo")
    return set(entry.options), set(entry.super_options)
