"""The stream worker over real images: fills everything, in order (sequential, trace, read-ahead
after misses), never ahead of a client, pause/resume, bandwidth, a failing base (backoff, error
in statistics, recovery by itself), and resuming from a reopened cache. MockClock (autojump)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from corfs.config import StreamConfig
from corfs.errors import TransientBaseError
from corfs.fetcher import RetryPolicy
from corfs.store import ChunkState
from corfs.stream import MAX_BACKOFF, StreamWorker
from tests.core.rig import (
    CS,
    chunk_reads,
    committed_states,
    random_bytes,
    run_with_mock_clock,
    wait_until,
)

N = 64
DATA = random_bytes(N * CS)
ONE_BY_ONE = StreamConfig(workers=1, run_chunks=1)


run = run_with_mock_clock


def test_stream_fills_everything_sequentially(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            stream = StreamWorker([image], StreamConfig())
            assert stream.statistics("a").state == "streaming"
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: image.complete)
                nursery.cancel_scope.cancel()
            assert stream.statistics("a").state == "complete"
            assert stream.statistics("a").error is None
            # Two workers take runs in order; their requests may reach the base swapped.
            offsets = [offset for offset, _ in rig.source("a").reads]
            for i, offset in enumerate(offsets):
                assert offset >= max(offsets[: i + 1]) - 4 * CS, offsets
            fetched = chunk_reads(rig.source("a"), CS)
            assert sorted(fetched) == list(range(N))  # each chunk once
            assert max(length for _, length in rig.source("a").reads) == 4 * CS  # run_chunks
            assert await image.read(0, N * CS) == DATA
            await rig.store.commit()
            rows = committed_states(rig.cache_dir, "a")
            assert len(rows) == N and all(s == ChunkState.CLEAN for s, _ in rows.values())
            assert rig.data_file("a") == DATA

    run(main)


def test_one_worker_strict_order_and_empty_and_disabled(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA[: 10 * CS + 1], "e": b""}) as rig:
            stream = StreamWorker([rig.image("a"), rig.image("e")], ONE_BY_ONE)
            assert stream.statistics("e").state == "complete"
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: rig.image("a").complete)
                nursery.cancel_scope.cancel()
            assert chunk_reads(rig.source("a"), CS) == list(range(11))
            assert rig.source("a").reads[-1] == (10 * CS, 1)
            assert rig.source("e").reads == []

    async def disabled() -> None:
        async with rig_factory({"a": DATA}) as rig:
            stream = StreamWorker([rig.image("a")], StreamConfig(enabled=False))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(60)
                nursery.cancel_scope.cancel()
            assert rig.source("a").reads == []
            assert stream.statistics("a").state == "idle"

    run(main)
    run(disabled)


def test_foreground_miss_does_not_wait_for_the_stream(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            source = rig.source("a")
            source.faults.delay = 1.0
            stream = StreamWorker([image], StreamConfig(workers=2, run_chunks=4))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: source.in_flight == 2)
                await trio.sleep(0.5)  # the stream's fetches are half-way
                start = trio.current_time()
                assert await image.read(60 * CS + 7, 100) == DATA[60 * CS + 7 : 60 * CS + 107]
                elapsed = trio.current_time() - start
                # One fetch time: not behind the stream's in-flight or queued work.
                assert elapsed <= 1.0 + 0.01, elapsed
                assert image.local_chunks < 16  # the stream is far from chunk 60
                nursery.cancel_scope.cancel()

    run(main)


def test_read_ahead_after_a_foreground_miss(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            source = rig.source("a")
            source.faults.delay = 1.0
            stream = StreamWorker([image], ONE_BY_ONE)
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: source.in_flight == 1)  # chunk 0
                await image.read(40 * CS, 10)
                await wait_until(lambda: len(source.reads) >= 12)
                nursery.cancel_scope.cancel()
            fetched = chunk_reads(source, CS)
            assert fetched[:2] == [0, 40]
            # The stream goes on right after the miss before it returns to its cursor.
            assert fetched[2:10] == list(range(41, 49))
            assert fetched[10] == 1

    run(main)


def test_trace_order_first(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            trace = [30, 5, 17, 5, 999, -1, 31]  # duplicates and nonsense are skipped
            stream = StreamWorker([image], ONE_BY_ONE, traces={"a": trace, "gone": [1]})
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: image.complete)
                nursery.cancel_scope.cancel()
            fetched = chunk_reads(rig.source("a"), CS)
            assert fetched[:4] == [30, 5, 17, 31]
            assert sorted(fetched) == list(range(N))
            assert fetched[4:] == [i for i in range(N) if i not in (30, 5, 17, 31)]

    run(main)


def test_pause_and_resume_one_image_and_all(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA, "b": DATA[: 32 * CS]}) as rig:
            a, b = rig.image("a"), rig.image("b")
            rig.source("a").faults.delay = rig.source("b").faults.delay = 0.1
            stream = StreamWorker([a, b], StreamConfig())
            with pytest.raises(KeyError):
                stream.pause("nope")
            stream.pause("a")
            assert stream.statistics("a").state == "paused"
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: b.complete)
                assert rig.source("a").reads == []
                assert stream.statistics("a").state == "paused"
                assert stream.statistics("b").state == "complete"
                stream.resume("a")
                await wait_until(lambda: a.local_chunks >= 8)
                stream.pause()
                await trio.sleep(5)  # what was in flight lands
                reads = len(rig.source("a").reads)
                local = a.local_chunks
                await trio.sleep(100)
                assert len(rig.source("a").reads) == reads and a.local_chunks == local
                assert not a.complete and stream.statistics("a").state == "paused"
                stream.resume()
                await wait_until(lambda: a.complete)
                nursery.cancel_scope.cancel()
            assert sorted(chunk_reads(rig.source("a"), CS)) == list(range(N))

    run(main)


def test_a_pause_stops_base_reads_within_seconds_even_for_runs_waiting_their_turn(
    rig_factory,
) -> None:
    """At 1 chunk/s each worker's next run waits seconds for its bandwidth turn. A pause then
    stops the base reads at once (what is in flight lands): no run picked before the pause is
    fetched after it, and nothing is read while paused, asserted on the base's reads."""

    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image, source = rig.image("a"), rig.source("a")
            stream = StreamWorker([image], StreamConfig(bandwidth=CS, run_chunks=4, workers=2))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: len(source.reads) >= 2)
                await trio.sleep(0.5)  # both workers now wait for their next turn
                stream.pause()
                await trio.sleep(0.1)  # anything in flight lands
                reads = len(source.reads)
                await trio.sleep(30)  # 30 turns' worth of bandwidth
                assert len(source.reads) == reads, "the stream read the base while paused"
                assert stream.statistics("a").state == "paused"
                stream.set_bandwidth(0)
                stream.resume()
                await wait_until(lambda: image.complete)
                nursery.cancel_scope.cancel()
            assert sorted(chunk_reads(source, CS)) == list(range(N))

    run(main)


