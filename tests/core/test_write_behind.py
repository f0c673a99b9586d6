"""Issue 13.1: a reader never waits for the cache disk. A fill answers its readers from its
verified bytes and stores them behind (write_behind.py): within a budget, with back-pressure on
the stream, readers' fills dropped (served, not stored) when there is no room, client writes
ordered after the queued base bytes of their folio span, store failures leaving chunks absent,
and nothing recorded local before its bytes are stored."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import AsyncIterator

import pytest
import trio

from corfs.base.memory import MemoryImage
from corfs.datafile import FOLIO_SPAN, DataFile, Way
from corfs.errors import CacheFull, ImageHandedOver
from corfs.image import Image
from corfs.store import ChunkState
from corfs.write_behind import WriteBehind
from tests.core.rig import CS, chunk_reads, committed_states, random_bytes, wait_until

SPAN_CHUNKS = FOLIO_SPAN // CS


class HeldStores:
    """Every store of a data file blocks in its worker thread until `release()`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.go = threading.Event()
        self.started: list[int] = []  # offsets of the stores that reached the file
        real = DataFile._write_run

        def held(datafile, way, offset, pieces):  # noqa: ANN001, ANN202
            self.started.append(offset)
            if not self.go.wait(10):
                raise AssertionError("a store was held for 10 s")
            return real(datafile, way, offset, pieces)

        monkeypatch.setattr(DataFile, "_write_run", held)

    def release(self) -> None:
        self.go.set()


def test_a_cold_read_is_answered_while_its_store_waits_for_the_disk(
    rig_factory, monkeypatch
) -> None:
    data = random_bytes(8 * CS, seed=31)
    held = HeldStores(monkeypatch)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            with trio.fail_after(2):  # before: the read waited for its store (10 s, then failed)
                assert bytes(await image.read(CS + 5, 2 * CS)) == data[CS + 5 : 3 * CS + 5]
                assert bytes(await image.read(2 * CS, 100)) == data[2 * CS : 2 * CS + 100]
            # Answered, not recorded: the store has not reached the disk.
            assert not image.is_local(1) and image.is_filling(1)
            assert image.write_behind.queued_bytes == 3 * CS
            await rig.store.commit()
            assert committed_states(rig.cache_dir, "a") == {}  # never mark before durable
            assert len(chunk_reads(rig.source("a"), CS)) == 3  # queued chunks: no second fetch
            held.release()
            await image.wait_stored()
            assert [image.state_of(i) for i in (1, 2, 3)] == [ChunkState.CLEAN] * 3
            assert image.write_behind.queued_bytes == 0
            await rig.store.commit()
            assert sorted(committed_states(rig.cache_dir, "a")) == [1, 2, 3]
            assert rig.data_file("a")[CS : 4 * CS] == data[CS : 4 * CS]

    trio.run(main)


@contextlib.asynccontextmanager
async def stream_waiting_for_room(
    image: Image, source: MemoryImage, held: HeldStores, budget_chunks: int
) -> AsyncIterator[None]:
    """A write-behind budget of `budget_chunks`, a stream fill of chunks 0-1 fetched (its store
    held) and one of chunks 4-5 waiting for room, not fetched; stores released on leaving."""
    image.write_behind = WriteBehind(budget_chunks * CS)
    await image.wait_local(range(0, 2), background=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: image.wait_local(range(4, 6), background=True))
        await trio.sleep(0.2)
        assert chunk_reads(source, CS) == [0, 1]  # back-pressure: not even fetched
        yield
        held.release()
    await image.wait_stored()


