"""Review finding: O_NOFOLLOW guards only the last component of DirImage.path. A symlinked
entry (link.raw -> sub/img.raw, inside BASE) is stored as its resolved path BASE/sub/img.raw;
a directory `sub` swapped for a symbolic link since the listing is followed, and the daemon
opens what it names (here a FIFO outside BASE, whose waiting writer that open lets go)."""

from __future__ import annotations

import os

import pytest
import trio

from corfs.base.dir import DirBase
from corfs.errors import BaseChanged
from tests.fifo import fifo_opened


def test_a_directory_swapped_for_a_symlink_is_not_followed(tmp_path) -> None:
    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "sub").mkdir(parents=True)
    outside.mkdir()
    (base / "sub" / "img.raw").write_bytes(bytes(65536))
    (base / "link.raw").symlink_to("sub/img.raw")
    fifo = outside / "img.raw"
    os.mkfifo(fifo)

    async def main() -> None:
        store = DirBase.open(str(base))
        images = {image.name: image for image in await store.list_images()}
        (base / "sub").rename(base / "old-sub")
        (base / "sub").symlink_to(outside)
        with pytest.raises(BaseChanged):
            await images["link.raw"].read(0, 4096)
        await store.aclose()

    with fifo_opened(fifo) as opened:
        trio.run(main)
        assert not opened.wait(1), "the base opened what the swapped directory names"