def test_start_paused(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            stream = StreamWorker([rig.image("a")], StreamConfig(start_paused=True))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(30)
                assert rig.source("a").reads == []
                stream.resume("a")
                await wait_until(lambda: rig.image("a").complete)
                nursery.cancel_scope.cancel()

    run(main)


def test_bandwidth_limit_paces_the_stream(rig_factory) -> None:
    rate = 64 * CS // 4  # the whole image in 4 s

    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            stream = StreamWorker([image], StreamConfig(bandwidth=rate, run_chunks=4))
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                await nursery.start(stream.run)
                await wait_until(lambda: image.complete)
                elapsed = trio.current_time() - start
                nursery.cancel_scope.cancel()
            # 16 runs of 4 chunks; the first one starts at once.
            assert 4.0 - 0.25 - 0.05 <= elapsed <= 4.0 + 0.2, elapsed

    run(main)


def test_bandwidth_change_takes_effect(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            stream = StreamWorker([image], StreamConfig(bandwidth=CS))  # 1 chunk/s
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(10.5)
                assert 8 <= image.local_chunks <= 16  # ~10 chunks in 10 s (runs of 4)
                stream.set_bandwidth(0)
                start = trio.current_time()
                await wait_until(lambda: image.complete)
                assert trio.current_time() - start <= 1.0
                nursery.cancel_scope.cancel()

    run(main)


def test_failing_base_backs_off_shows_error_and_recovers(rig_factory) -> None:
    async def main() -> None:
        policy = RetryPolicy(io_timeout=2.0, first_backoff=0.1, max_backoff=1.0)
        async with rig_factory({"a": DATA}, policy=policy) as rig:
            image = rig.image("a")
            source = rig.source("a")
            source.faults.fail_next = 10**9
            stream = StreamWorker([image], StreamConfig())
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(100)
                stats = stream.statistics("a")
                assert stats.error is not None and "2 s" in stats.error
                assert stats.state == "offline"  # not "streaming": nothing is fetched
                # Backing off: without it two workers would fail ~100 times in 100 s.
                assert 2 <= rig.fetcher.failures <= 20, rig.fetcher.failures
                # A failed fetch never leaves a mark.
                assert image.local_chunks == 0 and rig.store.pending_count == 0
                source.faults.fail_next = 0  # the base comes back
                back, reads_before = trio.current_time(), len(source.reads)
                await wait_until(lambda: image.complete, timeout=120)
                # Chunks tried during the outage are not left deferred (for up to 5 min) nor
                # fetched one request each: the stream picks them up in runs at once.
                # (Before: 46 requests for 64 chunks, most of them single chunks.)
                assert len(source.reads) - reads_before <= N // 4 + 4  # runs of 4 chunks
                assert trio.current_time() - back < MAX_BACKOFF + 10
                assert stream.statistics("a").error is None
                assert stream.statistics("a").state == "complete"
                nursery.cancel_scope.cancel()
            assert await image.read(0, N * CS) == DATA

    run(main)


def test_a_long_outage_is_a_line_a_minute_in_the_log(rig_factory, caplog) -> None:
    """Backing off to 30 s, the stream logged every try (~12 lines in 4 minutes per image):
    now the first, a reminder a minute at most, and the end; and nothing else says each try
    (the image said each failed fill as an error)."""
    caplog.set_level(logging.INFO, logger="corfs")

    async def main() -> None:
        policy = RetryPolicy(io_timeout=2.0, first_backoff=0.5, max_backoff=1.0)
        async with rig_factory({"a": DATA}, policy=policy) as rig:
            image = rig.image("a")
            rig.source("a").faults.fail_next = 10**9
            # One worker fetching single chunks: a failed run is not tried again chunk by
            # chunk, so each clock jump (5 ms of real time each) is a try this test is about.
            stream = StreamWorker([image], StreamConfig(workers=1, run_chunks=1))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(250)  # simulated: backing off to 30 s, ~12 tries
                rig.source("a").faults.fail_next = 0
                await wait_until(lambda: image.complete, timeout=120)
                nursery.cancel_scope.cancel()

    run(main)
    lines = [r.getMessage() for r in caplog.records if r.name == "corfs.stream"]
    assert lines[0].startswith("stream of a failed (will retry): "), lines
    reminders = [line for line in lines[1:-1] if line.startswith("stream of a still fails: ")]
    assert reminders == lines[1:-1] and 2 <= len(reminders) <= 4, lines
    assert lines[-1].startswith("stream of a works again, after "), lines
    others = [r.getMessage() for r in caplog.records
              if r.name != "corfs.stream" and r.levelno >= logging.WARNING]
    assert others == [], others


def test_failed_chunks_are_never_recorded_local(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}, policy=RetryPolicy(io_timeout=1.0)) as rig:
            image = rig.image("a")
            source = rig.source("a")
            real_read = source.read

            async def broken_above_ten(offset: int, length: int) -> bytes:
                if offset + length > 10 * CS:
                    await trio.lowlevel.checkpoint()
                    raise TransientBaseError("injected")
                return await real_read(offset, length)

            source.read = broken_above_ten  # type: ignore[method-assign]
            stream = StreamWorker([image], StreamConfig(workers=2, run_chunks=2))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(60)
                nursery.cancel_scope.cancel()
            assert [image.is_local(i) for i in range(N)] == [i < 10 for i in range(N)]
            await rig.store.commit()
            rows = committed_states(rig.cache_dir, "a")
            assert sorted(rows) == list(range(10))
            assert rig.data_file("a")[10 * CS :] == bytes((N - 10) * CS)

    run(main)


def test_stream_completes_everything_but_a_chunk_that_keeps_failing(rig_factory) -> None:
    """Published chunk 2 is corrupt for good: the rest of its run (fetched with it) and of the
    image streams to completion; chunk 2 is retried alone with a growing delay and shows in
    status with its error."""
    from corfs.control import Controller

    async def main() -> None:
        async with rig_factory({"p": DATA}, published=True) as rig:
            image = rig.image("p")
            source = rig.source("p")
            source.faults.corrupt_at = {2 * CS + 7}
            stream = StreamWorker([image], StreamConfig(workers=1, run_chunks=4))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: image.local_chunks == N - 1, timeout=60)
                await trio.sleep(300)
                nursery.cancel_scope.cancel()
            assert not image.is_local(2) and image.local_chunks == N - 1
            assert await image.read(0, 2 * CS) == DATA[: 2 * CS]
            assert await image.read(3 * CS, (N - 3) * CS) == DATA[3 * CS :]
            # Retried alone, two fetches a try, after 2, 4, 8 ... 128 s: 7 tries in 254 s.
            tries = (chunk_reads(source, CS).count(2) - 2) // 2
            assert tries == 7, tries
            status = Controller(
                [image], stream, store=rig.store, base="memory://", mountpoint="/mnt"
            ).status().to_dict()["images"][0]
            assert status["failing_chunks"] == 1 and status["failing_chunk_indexes"] == (2,)
            assert "chunk 2 failed its digest check twice" in status["error"]
            assert status["state"] == "streaming"

    run(main)


