"""How filled chunks reach the data file (DataFile.store): aligned bytes go around the page
cache with O_DIRECT, anything else through it; stale cached pages never hide new bytes; a file
system that refuses O_DIRECT still gets every byte, and the fallback waits its turn as a
buffered store; a full disk is CacheFull. Through an Image: a client write never overlaps a
store in its page-cache folio span, and a write the disk took only half of leaves its chunks
dirty."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass

import pytest
import trio

from corfs.buffers import aligned_copy
from corfs.datafile import FOLIO_SPAN, DataFile, Way
from corfs.digest import Buffer
from corfs.errors import CacheError, CacheFull
from corfs.store import CacheStore, ChunkState
from tests.core.rig import CS, random_bytes, resident_pages

BLOCK = 1 << 20  # one 1 MiB chunk


@pytest.fixture
def store(tmp_path):
    store = CacheStore.open(str(tmp_path / "cache"))
    store.create_image("a", 4 * BLOCK, BLOCK, "v1", "test")
    try:
        direct = os.open(store.data_path("a"), os.O_WRONLY | os.O_DIRECT)
    except OSError:
        store.close()
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    os.close(direct)
    yield store
    store.close()


def read_back(store: CacheStore, offset: int, length: int) -> bytes:
    return os.pread(store.data_fd("a"), length, offset)


@dataclass(frozen=True)
class Piece:
    index: int
    data: Buffer | None


def store_fill(store: CacheStore, offset: int, pieces: list[Buffer]) -> None:
    """Store adjacent chunks from `offset` as a fill a client waits for would."""
    first = offset // BLOCK
    chunks = [Piece(first + i, data) for i, data in enumerate(pieces)]
    data_file = store.data_file("a")

    async def store_all() -> None:
        await data_file.store(chunks, wanted=lambda i: True, stored=lambda _: None, coalesce=True)

    trio.run(store_all)


def test_aligned_fill_goes_around_the_page_cache(store) -> None:
    data = random_bytes(BLOCK, seed=1)
    os.posix_fadvise(store.data_fd("a"), 0, 0, os.POSIX_FADV_DONTNEED)
    store_fill(store, BLOCK, [aligned_copy(data)])
    assert resident_pages(store.data_path("a"), BLOCK, BLOCK) == 0  # nothing copied into it
    assert read_back(store, BLOCK, BLOCK) == data
    # Bytes that cannot go direct (read-only, as dedup's pread gives) go through the cache.
    other = random_bytes(BLOCK, seed=2)
    store_fill(store, 2 * BLOCK, [other])
    assert resident_pages(store.data_path("a"), 2 * BLOCK, BLOCK) > 0
    assert read_back(store, 2 * BLOCK, BLOCK) == other


def test_direct_fill_replaces_stale_cached_pages(store) -> None:
    # A chunk that was local, got forgotten (verify found it bad) and is filled anew: its old
    # bytes are still in the page cache when the new ones are written around it.
    stale = random_bytes(BLOCK, seed=3)
    store.write_data("a", 0, stale)
    assert read_back(store, 0, BLOCK) == stale  # cached now
    fresh = random_bytes(BLOCK, seed=4)
    store_fill(store, 0, [aligned_copy(fresh)])
    assert read_back(store, 0, BLOCK) == fresh


def test_a_refused_direct_write_falls_back_to_the_page_cache(store, monkeypatch) -> None:
    real_pwritev = os.pwritev
    direct_fds: list[int] = []

    def refuse_direct(fd: int, pieces, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_fds.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, pieces, offset)

    monkeypatch.setattr(os, "pwritev", refuse_direct)
    first, second = random_bytes(BLOCK, seed=5), random_bytes(BLOCK, seed=6)
    store_fill(store, 0, [aligned_copy(first)])
    store_fill(store, BLOCK, [aligned_copy(second)])
    assert len(direct_fds) == 1  # tried once; the image's fills are buffered from then on
    assert store.data_file("a").refused == {Way.DIRECT}
    assert read_back(store, 0, 2 * BLOCK) == first + second


def test_a_full_disk_on_a_direct_write_is_cache_full(store, monkeypatch) -> None:
    def no_space(fd: int, data, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", no_space)
    with pytest.raises(CacheFull) as info:
        store_fill(store, 0, [aligned_copy(random_bytes(BLOCK))])
    assert info.value.errno == errno.ENOSPC


# ---- through an Image: buffered writes never overlap a direct store in one folio span ----

SPAN_CHUNKS = FOLIO_SPAN // CS


def test_a_client_write_waits_for_a_store_in_its_folio_span(rig_factory, monkeypatch) -> None:
    data = random_bytes((SPAN_CHUNKS + 8) * CS, seed=9)
    release = threading.Event()
    storing = threading.Event()
    real_write_run = DataFile._write_run

    def slow_write_run(self, way, offset, pieces):
        storing.set()
        release.wait(10)
        return real_write_run(self, way, offset, pieces)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            monkeypatch.setattr(DataFile, "_write_run", slow_write_run)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(image.read, 4 * CS, 10)  # fills chunk 4: its store blocks
                assert await trio.to_thread.run_sync(storing.wait, 10), "storing never came"
                done: list[str] = []

                async def write(name: str, index: int) -> None:
                    await image.write(index * CS, bytes([index % 256]) * CS)  # whole chunks
                    done.append(name)

                nursery.start_soon(write, "same span", 1)
                nursery.start_soon(write, "next span", SPAN_CHUNKS + 1)
                with trio.fail_after(10):
                    while "next span" not in done:
                        await trio.sleep(0.01)
                await trio.sleep(0.1)
                assert done == ["next span"]  # chunk 1 shares a folio span with chunk 4
                release.set()
            assert sorted(done) == ["next span", "same span"]
            assert image.state_of(4) == ChunkState.CLEAN
            assert bytes(await image.read(CS, CS)) == bytes([1]) * CS
            assert bytes(await image.read(4 * CS, CS)) == data[4 * CS : 5 * CS]

    trio.run(main)


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EIO])
def test_a_short_write_marks_its_chunks_dirty_and_drops_kept_bytes(
    rig_factory, monkeypatch, failure
):
    data = random_bytes(4 * CS, seed=10)

    calls = []

    def half_write(fd: int, pieces, offset: int) -> int:  # half, then the disk fails
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(failure, os.strerror(failure))
        whole = b"".join(bytes(piece) for piece in pieces)
        return real_pwrite(fd, whole[: len(whole) // 2], offset)

    real_pwrite = os.pwrite

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            assert bytes(await image.read(CS, 100)) == data[CS : CS + 100]  # kept, not all read
            await image.wait_stored()
            monkeypatch.setattr(os, "pwritev", half_write)
            with pytest.raises(CacheError) as info:
                await image.write(CS, b"\xaa" * 200)
            monkeypatch.undo()
            assert info.value.errno == failure  # the VM sees why (ENOSPC pauses it in QEMU)
            # 100 bytes landed: the chunk is no longer the base's, and reads show the file.
            assert image.state_of(1) == ChunkState.DIRTY
            expected = b"\xaa" * 100 + data[CS + 100 : CS + 200]
            assert bytes(await image.read(CS, 200)) == expected

    trio.run(main)


def test_a_waited_for_run_is_one_write_a_stream_run_one_per_chunk(rig_factory, monkeypatch):
    data = random_bytes(16 * CS, seed=11)
    writes: list[int] = []  # pieces per write
    real_write_run = DataFile._write_run

    def counting(self, way, offset, pieces):
        writes.append(len(pieces))
        return real_write_run(self, way, offset, pieces)

    monkeypatch.setattr(DataFile, "_write_run", counting)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            assert bytes(await image.read(0, 4 * CS)) == data[: 4 * CS]  # a client waits
            await image.wait_stored()
            assert writes == [4]
            writes.clear()
            await image.wait_local(range(8, 12), background=True)  # the stream's run
            await image.wait_stored()
            assert writes == [1, 1, 1, 1]  # a guest's flush never queues behind 4 at once
            assert bytes(await image.read(8 * CS, 4 * CS)) == data[8 * CS : 12 * CS]

    trio.run(main)


def test_a_buffered_fill_of_a_chunk_written_meanwhile_leaves_nothing_behind(rig_factory) -> None:
    # The last chunk is short, so it would be stored through the page cache. A client
    # overwrites it whole while its fetch is in flight: the fill then stores nothing (the
    # base's bytes never land over the write), and a direct store in the same folio span
    # afterwards neither waits on nor trips over a store that is not happening. (This test
    # held a hook for an empty store call, which no longer happens: it waited 10 s for it.)
    data = random_bytes(7 * CS + 100, seed=12)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image, source = rig.image("a"), rig.source("a")
            source.faults.delay = 0.2
            async with trio.open_nursery() as nursery:
                nursery.start_soon(image.wait_local, range(7, 8))
                await trio.sleep(0.05)
                assert image.is_filling(7), "the fetch of chunk 7 is not in flight: no test"
                await image.write(7 * CS, b"w" * 100)  # the whole short chunk: no wait
                with trio.fail_after(5):
                    while image.is_filling(7):  # its fetch ends, storing nothing
                        await trio.sleep(0.01)
                source.faults.delay = 0
                with trio.fail_after(5):  # chunk 5 shares the span: fetched, stored directly
                    assert bytes(await image.read(5 * CS, CS)) == data[5 * CS : 6 * CS]
            await image.wait_stored()
            assert image.state_of(7) == ChunkState.DIRTY
            assert image.is_local(5)
            assert bytes(await image.read(7 * CS, 100)) == b"w" * 100
            assert rig.data_file("a")[7 * CS :] == b"w" * 100

    trio.run(main)


# ---- two fills in one folio span: a buffered store never overlaps any other store there ----


def direct_io_works(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("first", "second", "second_waits"),
    [
        (7, 5, True),  # buffered (the short last chunk) first: a direct store waits for it
        (5, 7, True),  # direct first: the buffered store waits for it
        (5, 4, False),  # two direct stores do not serialise (O_DIRECT keeps no folio)
    ],
    ids=["direct-after-buffered", "buffered-after-direct", "direct-beside-direct"],
)
def test_fills_in_one_folio_span(rig_factory, monkeypatch, first, second, second_waits) -> None:
    data = random_bytes(7 * CS + 100, seed=13)  # chunks 0-7 in one span, chunk 7 short
    assert SPAN_CHUNKS >= 8
    started: list[int] = []
    direct: dict[int, bool] = {}
    first_started, release_first = threading.Event(), threading.Event()
    real_write_chunks = DataFile._write_chunks

    def write_chunks(self, chunks, ways, coalesce):
        for c in chunks:
            direct[c.index] = ways[c.index] is Way.DIRECT
        started.extend(c.index for c in chunks)
        if [c.index for c in chunks] == [first]:
            first_started.set()
            release_first.wait(10)
        return real_write_chunks(self, chunks, ways, coalesce)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            if not direct_io_works(rig.store.data_path("a")):
                pytest.skip("the file system under tmp_path refuses O_DIRECT")
            image = rig.image("a")
            monkeypatch.setattr(DataFile, "_write_chunks", write_chunks)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(image.wait_local, range(first, first + 1))
                assert await trio.to_thread.run_sync(first_started.wait, 10), "no first store"
                nursery.start_soon(image.wait_local, range(second, second + 1))
                with trio.move_on_after(0.3):
                    while second not in started:
                        await trio.sleep(0.005)
                assert (second not in started) == second_waits, started
                release_first.set()
            await image.wait_stored()
            assert started == [first, second]
            assert direct == {index: index != 7 for index in (first, second)}
            for index in (first, second):
                start = index * CS
                assert bytes(await image.read(start, CS)) == data[start : start + CS]
                assert rig.data_file("a")[start : start + CS] == data[start : start + CS]

    trio.run(main)


def test_a_reader_arriving_while_a_fill_stores_never_sees_zeros(rig_factory, monkeypatch) -> None:
    """The fill's bytes are on their way to the data file (the store is slow): a second reader
    of that chunk must wait for them or get them from the fill, never read the hole."""
    data = random_bytes(8 * CS, seed=14)
    storing, release = threading.Event(), threading.Event()
    real_write_chunks = DataFile._write_chunks

    def slow_write_chunks(self, chunks, ways, coalesce):
        storing.set()
        release.wait(10)
        return real_write_chunks(self, chunks, ways, coalesce)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            monkeypatch.setattr(DataFile, "_write_chunks", slow_write_chunks)
            got: dict[str, bytes] = {}

            async def read(who: str) -> None:
                got[who] = bytes(await image.read(3 * CS, CS))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "first")
                assert await trio.to_thread.run_sync(storing.wait, 10), "storing never came"
                nursery.start_soon(read, "second")
                await trio.sleep(0.1)
                release.set()
            assert got == {"first": data[3 * CS : 4 * CS], "second": data[3 * CS : 4 * CS]}
            assert rig.source("a").reads.count((3 * CS, CS)) <= 1

    trio.run(main)


def test_a_refused_direct_store_falls_back_as_a_buffered_one(rig_factory, monkeypatch) -> None:
    """A direct store the file system refuses (EINVAL) is written through the page cache: that
    fallback waits, like any buffered store, for a direct store in flight in its folio span."""
    data = random_bytes(8 * CS, seed=15)
    real_pwritev = os.pwritev
    events: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def pwritev(fd: int, pieces, offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        if direct and offset == 5 * CS:
            events.append("5 direct")
            holding.set()
            release.wait(10)
            events.append("5 done")
        elif direct and offset == 4 * CS:
            raise OSError(errno.EINVAL, "Invalid argument")
        elif offset == 4 * CS:
            events.append("4 buffered")
        return real_pwritev(fd, pieces, offset)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            if not direct_io_works(rig.store.data_path("a")):
                pytest.skip("the file system under tmp_path refuses O_DIRECT")
            image = rig.image("a")
            monkeypatch.setattr(os, "pwritev", pwritev)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(image.wait_local, range(5, 6))
                assert await trio.to_thread.run_sync(holding.wait, 10), "holding never came"
                nursery.start_soon(image.wait_local, range(4, 5))
                await trio.sleep(0.3)
                release.set()
            await image.wait_stored()
            assert events == ["5 direct", "5 done", "4 buffered"]
            for index in (4, 5):
                start = index * CS
                assert rig.data_file("a")[start : start + CS] == data[start : start + CS]

    trio.run(main)


def test_a_store_larger_than_one_write_call_takes_is_written_whole(store, monkeypatch) -> None:
    """Linux writes at most MAX_RW_COUNT (2 GiB - 4 KiB) per write call and returns the count
    (`os.write(fd, 3 GiB)` to /dev/null: 2147479552), a short count with the disk not full.
    A coalesced store of chunks of 512 MiB or more (4 read-ahead chunks in one pwritev), or a
    chunk of 2 GiB or more, hit it: ShortWrite, "cache disk full", the chunks never stored.
    Here the cap is scaled down to one chunk and a page."""
    cap = BLOCK + 4096
    real = os.pwritev

    def capped(fd: int, pieces, offset: int) -> int:  # noqa: ANN001
        out, room = [], cap
        for piece in pieces:
            view = memoryview(piece).cast("B")[:room]
            out.append(view)
            room -= len(view)
            if not room:
                break
        return real(fd, out, offset)

    monkeypatch.setattr(os, "pwritev", capped)
    first, second = random_bytes(BLOCK, seed=41), random_bytes(BLOCK, seed=42)
    store_fill(store, 0, [aligned_copy(first), aligned_copy(second)])  # was: ShortWrite
    assert read_back(store, 0, 2 * BLOCK) == first + second
