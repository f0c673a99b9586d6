"""Issue 13.2: a random miss's range fetch (ranges.py) racing changes of its chunks' state. A
read after a write never sees the base's bytes, and the blocks kept keep ranges.py's invariant:
the base's bytes of chunks absent since they were fetched (a chunk changing state drops them)."""

from __future__ import annotations

import errno

import pytest
import trio

from corfs.errors import BaseAccessDenied, BaseError, BaseNotFound, ChunkUnavailable
from corfs.image import Image
from corfs.store import ChunkState
from tests.core.rig import random_bytes, run_with_mock_clock

BIG_CS = 1 << 20  # chunks larger than a small read: misses take ranges


def blocks_held(image: Image, chunk: int) -> int:
    """How many blocks of `chunk` the image keeps for re-reads."""
    ranges = image._ranges
    blocks = ranges.blocks_of(chunk * BIG_CS, BIG_CS)
    return len(blocks) - len(ranges.missing(blocks))


async def read_in_flight(nursery: trio.Nursery, image: Image, offset: int) -> list[bytes]:
    """A 4 KiB read of `image` at `offset` started in `nursery` and given 0.1 s (its range
    fetch is then in flight); the list gets its answer when it ends."""
    answer: list[bytes] = []

    async def read() -> None:
        answer.append(bytes(await image.read(offset, 4096)))

    nursery.start_soon(read)
    await trio.sleep(0.1)
    return answer


def test_a_whole_chunk_write_while_a_range_is_fetched(rig_factory) -> None:
    """The write lands (no fill: it covers the chunk) before the range's answer: the answer
    is not kept as the chunk's blocks, and later reads see the write."""
    data = random_bytes(8 * BIG_CS, seed=41)
    at = 3 * BIG_CS + 8192

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS) as rig:
            image, source = rig.image("a"), rig.source("a")
            source.faults.delay = 1.0
            async with trio.open_nursery() as nursery:
                answer = await read_in_flight(nursery, image, at)
                assert source.reads == [(at, 4096)]  # a range, in flight
                await image.write(3 * BIG_CS, b"w" * BIG_CS)
            assert answer[0] in (data[at : at + 4096], b"w" * 4096)  # it raced the write
            assert blocks_held(image, 3) == 0
            assert bytes(await image.read(at, 4096)) == b"w" * 4096
            assert bytes(await image.read(at - 4096, 3 * 4096)) == b"w" * 3 * 4096

    run_with_mock_clock(main)


def test_a_chunk_filled_forgotten_and_written_while_a_range_is_fetched(rig_factory) -> None:
    """While the range is fetched its chunk is filled by the stream, stored, forgotten (a
    scrub: absent again) and written in part (filled again, then dirty): its answer is not
    kept, and the written bytes are read."""
    data = random_bytes(8 * BIG_CS, seed=42)
    at = 3 * BIG_CS + 8192

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS) as rig:
            image, source = rig.image("a"), rig.source("a")
            source.faults.delay = 1.0
            async with trio.open_nursery() as nursery:
                answer = await read_in_flight(nursery, image, at)
                source.faults.delay = 0.0  # the range's answer is still 0.9 s away
                await image.fill_each(range(3, 4))
                await image.wait_stored()
                assert image.state_of(3) == ChunkState.CLEAN
                assert image.forget_chunk(3)
                await image.write(at + 100, b"x" * 10)
                assert image.state_of(3) == ChunkState.DIRTY and not answer
            expected = data[at : at + 100] + b"x" * 10 + data[at + 110 : at + 4096]
            assert answer[0] in (data[at : at + 4096], expected)  # it raced the write
            assert blocks_held(image, 3) == 0
            assert bytes(await image.read(at, 4096)) == expected

    run_with_mock_clock(main)