def test_a_run_that_fails_as_a_whole_does_not_stall_the_stream(rig_factory) -> None:
    """Every read touching raw chunk 5 fails until io_timeout (not attributable to one chunk by
    the fetcher): the stream backs off that run, streams the rest, retries its chunks alone,
    and so ends with everything but chunk 5."""

    async def main() -> None:
        async with rig_factory({"a": DATA}, policy=RetryPolicy(io_timeout=1.0)) as rig:
            image = rig.image("a")
            source = rig.source("a")
            real_read = source.read

            async def broken_at_five(offset: int, length: int) -> bytes:
                if offset <= 5 * CS < offset + length:
                    await trio.lowlevel.checkpoint()
                    raise TransientBaseError("connection reset")
                return await real_read(offset, length)

            source.read = broken_at_five  # type: ignore[method-assign]
            stream = StreamWorker([image], StreamConfig(workers=2, run_chunks=4))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: image.local_chunks == N - 1, timeout=300)
                await trio.sleep(30)  # chunk 5 retried alone (its neighbours' filling healed it)
                nursery.cancel_scope.cancel()
            assert [i for i in range(N) if not image.is_local(i)] == [5]
            assert image.failing_chunks == [5] and "1 s" in (image.fill_error or "")

    run(main)


def test_a_run_whose_every_chunk_fails_backs_the_stream_off(rig_factory) -> None:
    """Every published chunk is bad (as if the chunk objects were gone): each fails on its own,
    but a run failing chunk by chunk backs the whole stream off, it does not sweep the image."""

    async def main() -> None:
        async with rig_factory({"p": DATA}, published=True) as rig:
            source = rig.source("p")
            source.faults.corrupt_at = {i * CS for i in range(N)}
            stream = StreamWorker([rig.image("p")], StreamConfig(workers=1, run_chunks=4))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(100)
                nursery.cancel_scope.cancel()
            # Runs after 0, 1, 2, 4, 8, 16, 30, 30 s: about 8, not all 16 at once and again.
            runs = sum(1 for _, length in source.reads if length > CS)
            assert 6 <= runs <= 10, runs
            assert len(rig.image("p").failing_chunks) == 4 * runs

    run(main)


