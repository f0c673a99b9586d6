"""An open image over a real CacheStore and Fetcher: reads equal the base, one fill per chunk,
writes (partial chunks completed first, writes win over racing fills), a changed base, a full
cache disk and a vanished base."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
import trio.testing

from corfs.errors import (
    BaseChanged,
    CacheFull,
    ChunkUnavailable,
    CorfsError,
    ImageHandedOver,
    ReadOnlyError,
)
from corfs.image import Image
from corfs.store import ChunkState
from tests.core.rig import (
    CS,
    chunk_reads,
    committed_states,
    random_bytes,
    run_with_mock_clock,
    wait_until,
)

SIZE = 13 * CS + 123  # a short last chunk


def idle(image: Image) -> bool:
    return not any(image.is_filling(i) for i in range(image.geometry.chunk_count))


run = run_with_mock_clock


def test_random_ranges_equal_base(rig_factory) -> None:
    data = random_bytes(SIZE)
    rnd = random.Random(7)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            for _ in range(200):
                offset = rnd.randrange(0, SIZE + 2 * CS)
                length = rnd.choice([1, 511, CS, 3 * CS + 17, rnd.randrange(0, 5 * CS)])
                got = await image.read(offset, length)
                assert got == data[offset : offset + length], (offset, length)
            assert await image.read(0, SIZE) == data

    run(main)


def test_reads_past_eof_and_across_it(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            assert await image.read(SIZE, 100) == b""
            assert await image.read(SIZE + 10 * CS, CS) == b""
            assert rig.source("a").reads == []
            assert await image.read(SIZE - 50, 4 * CS) == data[-50:]
            # The short last chunk was read exactly, never beyond the image.
            assert rig.source("a").reads == [(13 * CS, 123)]
            assert await image.read(0, 0) == b""

    run(main)


def test_zero_byte_image(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"empty": b""}) as rig:
            image = rig.image("empty")
            assert image.size == 0 and image.complete
            assert image.geometry.chunk_count == 0
            assert await image.read(0, 4096) == b""
            assert await image.write(0, b"") == 0
            with pytest.raises(CorfsError) as info:
                await image.write(0, b"x")
            assert info.value.errno == errno.ENOSPC
            assert rig.source("empty").reads == []
            assert image.statistics().chunk_count == 0

    run(main)


def test_local_reads_never_touch_the_base(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(2 * CS + 5, CS)  # chunks 2 and 3
            source = rig.source("a")
            assert sorted(chunk_reads(source, CS)) == [2, 3]
            before = list(source.reads)
            for _ in range(20):
                assert await image.read(2 * CS, 2 * CS) == data[2 * CS : 4 * CS]
                assert await image.read(3 * CS + 100, 7) == data[3 * CS + 100 : 3 * CS + 107]
            assert source.reads == before
            # A read that spans a local and a missing chunk fetches only the missing one
            # (and perhaps chunks after it, ahead of time), never a local one again.
            assert await image.read(3 * CS, 2 * CS) == data[3 * CS : 5 * CS]
            await wait_until(lambda: idle(image))
            fetched = chunk_reads(source, CS)
            assert fetched[:2] == [2, 3] and fetched.count(4) == 1
            assert len(fetched) == len(set(fetched)) and min(fetched[2:]) == 4

    run(main)


def test_concurrent_readers_of_a_missing_chunk_share_one_fill(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            source = rig.source("a")
            source.faults.delay = 1.0
            results: dict[int, bytes] = {}

            async def reader(i: int) -> None:
                offset = 5 * CS + 97 * i
                results[i] = await image.read(offset, 50)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(reader, i)
            # Exactly one base read of chunk 5 (read-ahead may fetch chunks after it, once).
            fetched = chunk_reads(source, CS)
            assert fetched.count(5) == 1
            assert len(fetched) == len(set(fetched))
            assert len(results) == 20
            for i, got in results.items():
                offset = 5 * CS + 97 * i
                assert got == data[offset : offset + 50]

    run(main)


def test_foreground_reader_shares_a_background_fill_in_flight(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            source = rig.source("a")
            source.faults.delay = 1.0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: image.wait_local(range(4, 8), background=True))
                await wait_until(lambda: source.in_flight == 1)
                assert image.is_filling(6)
                start = trio.current_time()
                assert await image.read(6 * CS + 3, 10) == data[6 * CS + 3 : 6 * CS + 13]
                assert trio.current_time() - start <= 1.0
            assert source.reads == [(4 * CS, 4 * CS)]
            await image.wait_stored()
            assert all(image.is_local(i) for i in range(4, 8))

    run(main)


def test_partial_write_completes_chunk_from_base_first(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            # Covers the end of chunk 1, all of chunk 2 and the start of chunk 3.
            offset, patch = 2 * CS - 10, b"P" * (CS + 20)
            assert await image.write(offset, patch) == len(patch)
            assert sorted(chunk_reads(rig.source("a"), CS)) == [1, 3]
            expected = bytearray(data)
            expected[offset : offset + len(patch)] = patch
            assert await image.read(0, SIZE) == bytes(expected)
            assert [image.state_of(i) for i in (1, 2, 3)] == [ChunkState.DIRTY] * 3
            assert image.statistics().dirty_chunks == 3
            await image.wait_stored()  # the read's fills, stored behind it
            await rig.store.commit()
            rows = committed_states(rig.cache_dir, "a")
            assert [rows[i] for i in (1, 2, 3)] == [(ChunkState.DIRTY, None)] * 3
            assert rig.data_file("a") == bytes(expected)

    run(main)


def test_whole_chunk_overwrite_of_absent_chunk_reads_nothing(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.write(4 * CS, b"W" * (2 * CS))
            # The short last chunk, written whole, needs no base read either.
            await image.write(13 * CS, b"L" * 123)
            assert rig.source("a").reads == []
            assert await image.read(4 * CS, 2 * CS) == b"W" * (2 * CS)
            assert await image.read(13 * CS, 500) == b"L" * 123
            assert rig.source("a").reads == []

    run(main)


def test_write_wins_over_a_racing_fill(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            source = rig.source("a")
            source.faults.delay = 1.0
            async with trio.open_nursery() as nursery:
                # A background fill of chunks 0-3 and a foreground read of chunk 8 in flight.
                nursery.start_soon(lambda: image.wait_local(range(0, 4), background=True))
                nursery.start_soon(image.read, 8 * CS, 1)
                await wait_until(lambda: source.in_flight == 2)
                await image.write(2 * CS, b"A" * CS)  # whole chunk: no wait
                await image.write(8 * CS, b"B" * CS)
                assert image.state_of(2) == ChunkState.DIRTY
                assert source.in_flight == 2  # the fills are still running
            # The fills landed afterwards and did not overwrite the written chunks.
            assert await image.read(2 * CS, CS) == b"A" * CS
            assert await image.read(8 * CS, CS) == b"B" * CS
            assert await image.read(0, 2 * CS) == data[: 2 * CS]
            assert await image.read(3 * CS, CS) == data[3 * CS : 4 * CS]
            assert image.state_of(2) == ChunkState.DIRTY
            assert image.state_of(8) == ChunkState.DIRTY
            await image.wait_stored()
            await rig.store.commit()
            rows = committed_states(rig.cache_dir, "a")
            assert rows[2] == (ChunkState.DIRTY, None) and rows[8] == (ChunkState.DIRTY, None)
            assert rows[0][0] == ChunkState.CLEAN
            assert image.local_chunks == 5 and image.dirty_chunks == 2

    run(main)


def test_partial_write_waits_for_the_fill_in_flight(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            source = rig.source("a")
            source.faults.delay = 1.0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(image.read, 3 * CS, 1)
                await wait_until(lambda: source.in_flight == 1)
                await image.write(3 * CS + 100, b"xyz")
            assert len(source.reads) == 1
            expected = data[3 * CS : 3 * CS + 100] + b"xyz" + data[3 * CS + 103 : 4 * CS]
            assert await image.read(3 * CS, CS) == expected

    run(main)


def test_a_read_that_comes_after_a_waiting_write_is_answered_after_it(rig_factory) -> None:
    """The kernel keeps what a read gets (writes_in_flight.py): a read of bytes whose write
    waits for its fill gets the write's bytes, not the fill's, and neither a read that came
    first nor one of other bytes waits for the write."""
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image, source = rig.image("a"), rig.source("a")
            source.faults.delay = 1.0
            answers: dict[str, bytes] = {}

            async def read(name: str, offset: int, length: int) -> None:
                answers[name] = bytes(await image.read(offset, length))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "first", 3 * CS, 1)  # before the write: the base's
                await wait_until(lambda: source.in_flight == 1)
                nursery.start_soon(image.write, 3 * CS + 100, b"xyz")
                await trio.sleep(0.1)
                nursery.start_soon(read, "after", 3 * CS + 50, 100)
                nursery.start_soon(read, "beside", 3 * CS + 200, 10)
            assert answers["first"] == data[3 * CS : 3 * CS + 1]
            assert answers["after"] == data[3 * CS + 50 : 3 * CS + 100] + b"xyz" + data[
                3 * CS + 103 : 3 * CS + 150
            ]
            assert answers["beside"] == data[3 * CS + 200 : 3 * CS + 210]

    run(main)


def test_read_only_and_out_of_range_writes(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}, read_only=True) as rig:
            with pytest.raises(ReadOnlyError) as info:
                await rig.image("a").write(0, b"x")
            assert info.value.errno == errno.EROFS
            assert await rig.image("a").read(0, 10) == data[:10]

    async def writable() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            for offset in (SIZE, SIZE + CS):  # wholly past the end: ENOSPC, nothing written
                with pytest.raises(CorfsError) as info:
                    await image.write(offset, b"a")
                assert info.value.errno == errno.ENOSPC
            assert not image.is_local(13) and image.dirty_chunks == 0
            # Across the end: cut at it and answered short, as a block device does.
            assert await image.write(SIZE - 2, b"xyz") == 2
            assert await image.read(SIZE - 5, 10) == data[-5:-2] + b"xy"
            assert await image.write(SIZE - 3, b"abc") == 3
            assert await image.read(SIZE - 5, 10) == data[-5:-3] + b"abc"

    run(main)
    run(writable)


def test_base_changed_fails_reads_with_estale(rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            assert await image.read(0, CS) == data[:CS]
            rig.source("a").replace(random_bytes(SIZE, seed=9), "v2")
            with pytest.raises(BaseChanged) as info:
                await image.read(0, 2 * CS)  # one local chunk, one missing: never a mix
            assert info.value.errno == errno.ESTALE
            assert image.error is not None and "changed" in image.error
            assert image.statistics().error == image.error
            assert not image.is_local(1)
            # Local chunks keep being served.
            assert await image.read(0, CS) == data[:CS]
            # ... and the changed base is asked nothing more: the image starts no more fills.
            asked = len(rig.source("a").reads)
            with pytest.raises(BaseChanged):
                await image.read(5 * CS, 10)
            assert len(rig.source("a").reads) == asked

    run(main)


def test_cache_full_reads_uncached_and_writes_fail(rig_factory, monkeypatch) -> None:
    import corfs.store

    data = random_bytes(SIZE)

    def no_space(fd: int, buf: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(0, CS)
            await image.wait_stored()
            monkeypatch.setattr(corfs.store.os, "pwritev", no_space)  # client writes and fills
            # Served correctly (partly local, partly straight from the base), nothing cached.
            assert await image.read(CS // 2, 3 * CS) == data[CS // 2 : CS // 2 + 3 * CS]
            assert [image.is_local(i) for i in range(4)] == [True, False, False, False]
            with pytest.raises(CacheFull) as info:
                await image.write(0, b"x")  # local chunk: the pwrite itself fails
            assert info.value.errno == errno.ENOSPC
            with pytest.raises(CacheFull):
                await image.write(5 * CS + 1, b"x")  # partial absent chunk: the fill fails
            with pytest.raises(CacheFull):
                await image.write(6 * CS, b"y" * CS)  # whole chunk
            assert image.dirty_chunks == 0
            assert await image.read(0, CS) == data[:CS]
            monkeypatch.undo()
            # Space again: reads cache as before.
            assert await image.read(5 * CS, CS) == data[5 * CS : 6 * CS]
            await image.wait_stored()
            assert image.is_local(5)

    run(main)


def test_base_gone_serves_local_chunks_and_fails_missing(tmp_path, rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(0, 2 * CS)
            await image.wait_stored()
            await rig.store.commit()
            orphan = Image(image.record, rig.store, rig.fetcher, None, rig.nursery)
            assert await orphan.read(0, 2 * CS) == data[: 2 * CS]
            with pytest.raises(ChunkUnavailable, match="the base image is gone") as info:
                await orphan.read(3 * CS, 1)
            assert info.value.errno == errno.EIO  # a disk read, not "no such file"

    run(main)


def test_reopened_image_knows_its_committed_chunks(tmp_path, rig_factory) -> None:
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(0, 3 * CS)
            await image.write(10 * CS, b"d" * 10)
            await rig.store.commit()
            again = Image(image.record, rig.store, rig.fetcher, rig.source("a"), rig.nursery)
            assert again.local_chunks == 4 and again.dirty_chunks == 1
            assert again.local_bytes == 4 * CS
            reads = len(rig.source("a").reads)
            assert await again.read(10 * CS, 12) == b"d" * 10 + data[10 * CS + 10 : 10 * CS + 12]
            assert len(rig.source("a").reads) == reads

    run(main)


def test_fill_error_is_reported_and_chunk_stays_absent(rig_factory) -> None:
    from corfs.errors import BaseUnavailable
    from corfs.fetcher import RetryPolicy

    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}, policy=RetryPolicy(io_timeout=2.0)) as rig:
            image = rig.image("a")
            rig.source("a").faults.fail_next = 10**6
            with pytest.raises(BaseUnavailable) as info:
                await image.read(0, 10)
            assert info.value.errno == errno.EIO
            assert not image.is_local(0) and image.fill_errors == 1
            assert rig.store.pending_count == 0
            assert os.pread(rig.store.data_fd("a"), CS, 0) == bytes(CS)
            rig.source("a").faults.fail_next = 0
            assert await image.read(0, 10) == data[:10]

    run(main)


def test_a_filled_chunk_heals_only_the_failures_of_its_own_fill(rig_factory) -> None:
    """Chunks 4-7 fail as one fill; chunk 5 then fails again alone (same message). Chunk 4
    filling clears 6 and 7 (they failed with it) but not 5, whose latest failure is its own."""
    from corfs.errors import BaseAccessDenied

    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            source = rig.source("a")
            real_read = source.read

            async def denied_at_five(offset: int, length: int) -> bytes:
                if offset <= 5 * CS < offset + length:
                    await trio.lowlevel.checkpoint()
                    raise BaseAccessDenied("a: access denied")
                return await real_read(offset, length)

            source.read = denied_at_five  # type: ignore[method-assign]
            with pytest.raises(ChunkUnavailable, match="access denied"):  # EIO, not EACCES
                await image.read(4 * CS, 4 * CS)
            assert image.failing_chunks == [4, 5, 6, 7]
            with pytest.raises(ChunkUnavailable):
                await image.read(5 * CS, 1)
            assert await image.read(4 * CS, CS) == data[4 * CS : 5 * CS]
            assert image.failing_chunks == [5]
            assert image.fill_error == "a: access denied"

    run(main)


def test_a_client_goes_before_the_streams_queued_requests(rig_factory) -> None:
    """Readers and the stream share the base's connections: a client's miss is fetched at the
    next free one, and so is a queued stream fill once a client comes to wait for it, ahead of
    the stream's requests queued before (request_gate.py)."""
    data = random_bytes(32 * CS, seed=5)

    async def main() -> None:
        async with rig_factory({"a": data, "b": data}, connections=1) as rig:
            a, b = rig.image("a"), rig.image("b")
            rig.source("a").faults.delay = rig.source("b").faults.delay = 1.0
            done: dict[str, float] = {}

            async def stream(index: int) -> None:
                await b.fill_each([index])
                done[f"stream{index}"] = trio.current_time()

            async def read(name: str, image: Image, index: int) -> None:
                got = await image.read(index * CS, CS)
                assert got == data[index * CS : (index + 1) * CS]
                done[name] = trio.current_time()

            async with trio.open_nursery() as nursery:
                for index in range(0, 12, 2):  # one request each (not adjacent): 1 sent, 5 queued
                    nursery.start_soon(stream, index)
                    await trio.sleep(0.01)  # queued in this order
                nursery.start_soon(read, "miss", a, 20)
                await trio.sleep(0.1)
                nursery.start_soon(read, "joined", b, 10)  # the stream's last queued chunk
            # Both are sent as the first requests end (the joined fill first: it queued first),
            # before the four stream requests still queued.
            assert sorted([done["joined"], done["miss"]]) == pytest.approx([2.0, 3.0])
            assert max(done.values()) == pytest.approx(7.0)  # nothing fetched twice
            assert sorted(chunk_reads(rig.source("b"), CS)) == list(range(0, 12, 2))

    run(main)