def test_the_stream_waits_for_room_and_readers_never_do(rig_factory, monkeypatch) -> None:
    data = random_bytes(16 * CS, seed=32)
    held = HeldStores(monkeypatch)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image, source = rig.image("a"), rig.source("a")
            async with stream_waiting_for_room(image, source, held, budget_chunks=2):
                # A reader finds no room either: served, not stored (dropped), never waiting.
                with trio.fail_after(2):
                    assert bytes(await image.read(8 * CS, 100)) == data[8 * CS : 8 * CS + 100]
                assert not image.is_filling(8) and image.write_behind.dropped_chunks == 1
                # ... kept a while for re-reads: no second fetch.
                assert bytes(await image.read(8 * CS, 10)) == data[8 * CS : 8 * CS + 10]
                assert chunk_reads(source, CS).count(8) == 1
                # A client joining the waiting stream fill makes it a reader's: no wait either.
                with trio.fail_after(2):
                    assert bytes(await image.read(5 * CS, 10)) == data[5 * CS : 5 * CS + 10]
            assert image.write_behind.queued_bytes == 0
            assert [image.is_local(i) for i in (0, 1, 4, 5, 8)] == [True] * 4 + [False]
            assert image.write_behind.statistics().stored_chunks == 4

    trio.run(main)


@pytest.mark.parametrize(
    ("offset", "length", "waits"),
    [
        (3 * CS + 10, 100, True),  # inside the queued chunk: after its base bytes
        (3 * CS, CS, True),  # the whole queued chunk: never under base bytes stored later
        (2 * CS + CS // 2, CS, True),  # across the queued chunk's start
        (4 * CS - 1, 2, True),  # across its end
        (SPAN_CHUNKS * CS, CS, False),  # a whole chunk in the next folio span: no wait
    ],
    ids=["inside", "whole", "start", "end", "next-span"],
)
def test_a_client_write_goes_after_queued_base_bytes(
    rig_factory, monkeypatch, offset, length, waits
) -> None:
    data = random_bytes((SPAN_CHUNKS + 4) * CS, seed=33)
    held = HeldStores(monkeypatch)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(3 * CS, 10)  # chunk 3 queued, its store held
            written = bytes([0xA5]) * length
            done = trio.Event()

            async def write() -> None:
                await image.write(offset, written)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                await trio.sleep(0.2)
                assert done.is_set() != waits
                held.release()
            await image.wait_stored()
            expected = bytearray(data)
            expected[offset : offset + length] = written
            for index in image.geometry.chunks_of(offset, length):
                assert image.state_of(index) == ChunkState.DIRTY
            for lo in (2 * CS, SPAN_CHUNKS * CS):
                want = bytes(expected[lo : lo + 3 * CS])
                assert bytes(await image.read(lo, 3 * CS)) == want
                await image.wait_stored()
                assert rig.data_file("a")[lo : lo + 3 * CS] == want

    trio.run(main)


def test_a_failed_store_leaves_its_chunks_absent_and_fails_a_waiting_write(
    rig_factory, monkeypatch, caplog
) -> None:
    data = random_bytes(8 * CS, seed=34)
    real_pwritev = os.pwritev
    full = threading.Event()
    full.set()

    def pwritev(fd: int, pieces, offset: int) -> int:  # noqa: ANN001
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, pieces, offset)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            monkeypatch.setattr(os, "pwritev", pwritev)
            assert bytes(await image.read(2 * CS, 10)) == data[2 * CS : 2 * CS + 10]  # served
            await image.wait_stored()
            assert not image.is_local(2) and image.failing_chunks == [2]
            assert image.write_behind.store_failures == 1
            assert [r.message for r in caplog.records if "storing" in r.message] == [
                "storing a chunks 2-2: cache disk full while writing a (left absent)"
            ]
            with pytest.raises(CacheFull):  # a partial write needs the chunk local
                await image.write(5 * CS + 1, b"x")
            assert not image.is_local(5) and image.dirty_chunks == 0
            full.clear()
            await trio.sleep(60)  # the stream's wait after a failure (write_behind.py)
            assert bytes(await image.read(2 * CS, 10)) == data[2 * CS : 2 * CS + 10]
            await image.wait_stored()
            assert image.is_local(2) and image.failing_chunks == [5]  # 5: the write's fill

    from tests.core.rig import run_with_mock_clock

    run_with_mock_clock(main)


