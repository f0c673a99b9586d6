"""The fetcher against a fault-injecting MemoryBase: retries with backoff bounded by io_timeout,
stalls, short answers, digest checks of published images (a corrupt chunk is never stored),
zero chunks that are never fetched, and dedup from the local cache. MockClock (autojump) makes
every wait instant."""

from __future__ import annotations

import errno
import os

import pytest
import trio
import trio.testing

from corfs.base.memory import MemoryImage
from corfs.errors import BaseCorrupt, BaseNotFound, BaseUnavailable
from corfs.fetcher import Fetcher, RetryPolicy
from corfs.geometry import ChunkGeometry, contiguous_runs
from corfs.request_gate import URGENT, Ticket
from corfs.store import ChunkState
from tests.core.rig import (
    CS,
    chunk_reads,
    committed_states,
    layout_of,
    random_bytes,
    run_with_mock_clock,
)

POLICY = RetryPolicy(io_timeout=10.0, first_backoff=0.1, max_backoff=2.0)


run = run_with_mock_clock


def source_of(data: bytes, *, published: bool = False) -> MemoryImage:
    return MemoryImage("img", bytearray(data), layout=layout_of(data, CS) if published else None)


def test_transient_failures_are_retried_with_backoff() -> None:
    data = random_bytes(4 * CS)

    async def main() -> None:
        source = source_of(data)
        source.faults.fail_next = 3
        fetcher = Fetcher(POLICY)
        start = trio.current_time()
        assert await fetcher.read_with_retry(source, CS, 2 * CS) == data[CS : 3 * CS]
        elapsed = trio.current_time() - start
        # Backoffs 0.1, 0.2, 0.4, each jittered to 50-100 %.
        assert 0.35 - 1e-9 <= elapsed <= 0.7 + 1e-9, elapsed
        assert len(source.reads) == 4
        assert fetcher.retries == 3 and fetcher.failures == 0
        assert fetcher.requests == 4 and fetcher.bytes_fetched == 2 * CS

    run(main)


def test_backoff_is_capped() -> None:
    async def main() -> None:
        source = source_of(random_bytes(CS))
        source.faults.fail_next = 10
        fetcher = Fetcher(RetryPolicy(io_timeout=100.0, first_backoff=0.1, max_backoff=1.0))
        start = trio.current_time()
        await fetcher.read_with_retry(source, 0, CS)
        # 0.1+0.2+0.4+0.8 then 6 x 1.0, at 50-100 %.
        assert 3.75 - 1e-9 <= trio.current_time() - start <= 7.5 + 1e-9

    run(main)


def test_persistent_failure_becomes_unavailable_after_io_timeout() -> None:
    async def main() -> None:
        source = source_of(random_bytes(CS))
        source.faults.fail_next = 10**9
        fetcher = Fetcher(POLICY)
        start = trio.current_time()
        with pytest.raises(BaseUnavailable) as info:
            await fetcher.read_with_retry(source, 0, CS)
        elapsed = trio.current_time() - start
        assert info.value.errno == errno.EIO
        # It gives up at io_timeout itself, not a backoff earlier.
        assert POLICY.io_timeout - 0.1 <= elapsed <= POLICY.io_timeout
        assert fetcher.retries >= 5 and fetcher.failures == 1

    run(main)


def test_stalled_base_becomes_unavailable_not_a_hang() -> None:
    async def main() -> None:
        source = source_of(random_bytes(CS))
        source.faults.stall = True
        fetcher = Fetcher(POLICY)
        start = trio.current_time()
        with trio.fail_after(60), pytest.raises(BaseUnavailable):  # a hang fails, not hangs
            await fetcher.read_with_retry(source, 0, CS)
        assert trio.current_time() - start == pytest.approx(POLICY.io_timeout)
        assert source.in_flight == 0

    run(main)


def test_slow_base_within_timeout_is_fine_beyond_it_is_not() -> None:
    async def main() -> None:
        source = source_of(random_bytes(CS))
        source.faults.delay = 9.0
        assert await Fetcher(POLICY).read_with_retry(source, 0, 10) == bytes(source.data[:10])
        source.faults.delay = 11.0
        with pytest.raises(BaseUnavailable):
            await Fetcher(POLICY).read_with_retry(source, 0, 10)

    run(main)