def test_base_changed_stops_the_stream_with_an_error(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            rig.source("a").replace(random_bytes(N * CS, seed=5), "v2")
            stream = StreamWorker([image], StreamConfig())
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(60)
                nursery.cancel_scope.cancel()
            assert stream.statistics("a").state == "error"
            assert image.local_chunks == 0
            assert len(rig.source("a").reads) <= 4  # it stopped; no retry loop

    run(main)


def test_second_stream_fetches_only_what_was_not_committed(tmp_path, rig_factory) -> None:
    cache = tmp_path / "resume-cache"
    committed: dict[int, tuple[int, bytes | None]] = {}

    async def first() -> None:
        async with rig_factory({"a": DATA}, cache_dir=cache) as rig:
            image = rig.image("a")
            rig.source("a").faults.delay = 0.1
            stream = StreamWorker([image], StreamConfig())
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: image.local_chunks >= 20)
                nursery.cancel_scope.cancel()
            await rig.store.commit()
            # Land a few more chunks that are never committed (as if killed right now).
            await image.read(50 * CS, 2 * CS)
        committed.update(committed_states(cache, "a"))

    async def second() -> None:
        async with rig_factory({"a": DATA}, cache_dir=cache) as rig:
            image = rig.image("a")
            assert image.local_chunks == len(committed)
            stream = StreamWorker([image], StreamConfig())
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await wait_until(lambda: image.complete)
                nursery.cancel_scope.cancel()
            fetched = chunk_reads(rig.source("a"), CS)
            assert sorted(fetched) == [i for i in range(N) if i not in committed]
            assert await image.read(0, N * CS) == DATA

    run(first)
    assert 20 <= len(committed) < N and 50 not in committed
    run(second)


def test_rate_meter_sampling(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            image = rig.image("a")
            stream = StreamWorker([image], StreamConfig(bandwidth=8 * CS, run_chunks=1))
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(5.5)
                assert stream.statistics("a").rate_bps == pytest.approx(8 * CS, rel=0.3)
                nursery.cancel_scope.cancel()

    run(main)


def test_a_wake_up_wakes_every_sleeping_worker(rig_factory) -> None:
    """Two workers asleep (the stream paused): a resume starts both at once, not one now and
    the other when its one-second nap ends."""

    async def main() -> None:
        async with rig_factory({"a": DATA}) as rig:
            source = rig.source("a")
            source.faults.delay = 10.0
            config = StreamConfig(workers=2, run_chunks=1, start_paused=True)
            stream = StreamWorker([rig.image("a")], config)
            async with trio.open_nursery() as nursery:
                await nursery.start(stream.run)
                await trio.sleep(0.5)  # both asleep, half-way through a nap
                stream.resume()
                await trio.sleep(0.1)
                assert source.in_flight == 2
                nursery.cancel_scope.cancel()

    run(main)