# ---- issue 13.2: random readers fetch what they read ---------------------------------------


def test_a_random_read_across_blocks_survives_the_eviction_of_a_held_block(rig_factory) -> None:
    """A read across two blocks, one held: while the other is fetched, other readers' blocks
    evict the held one (a small cache). The read still gets its bytes (was: KeyError -> EIO)."""
    from corfs.ranges import RangeCache

    data = random_bytes(8 * BIG_CS, seed=36)
    block = 64 << 10

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS, random_range=block) as rig:
            image, source = rig.image("a"), rig.source("a")
            image._ranges = RangeCache(2 * block, block)
            held = 3 * BIG_CS
            assert bytes(await image.read(held, 4096)) == data[held : held + 4096]
            across = held + block - 4096  # the held block and the next one
            source.faults.delay = 1.0
            answer: list[bytes] = []

            async def read_across() -> None:
                answer.append(bytes(await image.read(across, 8192)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_across)
                await trio.sleep(0.1)
                source.faults.delay = 0.0
                for other in (6 * BIG_CS, 7 * BIG_CS):  # two more blocks evict the held one
                    assert bytes(await image.read(other, 4096)) == data[other : other + 4096]
            assert answer == [data[across : across + 8192]]

    trio.run(main)

BIG_CS = 1 << 20


@pytest.mark.parametrize(
    ("published", "range_size"),
    [(False, 4096), (False, 64 << 10), (True, 4096)],
    ids=["raw", "raw-64k", "published"],
)
def test_a_random_miss_fetches_a_small_range_and_leaves_the_chunk_absent(
    rig_factory, published, range_size
) -> None:
    data = random_bytes(8 * BIG_CS, seed=35)

    async def main() -> None:
        async with rig_factory(
            {"a": data}, chunk_size=BIG_CS, published=published, random_range=range_size
        ) as rig:
            image, source = rig.image("a"), rig.source("a")
            offsets = (5 * BIG_CS + 3 * range_size + 100, 2 * BIG_CS + 8192, 7 * BIG_CS)
            for offset in offsets:
                assert bytes(await image.read(offset, 4096)) == data[offset : offset + 4096]
            fetched = sum(length for _, length in source.reads)
            if published:  # digests need whole chunks
                assert fetched == 3 * BIG_CS
                return
            blocks = sum((o + 4095) // range_size - o // range_size + 1 for o in offsets)
            assert fetched == blocks * range_size  # the blocks read touch (was 3 whole chunks)
            await image.wait_stored()
            assert image.local_chunks == 0  # the stream makes chunks local, whole
            # Re-reads of a fetched range ask the base nothing.
            offset = 2 * BIG_CS + 8192
            assert bytes(await image.read(offset, 4096)) == data[offset : offset + 4096]
            assert sum(length for _, length in source.reads) == fetched
            # A write changes the chunk: the kept range goes with the old bytes.
            await image.write(offset, b"w" * 10)
            assert bytes(await image.read(offset, 10)) == b"w" * 10
            assert bytes(await image.read(offset + 10, 10)) == data[offset + 10 : offset + 20]

    trio.run(main)


def test_a_small_random_miss_larger_than_a_block_fetches_just_its_blocks(rig_factory) -> None:
    """4 KiB blocks (the default): a 16 KiB or 64 KiB random miss fetches the blocks it
    touches in one request, not its whole chunk; 64 KiB + 4 KiB is no longer small."""
    data = random_bytes(8 * BIG_CS, seed=37)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=BIG_CS, random_range=4096) as rig:
            image, source = rig.image("a"), rig.source("a")
            for offset, length in ((3 * BIG_CS + 4096, 16384), (6 * BIG_CS + 100, 65536)):
                assert bytes(await image.read(offset, length)) == data[offset : offset + length]
                first, last = offset // 4096, (offset + length - 1) // 4096
                assert source.reads[-1] == (first * 4096, (last - first + 1) * 4096)
            assert len(source.reads) == 2
            await image.read(BIG_CS + 4096, 65536 + 4096)
            assert source.reads[-1][1] >= BIG_CS  # a chunk fill

    trio.run(main)


def test_the_stream_leaves_half_the_budget_to_readers(rig_factory, monkeypatch) -> None:
    """Stream fills take at most STREAM_SHARE of the budget: a reader's fill then finds room
    and is stored, rather than dropped and fetched again later."""
    data = random_bytes(16 * CS, seed=33)
    held = HeldStores(monkeypatch)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image, source = rig.image("a"), rig.source("a")
            # Chunks 0-1 take the stream's half of 4: the stream fill of 4-5 waits.
            async with stream_waiting_for_room(image, source, held, budget_chunks=4):
                with trio.fail_after(2):
                    assert bytes(await image.read(8 * CS, 100)) == data[8 * CS : 8 * CS + 100]
                assert image.is_filling(8) and image.write_behind.dropped_chunks == 0
            assert [image.is_local(i) for i in (0, 1, 4, 5, 8)] == [True] * 5

    trio.run(main)


def test_a_partial_write_after_a_store_that_failed_past_its_chunk_goes_on(
    rig_factory, monkeypatch
) -> None:
    """A stream store of chunks 0-1 writes chunk 0, gives way to a sync (chunk 0 recorded
    local), then fails on chunk 1 (disk full). A partial client write to chunk 0 that waited for
    that store goes on: its chunk is local; only a write to chunk 1 would fail."""
    data = random_bytes(8 * CS, seed=35)
    held = HeldStores(monkeypatch)
    real_write_run = DataFile._write_run

    def full_at_one(datafile, way, offset, pieces):  # noqa: ANN001, ANN202
        if offset == CS:
            raise CacheFull("cache disk full while writing a")
        return real_write_run(datafile, way, offset, pieces)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            monkeypatch.setattr(DataFile, "_write_run", full_at_one)
            once = iter([True])
            monkeypatch.setattr(image.data, "_sync_pending", lambda: next(once, False))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(image.fill_each, range(0, 2))
                await wait_until(lambda: len(held.started) == 1)  # chunk 0's store, held
                nursery.start_soon(image.write, 10, b"x")  # waits for the store job
                await trio.sleep(0.1)
                held.release()
            assert image.state_of(0) == ChunkState.DIRTY
            assert bytes(await image.read(0, 20)) == data[:10] + b"x" + data[11:20]
            assert not image.is_local(1) and image.failing_chunks == [1]

    trio.run(main)


def _slow_stores(
    monkeypatch: pytest.MonkeyPatch, chunk: int, seconds: float, way: Way | None = None
) -> list[int]:
    """A slow cache disk: every write to the data file takes `seconds` more (and is of `way`
    when given). Returns the list the chunk index of each write is appended to, in order."""
    order: list[int] = []
    real = DataFile._write_run

    def slow(datafile, written_way, offset, pieces):  # noqa: ANN001, ANN202
        assert way is None or written_way is way
        order.append(offset // chunk)
        threading.Event().wait(seconds)
        return real(datafile, written_way, offset, pieces)

    monkeypatch.setattr(DataFile, "_write_run", slow)
    return order


def test_a_client_write_waiting_for_queued_base_bytes_does_not_wait_behind_the_stream(
    rig_factory, monkeypatch
) -> None:
    """Stream stores go one at a time (datafile.py). A partial write into a chunk the stream
    queued last waited for every stream store queued before it; its chunk's store goes at once
    now (StreamTurn.hurry), and the stores left behind still land."""
    chunk = FOLIO_SPAN  # one chunk per folio span: only the written chunk's store is waited for
    data = random_bytes(8 * chunk, seed=36)
    order = _slow_stores(monkeypatch, chunk, 0.3)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=chunk) as rig:
            image = rig.image("a")
            async with trio.open_nursery() as nursery:
                for index in range(8):  # the stream's fills, one store job each, 7 queued last
                    nursery.start_soon(image.fill_each, range(index, index + 1))
                    await wait_until(lambda i=index: i in image._queue or image.is_local(i))
                with trio.fail_after(1.5):  # not 8 stores of 0.3 s
                    await image.write(7 * chunk + 10, b"x")
            assert bytes(await image.read(7 * chunk, 20)) == data[7 * chunk : 7 * chunk + 10] + (
                b"x" + data[7 * chunk + 11 : 7 * chunk + 20]
            )
            await image.wait_stored()
            assert all(image.is_local(i) for i in range(8))
            assert 7 in order[:2] and sorted(order) == list(range(8))
            assert rig.data_file("a")[: 7 * chunk] == data[: 7 * chunk]

    trio.run(main)


def test_a_write_waiting_for_buffered_stream_stores_of_its_span_does_not_wait_behind_the_stream(
    rig_factory, monkeypatch
) -> None:
    """Where the cache refuses O_DIRECT, a stream store waits for every store of its folio span
    before it takes its place in the line. A partial write into chunk 4, whose store waits so
    for the store of chunk 5 (same span, in the line behind the stores of chunks 0 and 2), is
    answered once 5 and 4 are stored: every store of its span goes first, not just 4's."""
    chunk = FOLIO_SPAN // 2  # two chunks per span
    data = random_bytes(6 * chunk, seed=37)
    order = _slow_stores(monkeypatch, chunk, 0.5, way=Way.BUFFERED)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=chunk) as rig:
            image = rig.image("a")
            image.data.refused.add(Way.DIRECT)  # a cache file system without O_DIRECT
            async with trio.open_nursery() as nursery:
                for index in (0, 1, 2, 3, 5, 4):  # the stream's fills, one store job each
                    nursery.start_soon(image.fill_each, range(index, index + 1))
                    await wait_until(lambda i=index: i in image._queue)
                with trio.fail_after(1.6):  # 5's store and 4's, not 0's, 2's, 5's and 4's
                    await image.write(4 * chunk + 10, b"x")
            await image.wait_stored()
            assert sorted(order) == list(range(6))
            assert bytes(await image.read(4 * chunk, 20)) == data[4 * chunk : 4 * chunk + 10] + (
                b"x" + data[4 * chunk + 11 : 4 * chunk + 20]
            )
            assert rig.data_file("a")[: 4 * chunk] == data[: 4 * chunk]

    trio.run(main)


