"""--read-memory (read_memory.py): the bytes images keep for their readers are bounded together,
oldest first whichever image's, and each image reading ahead gets an equal share of the
read-ahead bytes, given back when it stops."""

from __future__ import annotations

from corfs.fresh import FreshChunks, KeptMemory
from corfs.read_ahead import READ_AHEAD_MAX, ReadAhead, ReadAheadShare

CS = 1 << 20


def test_the_maps_of_all_images_keep_no_more_than_the_shared_limit_oldest_first() -> None:
    kept = KeptMemory(limit_bytes=300)
    a, b = FreshChunks(1000, kept), FreshChunks(1000, kept)
    a.keep(0, b"a" * 100)
    b.keep(0, b"b" * 100)
    a.keep(1, b"c" * 100)
    assert kept.bytes == 300
    b.keep(1, b"d" * 100)  # over: a's chunk 0 was kept first
    assert kept.bytes == 300
    assert a.get(0) is None and [b.get(0), a.get(1), b.get(1)] == [b"b" * 100, b"c" * 100,
                                                                      b"d" * 100]
    b.drop(0)
    a.keep(1, b"e" * 100)  # replaced: counted once, and now the newest
    assert kept.bytes == 200
    a.keep(2, b"f" * 150)  # over again: b's 1 goes, then a's 1 (the oldest left)
    assert kept.bytes == 250 and b.get(1) is None and a.get(1) == b"e" * 100
    assert FreshChunks(100, kept).limit_bytes == 100  # each map's own limit still holds


def test_a_maps_own_limit_still_applies_under_a_larger_shared_one() -> None:
    kept = KeptMemory(limit_bytes=10_000)
    fresh = FreshChunks(200, kept)
    for index in range(4):
        fresh.keep(index, bytes([index]) * 100)
    assert len(fresh) == 2 and kept.bytes == 200


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def read_on(policy: ReadAhead, chunk: int) -> list[int]:
    return policy.after_read(range(chunk, chunk + 1), lambda i: True, (chunk * CS,
                                                                        (chunk + 1) * CS))


def window_now(policy: ReadAhead, chunk: int) -> int:
    """How many chunks ahead of a sequential reader's read of `chunk` are wanted now."""
    ahead = read_on(policy, chunk)
    return ahead[-1] - chunk if ahead else 0


def test_images_reading_ahead_at_once_share_the_read_ahead_bytes_and_one_alone_has_all() -> None:
    clock = Clock()
    share = ReadAheadShare(64 * CS, clock=clock)
    images = [ReadAhead(10_000, 64, chunk_size=CS, share=share) for _ in range(4)]
    # Alone: as far as without a share (3/4 of 64 MiB, less two runs, is more than that)
    assert max(window_now(images[0], chunk) for chunk in range(20)) == READ_AHEAD_MAX
    windows = []
    for chunk in range(20, 40):  # four sequential readers, one per image, at once
        windows = [window_now(policy, chunk) for policy in images]
    assert windows == [4, 4, 4, 4]  # 16 MiB each: 3/4 of it, less two runs of 4 chunks
    clock.now += 2  # the other three stopped reading a while ago
    assert max(window_now(images[0], chunk) for chunk in range(40, 50)) == READ_AHEAD_MAX


def test_without_a_share_an_image_alone_reads_ahead_as_far_as_before() -> None:
    policy = ReadAhead(10_000, 64, chunk_size=CS)
    assert max(window_now(policy, chunk) for chunk in range(80)) == READ_AHEAD_MAX


def test_an_only_copy_is_counted_but_never_pushed_out_by_the_shared_limit() -> None:
    """Review: a chunk kept only in memory (no write-behind room), pushed out, was fetched
    again, up to 10 times with a reader half-way through it."""
    kept = KeptMemory(limit_bytes=200)
    a, b = FreshChunks(1000, kept), FreshChunks(1000, kept)
    a.keep(0, b"a" * 100, only_copy=True)
    b.keep(0, b"b" * 100)
    b.keep(1, b"c" * 100)  # over: b's 0 goes, not a's only copy
    assert a.get(0) == b"a" * 100 and b.get(0) is None and kept.bytes == 200
    small = FreshChunks(150, kept)
    small.keep(0, b"d" * 100, only_copy=True)
    small.keep(1, b"e" * 100, only_copy=True)  # the map's own limit still pushes it out
    assert small.get(0) is None and small.get(1) == b"e" * 100


def test_an_image_that_fetches_nothing_takes_no_share() -> None:
    """Review: local images read in large requests (their windows only hint the page cache)
    took shares: one cold image among seven local ones read ahead 4 chunks, not 32."""
    share = ReadAheadShare(64 * CS)
    cold = ReadAhead(10_000, 64, chunk_size=CS, share=share)
    local = [ReadAhead(10_000, 64, chunk_size=CS, share=share) for _ in range(7)]
    windows = []
    for chunk in range(20):
        for policy in local:
            policy.after_read(range(chunk, chunk + 1), lambda i: False,
                              (chunk * CS, (chunk + 1) * CS), fetching=False)
        windows.append(window_now(cold, chunk))
    assert max(windows) == READ_AHEAD_MAX


def test_a_stream_fill_is_kept_for_a_reader_only_within_its_window() -> None:
    """Review: fills landing up to 64 chunks ahead were kept whatever the reader's window, and
    pushed other images' read-ahead out of the shared memory."""
    share = ReadAheadShare(32 * CS)  # alone: 3/4 of 32 MiB, less 8 chunks: a 16-chunk window
    policy = ReadAhead(10_000, 64, chunk_size=CS, share=share)
    for chunk in range(10):
        window_now(policy, chunk)
    assert policy.ahead_of_reader(range(20, 21))
    assert not policy.ahead_of_reader(range(50, 51))
