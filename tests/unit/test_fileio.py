"""Whole reads although one read call moves at most MAX_RW_COUNT (Linux: 2 GiB - 4 KiB, a
short count with the file long enough; `os.preadv` of 2.4 GiB from a 3 GiB sparse file:
2147479552). The cap is scaled down here to 64 KiB and a page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from corfs.base import open_base
from corfs.fileio import pread_full

CAP = (64 << 10) + 4096
DATA = os.urandom(3 * (64 << 10) + 100)


@pytest.fixture
def capped_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, length: int, offset: int) -> bytes:
        return real_pread(fd, min(length, CAP), offset)

    def preadv(fd: int, buffers: list, offset: int) -> int:  # one buffer, as corfs calls it
        (buffer,) = buffers
        return real_preadv(fd, [memoryview(buffer).cast("B")[:CAP]], offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)


def test_a_dir_base_reads_a_run_longer_than_one_call_whole(tmp_path: Path, capped_reads) -> None:
    """Before: the short count was taken for a base image that shrank (BaseChanged: the image
    failed with ESTALE, its cache to be reset) for runs of 2 GiB or more."""
    (tmp_path / "disk.raw").write_bytes(DATA)

    async def main() -> None:
        base = await open_base(str(tmp_path))
        try:
            (image,) = await base.list_images()
            assert bytes(await image.read(0, len(DATA))) == DATA
            assert bytes(await image.read(5, len(DATA) - 5)) == DATA[5:]
        finally:
            await base.aclose()

    trio.run(main)


def test_pread_full_reads_the_range_and_stops_at_the_end_of_the_file(
    tmp_path: Path, capped_reads
) -> None:
    """detach, verify and publish read chunks with it (a 2 GiB chunk came back short: a
    detached image with a hole where its tail was, a chunk failing its digest)."""
    path = tmp_path / "f"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_full(fd, len(DATA), 0) == DATA
        assert pread_full(fd, 200_000, 7) == DATA[7:200_007]
        assert pread_full(fd, len(DATA), 100) == DATA[100:]  # the file ends first
        assert pread_full(fd, 10, len(DATA)) == b""
    finally:
        os.close(fd)