def test_short_answer_is_retried() -> None:
    data = random_bytes(3 * CS)

    async def main() -> None:
        source = source_of(data)
        source.faults.short_next = 2
        fetcher = Fetcher(POLICY)
        assert await fetcher.read_with_retry(source, 0, 3 * CS) == data
        assert len(source.reads) == 3 and fetcher.retries == 2

    run(main)


def test_non_transient_errors_are_not_retried() -> None:
    async def main() -> None:
        source = source_of(random_bytes(CS))
        source.faults.fail_next = 1
        source.faults.fail_with = BaseNotFound
        fetcher = Fetcher(POLICY)
        with pytest.raises(BaseNotFound):
            await fetcher.read_with_retry(source, 0, CS)
        assert len(source.reads) == 1

    run(main)


def test_raw_fetch_splits_runs_and_finds_zeros() -> None:
    data = random_bytes(CS) + bytes(CS) + random_bytes(CS // 2, seed=3)

    async def main() -> None:
        source = source_of(data)
        fetched = await Fetcher(POLICY).fetch_chunks(
            source, ChunkGeometry(len(data), CS), range(0, 3)
        )
        chunks = fetched.chunks
        assert source.reads == [(0, len(data))] and fetched.failed == {}
        assert [c.index for c in chunks] == [0, 1, 2]
        assert chunks[0].data == data[:CS]
        assert chunks[1].data is None and chunks[1].digest is None
        assert chunks[2].data == data[2 * CS :]  # the short last chunk

    run(main)


def testcontiguous_runs() -> None:
    assert contiguous_runs([]) == []
    assert contiguous_runs([1, 2, 3, 7, 8, 10]) == [range(1, 4), range(7, 9), range(10, 11)]


# ---- published images: digests ------------------------------------------------------------


def test_corrupt_answer_is_refetched_once(rig_factory) -> None:
    data = random_bytes(6 * CS)

    async def main() -> None:
        async with rig_factory({"p": data}, published=True) as rig:
            rig.source("p").faults.corrupt_next = 1
            image = rig.image("p")
            assert await image.read(CS, 2 * CS) == data[CS : 3 * CS]
            await image.wait_stored()
            assert rig.fetcher.digest_mismatches == 1
            assert chunk_reads(rig.source("p"), CS) == [1, 2, 1]
            await rig.store.commit()
            rows = committed_states(rig.cache_dir, "p")
            assert rows[1][1] == rig.source("p").layout.digests[1]

    run(main)


def test_corrupt_twice_is_base_corrupt_and_never_stored(rig_factory) -> None:
    data = random_bytes(6 * CS)

    async def main() -> None:
        async with rig_factory({"p": data}, published=True) as rig:
            image = rig.image("p")
            rig.source("p").faults.corrupt_next = 2
            with pytest.raises(BaseCorrupt) as info:
                await image.read(2 * CS, 10)
            assert info.value.errno == errno.EIO
            assert rig.fetcher.digest_mismatches == 2
            assert not image.is_local(2) and image.local_chunks == 0
            assert rig.store.pending_count == 0
            await rig.store.commit()
            assert committed_states(rig.cache_dir, "p") == {}
            # Not a byte of it reached the data file.
            assert os.pread(rig.store.data_fd("p"), CS, 2 * CS) == bytes(CS)
            assert os.stat(rig.store.data_path("p")).st_blocks == 0
            # The base heals: the next read fetches good bytes.
            assert await image.read(2 * CS, 10) == data[2 * CS : 2 * CS + 10]

    run(main)


def test_corrupt_chunk_in_a_run_fails_only_itself(rig_factory) -> None:
    """A run of chunks 1-4 where chunk 2 is corrupt (every time): the readers sharing the run
    get right bytes for 1, 3 and 4, which become local; chunk 2 gives EIO and stays out."""
    data = random_bytes(5 * CS)  # no chunk after the run: no read-ahead to account for

    async def main() -> None:
        async with rig_factory({"p": data}, published=True) as rig:
            image = rig.image("p")
            source = rig.source("p")
            source.faults.corrupt_at = {2 * CS + 7}
            source.faults.delay = 0.1  # so that every reader joins the one run fill
            results: dict[int, bytes | int] = {}

            async def read_chunks(first: int, count: int) -> None:
                try:
                    results[first] = await image.read(first * CS, count * CS)
                    await image.wait_stored()
                except BaseCorrupt as exc:
                    results[first] = exc.errno

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_chunks, 1, 4)  # starts the fill of run 1-4
                await trio.testing.wait_all_tasks_blocked()
                assert all(image.is_filling(i) for i in range(1, 5))
                for index in (3, 4, 2):
                    nursery.start_soon(read_chunks, index, 1)
            assert results == {
                1: errno.EIO,
                2: errno.EIO,
                3: data[3 * CS : 4 * CS],
                4: data[4 * CS : 5 * CS],
            }
            assert chunk_reads(source, CS) == [1, 2, 3, 4, 2]  # the run, then 2 once more
            assert [image.is_local(i) for i in range(5)] == [False, True, False, True, True]
            assert await image.read(CS, CS) == data[CS : 2 * CS]  # local now: no base read
            await image.wait_stored()
            assert len(source.reads) == 2
            assert image.failing_chunks == [2]
            assert "chunk 2 failed its digest check twice" in (image.fill_error or "")
            await rig.store.commit()
            assert sorted(committed_states(rig.cache_dir, "p")) == [1, 3, 4]
            assert os.pread(rig.store.data_fd("p"), CS, 2 * CS) == bytes(CS)
            with pytest.raises(BaseCorrupt):  # still bad: fetched again, failed again
                await image.read(2 * CS, 1)
                await image.wait_stored()
            source.faults.corrupt_at.clear()  # the base is repaired
            assert await image.read(2 * CS, CS) == data[2 * CS : 3 * CS]
            await image.wait_stored()
            assert image.failing_chunks == [] and image.fill_error is None

    run(main)