def test_a_hurried_store_waiting_for_a_store_of_another_span_waits_behind_the_stream(
    rig_factory, monkeypatch
) -> None:
    """Review finding: a stream job of two chunks (3, 4) spans two folio spans. Where the
    cache refuses O_DIRECT it waits (DataFile._wait_span_quiet) for the store of chunk 5
    (span of 4, not of 3), which is in the stream's line behind 0, 6, 8 and 10. A partial write into
    chunk 3 hurries the job of 3 (hurry_span of span [2, 3]) but not 5's: it still waits
    behind the whole line (about 3 s, where 5's and 3-4's stores take 1 s)."""
    chunk = FOLIO_SPAN // 2  # two chunks per span
    data = random_bytes(12 * chunk, seed=38)
    real = DataFile._write_run

    def slow(datafile, way, offset, pieces):  # noqa: ANN001, ANN202
        threading.Event().wait(0.5)  # a slow cache disk
        return real(datafile, way, offset, pieces)

    monkeypatch.setattr(DataFile, "_write_run", slow)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=chunk) as rig:
            image = rig.image("a")
            image.data.refused.add(Way.DIRECT)
            async with trio.open_nursery() as nursery:
                for run in (range(0, 1), range(6, 7), range(8, 9), range(10, 11), range(5, 6),
                            range(3, 5)):
                    nursery.start_soon(image.fill_each, run)
                    await wait_until(lambda r=run: all(i in image._queue for i in r))
                    await trio.sleep(0.05)
                with trio.fail_after(1.6):
                    await image.write(3 * chunk + 10, b"x")
            await image.wait_stored()

    trio.run(main)