def test_a_chunk_written_whole_while_its_fill_fails_is_read_and_not_failing(rig_factory) -> None:
    """A reader waits for the fill of chunk 1; a client writes the whole chunk meanwhile (no
    fill needed), then the fetch fails for good. The reader gets the written bytes, not EIO,
    and chunk 1 is not reported failing (status would show an error for a complete image)."""
    from corfs.errors import BaseAccessDenied

    data = random_bytes(SIZE)
    written = bytes([7]) * CS

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            go = trio.Event()

            async def denied_later(offset: int, length: int) -> bytes:
                await go.wait()
                raise BaseAccessDenied("a: access denied")

            rig.source("a").read = denied_later  # type: ignore[method-assign]
            got: list[bytes] = []

            async def reader() -> None:  # a whole chunk: a chunk fill, not a small range
                got.append(bytes(await image.read(CS, CS)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await wait_until(lambda: image.is_filling(1))
                await image.write(CS, written)
                go.set()
            assert got == [written]
            assert image.failing_chunks == [] and image.fill_error is None
            assert image.state_of(1) == ChunkState.DIRTY

    run(main)


def test_a_read_that_waited_across_a_handoff_is_refused(rig_factory) -> None:
    """A read waiting for a fill while a handoff finishes (image.handed_over_to set at its
    commit point, as handoff.py does; the data file is QEMU's DEST from then on, and the store
    closes its descriptor) is refused (ESTALE), not served from that file."""
    data = random_bytes(SIZE)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(CS, CS)
            await image.wait_stored()  # chunk 1 local: the read below needs the data file
            rig.source("a").faults.delay = 1.0
            refused = []

            async def read() -> None:
                try:
                    await image.read(0, 2 * CS)
                except ImageHandedOver as exc:
                    refused.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.sleep(0.5)  # it waits for chunk 0's fill
                image.handed_over_to = "/var/lib/vms/dest.raw"
            assert len(refused) == 1 and refused[0].errno == errno.ESTALE

    run(main)