def test_missing_chunk_object_fails_only_its_chunk() -> None:
    """A published chunk whose object is gone (BaseNotFound): the other chunks of the run come
    back, that one is reported failed, and the whole fetch does not raise."""
    data = random_bytes(4 * CS)

    async def main() -> None:
        source = source_of(data, published=True)
        real_read = source.read

        async def object_of_chunk_one_gone(offset: int, length: int) -> bytes:
            if offset <= CS < offset + length:
                await trio.lowlevel.checkpoint()
                raise BaseNotFound("memory://chunks/xx/yy.zst does not exist")
            return await real_read(offset, length)

        source.read = object_of_chunk_one_gone  # type: ignore[method-assign]
        fetched = await Fetcher(POLICY).fetch_chunks(
            source, ChunkGeometry(len(data), CS), range(0, 4)
        )
        assert [c.index for c in fetched.chunks] == [0, 2, 3]
        assert [bytes(c.data) for c in fetched.chunks] == [
            data[i * CS : (i + 1) * CS] for i in (0, 2, 3)
        ]
        assert list(fetched.failed) == [1] and fetched.failed[1].errno == errno.ENOENT

    run(main)


def test_zero_chunks_of_a_layout_are_never_fetched(rig_factory) -> None:
    data = random_bytes(CS) + bytes(3 * CS) + random_bytes(CS, seed=1)

    async def main() -> None:
        async with rig_factory({"p": data}, published=True) as rig:
            image = rig.image("p")
            assert await image.read(0, len(data)) == data
            await image.wait_stored()
            fetched = chunk_reads(rig.source("p"), CS)
            assert sorted(fetched) == [0, 4]
            assert [image.state_of(i) for i in range(5)] == [
                ChunkState.CLEAN,
                ChunkState.ZERO,
                ChunkState.ZERO,
                ChunkState.ZERO,
                ChunkState.CLEAN,
            ]
            # A zero-only read does no base request at all.
            async with rig_factory({"q": bytes(4 * CS)}, published=True, store=rig.store) as other:
                assert await other.image("q").read(0, 4 * CS) == bytes(4 * CS)
                await other.image("q").wait_stored()
                assert other.source("q").reads == []

    run(main)


def test_dedup_copies_a_committed_chunk_instead_of_fetching(tmp_path, rig_factory) -> None:
    shared = random_bytes(CS, seed=42)
    a = random_bytes(CS, seed=1) + shared + random_bytes(CS, seed=2)
    b = shared + random_bytes(CS, seed=3)

    async def main() -> None:
        async with rig_factory({"a": a, "b": b}, published=True) as rig:
            await rig.image("a").read(CS, CS)
            await rig.image("a").wait_stored()
            # Not committed yet: no dedup from uncommitted chunks.
            assert await rig.image("b").read(CS, 10) == b[CS : CS + 10]
            await rig.image("b").wait_stored()
            await rig.store.commit()
            assert await rig.image("b").read(0, CS) == shared
            await rig.image("b").wait_stored()
            assert chunk_reads(rig.source("b"), CS) == [1]
            assert rig.fetcher.dedup_hits == 1
            assert rig.image("b").state_of(0) == ChunkState.CLEAN
            await rig.store.commit()
            assert committed_states(rig.cache_dir, "b")[0] == (
                ChunkState.CLEAN,
                rig.source("b").layout.digests[0],
            )

    run(main)