def test_a_range_answered_after_a_forget_is_the_bases_until_a_write(rig_factory) -> None:
    """The chunk is filled and forgotten while the range is fetched: absent again, so the
    answer (the base's bytes) may be kept; a write of the chunk then drops it."""
    data = random_bytes(8 * BIG_CS, seed=43)
    at = 3 * BIG_CS + 8192

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS) as rig:
            image, source = rig.image("a"), rig.source("a")
            source.faults.delay = 1.0
            async with trio.open_nursery() as nursery:
                answer = await read_in_flight(nursery, image, at)
                source.faults.delay = 0.0
                await image.fill_each(range(3, 4))
                await image.wait_stored()
                assert image.forget_chunk(3)
            assert answer[0] == data[at : at + 4096]
            assert bytes(await image.read(at, 4096)) == data[at : at + 4096]
            await image.write(3 * BIG_CS, b"w" * BIG_CS)
            assert blocks_held(image, 3) == 0
            assert bytes(await image.read(at, 4096)) == b"w" * 4096

    run_with_mock_clock(main)


def test_a_small_read_across_a_written_chunk_and_an_absent_one(rig_factory) -> None:
    """A 4 KiB read across a chunk boundary, its blocks kept, then each chunk written whole
    in turn: the read never takes a range over a chunk that is not absent."""
    data = random_bytes(8 * BIG_CS, seed=44)
    at = 4 * BIG_CS - 2048

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS) as rig:
            image = rig.image("a")
            with trio.fail_after(10):
                assert bytes(await image.read(at, 4096)) == data[at : at + 4096]
                await image.write(4 * BIG_CS, b"w" * BIG_CS)
                assert bytes(await image.read(at, 4096)) == data[at : at + 2048] + b"w" * 2048
                await image.write(3 * BIG_CS, b"v" * BIG_CS)
                assert bytes(await image.read(at, 4096)) == b"v" * 2048 + b"w" * 2048

    run_with_mock_clock(main)


def test_the_last_partial_block_while_a_range_is_fetched(rig_factory) -> None:
    """The image ends 100 bytes into its last chunk: ranges there are cut at the end, and a
    write of that whole chunk (cut at the end too) racing a range across into it is read."""
    size = 8 * BIG_CS + 100
    data = random_bytes(size, seed=45)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS) as rig:
            image, source = rig.image("a"), rig.source("a")
            assert bytes(await image.read(size - 50, 4096)) == data[size - 50 :]
            assert source.reads[-1] == (8 * BIG_CS, 100)
            source.faults.delay = 1.0
            async with trio.open_nursery() as nursery:
                answer = await read_in_flight(nursery, image, size - 3000)
                await image.write(8 * BIG_CS, b"w" * 200)  # answered 100: cut at the end
            written = data[size - 3000 : 8 * BIG_CS] + b"w" * 100
            assert answer[0] in (data[size - 3000 :], written)
            assert blocks_held(image, 8) == 0
            with trio.fail_after(10):
                assert bytes(await image.read(size - 50, 4096)) == b"w" * 50
                assert bytes(await image.read(size - 3000, 4096)) == written

    run_with_mock_clock(main)


@pytest.mark.parametrize("missing", [BaseNotFound, BaseAccessDenied])
def test_a_range_the_base_lacks_or_forbids_fails_eio(
    rig_factory, missing: type[BaseError]
) -> None:
    """A small random miss takes a range (ranges.py), not a fill: when the base lacks or
    forbids the image (deleted on the server mid-run: 404; 403) its read fails as a fill's
    does, EIO (ChunkUnavailable), never ENOENT/EACCES, which QEMU takes for the image file
    itself. Found with many VMs on one HTTP mount and an image deleted on the server: 4 KiB
    reads of it failed ENOENT, 1 MiB ones EIO."""
    data = random_bytes(8 * BIG_CS, seed=46)
    at = 3 * BIG_CS + 8192

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS) as rig:
            image, source = rig.image("a"), rig.source("a")
            source.faults.fail_with = missing
            source.faults.fail_next = 10**6
            with pytest.raises(ChunkUnavailable) as info:
                await image.read(at, 4096)
            assert source.reads and source.reads[0] == (at, 4096)  # a range, not the chunk
            assert info.value.errno == errno.EIO
            with pytest.raises(ChunkUnavailable):  # and so does a whole chunk's fill
                await image.read(5 * BIG_CS, BIG_CS)
            source.faults.fail_next = 0
            assert bytes(await image.read(at, 4096)) == data[at : at + 4096]

    run_with_mock_clock(main)