def test_a_write_hurries_only_the_stores_it_waits_for(rig_factory, monkeypatch) -> None:
    """Review finding: hurrying followed the spans of every hurried job, so with stream runs
    not aligned to folio spans (two chunks per span, runs 1-2, 3-4, ...) one partial write
    hurried the whole queue past the stream's line and the wait for syncs. A write into chunk 3
    waits for the jobs of its span (1-2 and 3-4); 3-4 waits (buffered) for the stores in flight
    in its spans, 1-2's and 5-6's, which wait for nothing but their turn: those three are
    hurried, no other."""
    chunk = FOLIO_SPAN // 2  # two chunks per span
    data = random_bytes(14 * chunk, seed=39)
    # 0.5 s a store: the job of 1-2 is still in flight when the write comes (~0.3 s in)
    _slow_stores(monkeypatch, chunk, 0.5, way=Way.BUFFERED)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=chunk) as rig:
            image = rig.image("a")
            image.data.refused.add(Way.DIRECT)
            jobs = {}
            async with trio.open_nursery() as nursery:
                for first in range(1, 13, 2):  # six stream jobs of two chunks, misaligned by one
                    run = range(first, first + 2)
                    nursery.start_soon(image.fill_each, run)
                    await wait_until(lambda r=run: all(i in image._queue for i in r))
                    jobs[first] = image._queue.get(first).job
                    await trio.sleep(0.02)
                written = trio.Event()

                async def write() -> None:
                    with trio.fail_after(2.5):  # three stores of 0.5 s, not the line's six
                        await image.write(3 * chunk + 10, b"x")
                    written.set()

                nursery.start_soon(write)
                await trio.sleep(0.05)  # 1-2 still in flight: the write waits
                # Both jobs of its span are hurried at once, not one after the other's end
                # (mutant: one job hurried, then the next when it came up: 0.2 s later here)
                hurried = sorted(first for first, job in jobs.items() if job.turn.hurried)
                assert not written.is_set() and hurried[:2] == [1, 3]
                await written.wait()
                hurried = sorted(first for first, job in jobs.items() if job.turn.hurried)
                assert hurried == [1, 3, 5]
            await image.wait_stored()
            assert bytes(await image.read(3 * chunk, 20)) == data[3 * chunk : 3 * chunk + 10] + (
                b"x" + data[3 * chunk + 11 : 3 * chunk + 20]
            )
            assert rig.data_file("a")[chunk : 3 * chunk] == data[chunk : 3 * chunk]

    trio.run(main)


