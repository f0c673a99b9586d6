"""Review finding: O_NOFOLLOW guards only the last component of DirImage.path. A symlinked
entry (link.raw -> sub/img.raw, inside BASE) is stored as its resolved path BASE/sub/img.raw;
a directory `sub` swapped for a symbolic link since the listing is followed, and the daemon
opens what it names (here a FIFO outside BASE, whose waiting writer that open lets go). The
same for an object (read_object): its path is resolved, then opened in a worker thread."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from corfs.base import dir as dir_base
from corfs.base.dir import DirBase
from corfs.errors import BaseChanged, BaseProtocolError
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


def test_a_directory_swapped_for_a_symlink_before_an_object_is_opened_is_not_followed(
    tmp_path,
) -> None:
    """read_object checks that the resolved path of its key stays in BASE, then opens it when
    a read slot is free: with every slot taken (eight slow base reads), a directory on the way
    swapped for a link meanwhile was followed out of BASE. The slots are taken here as those
    reads would hold them."""
    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "chunks" / "ab").mkdir(parents=True)
    (outside / "ab").mkdir(parents=True)
    (base / "chunks" / "ab" / "x.zst").write_bytes(b"inside")
    fifo = outside / "ab" / "x.zst"
    os.mkfifo(fifo)
    failed: list[Exception] = []

    async def main() -> None:
        store = DirBase.open(str(base))
        limiter, readers = dir_base._READ_LIMITER, []
        while limiter.available_tokens:
            readers.append(object())
            await limiter.acquire_on_behalf_of(readers[-1])

        async def read() -> None:
            try:
                await store.read_object("chunks/ab/x.zst", 100)
            except Exception as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:  # the limiter is every base read's in this process: its slots go back
                await trio.testing.wait_all_tasks_blocked()  # resolved, waiting for a slot
                (base / "chunks").rename(base / "old-chunks")
                (base / "chunks").symlink_to(outside)
            finally:
                for reader in readers:
                    limiter.release_on_behalf_of(reader)
        await store.aclose()

    with fifo_opened(fifo) as opened:
        trio.run(main)
        assert not opened.wait(1), "the base opened what the swapped directory names"
    # a base error of that object (the next read finds its key outside BASE): no bytes
    assert [type(exc) for exc in failed] == [BaseProtocolError], failed