def test_dedup_skips_a_source_chunk_that_was_overwritten(rig_factory) -> None:
    """A committed clean row whose bytes changed since (written, not yet committed dirty) is
    not copied: its digest no longer matches, so the chunk is fetched."""
    shared = random_bytes(CS, seed=42)

    async def main() -> None:
        async with rig_factory({"a": shared, "b": shared}, published=True) as rig:
            await rig.image("a").read(0, 1)
            await rig.store.commit()
            await rig.image("a").write(0, b"z" * 100)
            assert await rig.image("b").read(0, CS) == shared
            assert rig.fetcher.dedup_hits == 0
            assert chunk_reads(rig.source("b"), CS) == [0]

    run(main)


def test_unavailable_base_fails_the_read_in_bounded_time(rig_factory) -> None:
    data = random_bytes(4 * CS)

    async def main() -> None:
        async with rig_factory({"a": data}, policy=RetryPolicy(io_timeout=5.0)) as rig:
            image = rig.image("a")
            await image.read(0, CS)
            rig.source("a").faults.stall = True
            start = trio.current_time()
            with trio.fail_after(60), pytest.raises(BaseUnavailable):
                await image.read(2 * CS, 1)
            assert trio.current_time() - start == pytest.approx(5.0)
            # Local chunks keep being served meanwhile.
            assert await image.read(0, CS) == data[:CS]
            assert not image.is_local(2)

    run(main)


def test_a_clients_request_goes_before_queued_speculative_ones() -> None:
    """Many readers share the mount's connections: a request a client waits for is sent at
    the next free slot, before read-ahead and stream requests queued earlier (request_gate)."""
    data = random_bytes(16 * CS)
    geometry = ChunkGeometry(len(data), CS)

    async def main() -> None:
        source = source_of(data)
        source.faults.delay = 1.0
        fetcher = Fetcher(POLICY, slots=2)
        speculative = Ticket()
        done: dict[str, float] = {}

        async def fetch(name: str, index: int, ticket: Ticket) -> None:
            await fetcher.fetch_chunks(source, geometry, range(index, index + 1), ticket=ticket)
            done[name] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for index in range(6):  # 2 sent at once, 4 queued
                nursery.start_soon(fetch, f"ahead{index}", index, speculative)
            await trio.sleep(0.1)
            nursery.start_soon(fetch, "client", 10, URGENT)
            promoted = Ticket()
            nursery.start_soon(fetch, "joined", 11, promoted)
            await trio.sleep(0.1)
            promoted.urgent = True  # a client came to wait for it while it was queued
        # The first slot frees at 1.0: the client's request, then the promoted one, each
        # ahead of the four queued before them.
        assert done["client"] == pytest.approx(2.0) and done["joined"] == pytest.approx(2.0)
        ahead = sorted(done[f"ahead{i}"] for i in range(6))
        assert ahead == pytest.approx([1, 1, 3, 3, 4, 4])
        assert source.max_in_flight == 2

    run(main)


def test_time_queued_for_a_slot_does_not_count_against_io_timeout() -> None:
    """A request that waits for a slot behind slow (but answering) requests still gets the
    whole io_timeout from the base once it is sent (was: the queue ate it: EIO, a 'failed'
    request, with a base that answers every request in time)."""
    data = random_bytes(4 * CS)
    geometry = ChunkGeometry(len(data), CS)
    policy = RetryPolicy(io_timeout=10.0)

    async def main() -> None:
        source = source_of(data)
        source.faults.delay = 6.0  # each answer within io_timeout
        fetcher = Fetcher(policy, slots=1)
        done: list[int] = []

        async def fetch(index: int) -> None:
            await fetcher.fetch_chunks(source, geometry, range(index, index + 1))
            done.append(index)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, 0)
            await trio.sleep(0.1)
            nursery.start_soon(fetch, 1)  # queued 5.9 s, then 6 s at the base: 11.9 s in all
        assert sorted(done) == [0, 1]
        assert fetcher.failures == 0

    run(main)
