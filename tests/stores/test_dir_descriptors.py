"""Review finding: DirImage._open runs in up to 8 worker threads at once (_READ_LIMITER); each
sees `_fd is None`, opens, and the last assignment wins: the other descriptors leak (never
closed, not even by aclose)."""

from __future__ import annotations

import os

import trio

from corfs.base.dir import DirBase


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
