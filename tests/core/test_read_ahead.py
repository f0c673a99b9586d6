"""Foreground read-ahead and the bytes kept for readers (fresh.py): a sequential reader keeps
its window moving over chunks already local and fetches in READ_AHEAD_RUN-chunk requests; a
random reader fetches only what it reads; kept bytes never outlive a change of their chunk."""

from __future__ import annotations

import mmap
import os

import pytest
import trio

from corfs.read_ahead import READ_AHEAD_MAX, READ_AHEAD_RUN
from tests.core.rig import (
    CS,
    chunk_reads,
    random_bytes,
    resident_pages,
    run_with_mock_clock,
    wait_until,
)

run = run_with_mock_clock
CHUNKS = 4 * READ_AHEAD_MAX
DATA = random_bytes(CHUNKS * CS, seed=7)


def test_sequential_reader_fetches_ahead_in_whole_runs(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image, source = rig.image("a"), rig.source("a")
            source.faults.delay = 0.01
            for index in range(CHUNKS):
                assert await image.read(index * CS, CS) == DATA[index * CS : (index + 1) * CS]
            assert sorted(chunk_reads(source, CS)) == list(range(CHUNKS))  # each chunk once
            # Nearly every request is a whole run: the window moved on while the reader was
            # served from chunks fetched ahead, not only on its misses (which gave requests of
            # one or two chunks as the reader caught up).
            lengths = [length for _, length in source.reads]
            whole = sum(n == READ_AHEAD_RUN * CS for n in lengths)
            assert whole >= 0.8 * len(lengths) and len(lengths) <= CHUNKS // 3, lengths

    run(main)


def test_random_reader_fetches_only_what_it_reads(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image, source = rig.image("a"), rig.source("a")
            order = [50, 3, 97, 20, 64, 11, 80, 41]
            for index in order:
                await image.read(index * CS + 100, 10)
            await wait_until(lambda: not any(image.is_filling(i) for i in range(CHUNKS)))
            assert chunk_reads(source, CS) == order

    run(main)


def test_kept_bytes_never_outlive_a_write_or_a_forget(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image, source = rig.image("a"), rig.source("a")
            # A read that stops short of the chunk's end leaves its bytes kept.
            assert await image.read(2 * CS, 100) == DATA[2 * CS : 2 * CS + 100]
            await image.write(2 * CS + 10, b"new bytes")
            expected = DATA[2 * CS : 2 * CS + 10] + b"new bytes" + DATA[2 * CS + 19 : 2 * CS + 100]
            assert bytes(await image.read(2 * CS, 100)) == expected
            # Forgotten (a scrub found it bad) and the base now differs: the next read must
            # fetch it anew, not answer from bytes kept from before.
            assert await image.read(5 * CS, 100) == DATA[5 * CS : 5 * CS + 100]
            await image.wait_stored()
            assert image.forget_chunk(5)
            source.data[5 * CS : 6 * CS] = b"\xee" * CS
            assert bytes(await image.read(5 * CS, 100)) == b"\xee" * 100
            assert chunk_reads(source, CS).count(5) == 2

    run(main)


def test_stream_fills_ahead_of_a_sequential_reader_are_kept_for_it(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            for index in range(2):  # a sequential reader at chunk 2
                await image.read(index * CS, CS)
            await wait_until(lambda: not any(image.is_filling(i) for i in range(CHUNKS)))
            far = CHUNKS - 2  # beyond its read-ahead window
            # The stream fills chunks just ahead of it (and far away).
            await image.wait_local(range(READ_AHEAD_MAX + 4, READ_AHEAD_MAX + 6), background=True)
            await image.wait_stored()
            await image.wait_local(range(far, far + 2), background=True)
            await image.wait_stored()
            # Junk behind corfs's back in the data file: a read served by a pread shows it.
            junk = b"\x5a" * (2 * CS)
            fd = os.open(rig.store.data_path("a"), os.O_WRONLY)
            for first in (READ_AHEAD_MAX + 4, far):
                os.pwrite(fd, junk, first * CS)
            os.close(fd)
            near = (READ_AHEAD_MAX + 4) * CS
            assert bytes(await image.read(near, CS)) == DATA[near : near + CS]  # kept bytes
            assert bytes(await image.read(far * CS, CS)) == junk[:CS]  # read from the file

    run(main)


def _page_cache_droppable(directory: str) -> bool:
    """Whether pages of a file here leave the page cache when told to (not on tmpfs)."""
    path = os.path.join(directory, "probe")
    with open(path, "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        return resident_pages(path, 0, 1 << 20) == 0
    finally:
        os.remove(path)


def test_local_chunks_ahead_of_a_sequential_reader_are_read_from_the_cache_file_early(
    rig_factory, tmp_path
) -> None:
    """A thick image read through the mount: the chunks in a sequential reader's window come
    into the page cache before it reads them (the loop's inline preads then do not wait for
    the disk one at a time); the cache disk's own read-ahead (8 MiB on this machine's disk)
    reaches less far."""
    if not _page_cache_droppable(str(tmp_path)):
        pytest.skip("this file system keeps its pages (tmpfs?): nothing to read ahead")
    chunk_size = 1 << 20
    count = 48
    data = random_bytes(count * chunk_size, seed=11)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=chunk_size) as rig:
            image = rig.image("a")
            await image.wait_local(range(count), background=True)
            await image.wait_stored()
            assert image.complete
            path = rig.store.data_path("a")
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

            def resident() -> set[int]:  # the chunks whose every page is in the page cache
                pages = chunk_size // mmap.PAGESIZE
                return {i for i in range(count)
                        if resident_pages(path, i * chunk_size, chunk_size) == pages}

            assert not resident() & set(range(6, count))
            for index in range(6):  # the window grows to READ_AHEAD_MAX chunks
                assert await image.read(index * chunk_size, chunk_size) == data[
                    index * chunk_size : (index + 1) * chunk_size
                ]
            ahead = set(range(20, 6 + READ_AHEAD_MAX))  # beyond the disk's own read-ahead
            await wait_until(lambda: ahead <= resident(), timeout=10)

    trio.run(main)


def test_the_cache_file_is_read_ahead_by_bytes_whatever_the_chunk_size(
    rig_factory, monkeypatch
) -> None:
    """Local chunks hinted ahead of a sequential reader stay within LOCAL_AHEAD_BYTES per read,
    also when one or two chunks are larger than that (64 MiB chunks hinted 128 MiB at once)."""
    import corfs.image
    from corfs.datafile import DataFile

    cap = CS + CS // 2  # 1.5 chunks: two whole chunks would be over it
    monkeypatch.setattr(corfs.image, "LOCAL_AHEAD_BYTES", cap)
    hinted: list[list[int]] = []
    monkeypatch.setattr(
        DataFile, "read_soon", lambda self, offset, length: hinted[-1].append(length)
    )

    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            await image.wait_local(range(image.geometry.chunk_count))
            await image.wait_stored()  # local, not only queued: hinted from the cache file
            for offset in range(0, 60 * CS, 20 * CS):  # large sequential reads (> 64 KiB)
                hinted.append([])
                await image.read(offset, 20 * CS)
            assert any(hinted) and all(sum(lengths) <= cap for lengths in hinted), hinted

    trio.run(main)