def test_a_write_that_waited_across_a_handoff_does_not_reach_the_data_file(
    rig_factory, monkeypatch
) -> None:
    """Hunt's finding: a write is checked for a handed-over image on entry only. One that
    waits (here for its chunk's queued base bytes) while a handoff finishes (the data file is
    QEMU's DEST from then on, image.handed_over_to set at the commit point, as handoff.py
    does) wrote into QEMU's live disk behind its back. It is refused (ESTALE) instead."""
    chunk = FOLIO_SPAN
    data = random_bytes(2 * chunk, seed=40)
    _slow_stores(monkeypatch, chunk, 0.5)

    async def main() -> None:
        async with rig_factory({"a": data}, chunk_size=chunk) as rig:
            image = rig.image("a")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(image.fill_each, range(0, 1))
                await wait_until(lambda: 0 in image._queue)
                refused = []

                async def write() -> None:
                    try:
                        await image.write(10, b"late")
                    except ImageHandedOver as exc:
                        refused.append(exc)

                nursery.start_soon(write)
                await trio.sleep(0.1)  # the write waits for the store of chunk 0
                image.handed_over_to = "/var/lib/vms/dest.raw"
            assert len(refused) == 1 and refused[0].errno == errno.ESTALE
            assert rig.data_file("a")[:chunk] == data[:chunk]  # the stored base bytes only

    trio.run(main)
