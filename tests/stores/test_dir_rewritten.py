"""A dir-base image rewritten in place while a read of it runs: the read is refused
(BaseChanged), never answered with bytes of two versions. The identity (size, mtime, inode)
was checked before the pread only: a write landing between the check and the read went
unseen. The race is forced by writing to the real file from inside the real read."""

from __future__ import annotations

import os

import pytest
import trio

from corfs.base import dir as dir_base
from corfs.base.dir import DirBase
from corfs.errors import BaseChanged


def test_a_write_racing_a_read_is_base_changed(tmp_path, monkeypatch) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    hour_ago = os.stat(path).st_mtime_ns - 3600 * 10**9  # any write moves mtime (coarse clock)
    os.utime(path, ns=(hour_ago, hour_ago))
    real = dir_base.preadv_full

    def rewritten_meanwhile(fd, buffer, offset):  # noqa: ANN001, ANN202
        with open(path, "r+b") as other:  # another process's write, in place
            other.write(b"\xff" * 4096)
        return real(fd, buffer, offset)

    async def main() -> None:
        base = DirBase.open(str(tmp_path))
        (image,) = await base.list_images()
        assert bytes(await image.read(0, 4096)) == bytes(4096)
        monkeypatch.setattr(dir_base, "preadv_full", rewritten_meanwhile)
        with pytest.raises(BaseChanged):
            await image.read(0, 4096)
        await base.aclose()

    trio.run(main)
