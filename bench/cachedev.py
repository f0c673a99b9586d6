"""A cache device of known speed for the benchmarks: an ext4 file system on a loop device
whose reads and writes the block layer throttles to `rate` bytes/s, so a cache-disk-bound
figure does not depend on what the shared machine's disk does that day.

How it is throttled, and why this way: the machine has cgroup v1 (blkio at
/sys/fs/cgroup/blkio, no cgroup2 io.max). A rule in a child blkio cgroup throttles only the
bios its own tasks submit: O_DIRECT writes, but not buffered writes, whose writeback v1 charges
to the flusher in the root group — nbdkit, rclone, httpdirfs and QEMU write through the page
cache and would escape it. The rule is therefore set in the ROOT blkio group for this loop
device only (`blkio.throttle.{read,write}_bps_device = "MAJ:MIN rate"`): every bio to the
device is throttled, writeback included, so the device is as slow for every system measured
(checked here: dd 1 MiB O_DIRECT 151 MB/s, buffered dd + fsync 127 MB/s, at 150 MiB/s). No
other device's rule is touched. dm-delay adds latency, not a bandwidth limit, so it was not
used. The loop device uses direct I/O on its backing file (no second page cache in between).

Everything is created here and undone on leaving, even on failure: the rules are cleared,
the file system unmounted, the loop device detached, the backing file removed."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

BLKIO = "/sys/fs/cgroup/blkio"
DEFAULT_RATE = 150 * (1 << 20)  # bytes/s


@dataclass(frozen=True)
class CacheDevice:
    name: str  # "disk" or "throttled"
    path: str  # a directory for caches on it
    rate: int | None = None  # the throttle in bytes/s; None: the machine's own disk

    def describe(self) -> str:
        if self.rate is None:
            return f"the machine's disk ({self.path})"
        return (
            f"loop device throttled by blkio (root group, reads and writes, writeback "
            f"included) to {self.rate / 1e6:.0f} MB/s ({self.rate >> 20} MiB/s), ext4"
        )


def throttle_rule(major_minor: str, rate: int) -> str:
    """The line a blkio.throttle.*_bps_device file takes; rate 0 removes the device's rule."""
    major, minor = major_minor.split(":")
    if not (major.isdigit() and minor.isdigit()) or rate < 0:
        raise ValueError(f"bad device {major_minor!r} or rate {rate}")
    return f"{int(major)}:{int(minor)} {rate}\n"


def _set_rules(major_minor: str, rate: int) -> None:
    for kind in ("read", "write"):
        with open(os.path.join(BLKIO, f"blkio.throttle.{kind}_bps_device"), "w") as f:
            f.write(throttle_rule(major_minor, rate))


def _unmount(mountpoint: str) -> None:
    """Unmount; when something still holds it (a peer that did not exit), detach it lazily so
    the loop device is released once that goes."""
    if subprocess.run(["umount", mountpoint], check=False).returncode != 0:
        subprocess.run(["umount", "-l", mountpoint], check=False)


@contextlib.contextmanager
def throttled_device(workdir: str, size: int, rate: int = DEFAULT_RATE) -> Iterator[CacheDevice]:
    """An ext4 file system of `size` bytes mounted under `workdir`, on a loop device throttled
    to `rate` bytes/s for reads and writes; torn down on leaving."""
    if not os.path.exists(os.path.join(BLKIO, "blkio.throttle.write_bps_device")):
        raise RuntimeError(f"no cgroup v1 blkio throttling at {BLKIO}")
    backing = os.path.join(workdir, "cachedev.img")
    mountpoint = os.path.join(workdir, "cachedev")
    with contextlib.ExitStack() as undo:
        with open(backing, "wb") as f:
            f.truncate(size)
        undo.callback(os.remove, backing)
        loop = subprocess.run(
            ["losetup", "--show", "--find", "--direct-io=on", backing],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        undo.callback(subprocess.run, ["losetup", "-d", loop], check=False)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop], check=True)
        os.makedirs(mountpoint, exist_ok=True)
        subprocess.run(["mount", loop, mountpoint], check=True)
        undo.callback(_unmount, mountpoint)
        with open(f"/sys/class/block/{os.path.basename(loop)}/dev") as f:
            major_minor = f.read().strip()
        _set_rules(major_minor, rate)
        undo.callback(_set_rules, major_minor, 0)
        yield CacheDevice("throttled", mountpoint, rate)
