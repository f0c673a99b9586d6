"""Descriptors of a dir base's images: each opened once, each closed by aclose.

Review finding: DirImage._open runs in up to 8 worker threads at once (_READ_LIMITER); each
sees `_fd is None`, opens, and the last assignment wins: the other descriptors leak (never
closed, not even by aclose)."""

from __future__ import annotations

import os

import pytest
import trio

from corfs.base.dir import DirBase
from corfs.errors import BaseUnavailable


def _open_fds_to(path: str) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                count += 1
        except OSError:
            pass
    return count


def test_concurrent_first_reads_leak_no_descriptor(tmp_path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(1 << 20))

    async def main() -> None:
        base = DirBase.open(str(tmp_path))
        for _ in range(50):
            (image,) = await base.list_images()
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(image.read, i * 4096, 4096)
            await base.aclose()
        assert _open_fds_to(str(path)) == 0  # 50 rounds of 8 first reads, all closed

    trio.run(main)


def test_aclose_closes_images_of_every_listing_and_a_late_open_keeps_none(tmp_path) -> None:
    """Review finding: a listing replaced the base's list of images, so aclose missed the
    descriptors of images listed before (refetch.py lists again while the mount serves the
    first listing's); and a read that opened after close (a worker thread abandoned at
    --io-timeout) kept its descriptor for good."""
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(1 << 20))

    async def main() -> None:
        base = DirBase.open(str(tmp_path))
        (served,) = await base.list_images()
        await served.read(0, 4096)
        (again,) = await base.list_images()
        await again.read(0, 4096)
        assert _open_fds_to(str(path)) == 2
        await base.aclose()
        assert _open_fds_to(str(path)) == 0
        with pytest.raises(BaseUnavailable):
            await served.read(0, 4096)  # its open comes after the close
        assert _open_fds_to(str(path)) == 0

    trio.run(main)
