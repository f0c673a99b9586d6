"""FreshChunks: kept bytes are bounded by the buffers they keep alive (oldest go first), and
dropping or replacing an entry keeps the count right."""

from __future__ import annotations

from corfs.buffers import aligned_buffer
from corfs.fresh import FreshChunks

CHUNK = 64 << 10


def test_oldest_entries_go_once_the_byte_limit_is_passed() -> None:
    fresh = FreshChunks(limit_bytes=3 * 100)
    for index in range(5):
        fresh.keep(index, bytes([index]) * 100)
    assert len(fresh) == 3
    assert [i for i in range(5) if fresh.get(i) is not None] == [2, 3, 4]
    assert fresh.get(4) == bytes([4]) * 100 and fresh.get(0) is None


def test_replacing_and_dropping_keep_the_byte_count_right() -> None:
    fresh = FreshChunks(limit_bytes=200)
    fresh.keep(1, b"a" * 100)
    fresh.keep(1, b"b" * 100)  # the same chunk again: counted once
    fresh.keep(2, b"c" * 100)
    assert len(fresh) == 2 and fresh.get(1) == b"b" * 100
    fresh.drop(1)
    fresh.drop(1)  # dropping an absent entry is harmless
    fresh.keep(3, b"d" * 100)
    assert [i for i in (1, 2, 3) if fresh.get(i) is not None] == [2, 3]
    fresh.keep(4, b"e" * 150)  # over the limit: the oldest go until it fits
    assert [i for i in (2, 3, 4) if fresh.get(i) is not None] == [4]


def test_chunks_of_one_fetch_buffer_count_it_once_and_whole() -> None:
    """A run fetched in one request is one buffer; its chunks are views of it, and it lives
    while any of them is kept: the limit bounds those buffers, not the chunks' lengths (one
    chunk kept from each of many runs held a multiple of the limit)."""
    runs = [aligned_buffer(4 * CHUNK) for _ in range(3)]

    def chunk(run: int, n: int) -> memoryview:
        return runs[run][n * CHUNK : (n + 1) * CHUNK]

    fresh = FreshChunks(limit_bytes=8 * CHUNK)  # two runs' buffers
    for n in range(4):
        fresh.keep(n, chunk(0, n))  # one buffer, counted once: all four fit
    fresh.keep(10, chunk(1, 0))
    assert fresh.indexes() == [0, 1, 2, 3, 10]
    fresh.keep(20, chunk(2, 0))  # a third buffer: the oldest go until run 0's is let go
    assert fresh.indexes() == [10, 20]
    fresh.drop(10)
    fresh.keep(21, chunk(2, 1))
    fresh.keep(11, chunk(1, 1))  # run 1's buffer again: counted anew, and it fits
    assert fresh.indexes() == [20, 21, 11]
    fresh.keep(5, bytes(CHUNK))  # bytes are their own buffer
    assert fresh.indexes() == [11, 5]  # run 2's buffer went: 8 chunks' worth was passed


def test_a_chunk_of_a_buffer_larger_than_the_limit_is_kept_as_a_copy() -> None:
    """A view would count its whole buffer and push out every other entry, then itself (a run
    of 8 chunks of 16 MiB is 128 MiB, twice the limit): the chunk is copied instead, and one
    larger than the limit is not kept at all, the others staying."""
    fresh = FreshChunks(limit_bytes=4 * CHUNK)
    small = aligned_buffer(2 * CHUNK)
    fresh.keep(1, small[:CHUNK])
    big = aligned_buffer(8 * CHUNK)
    big[:] = bytes(range(256)) * (8 * CHUNK // 256)
    fresh.keep(2, big[CHUNK : 2 * CHUNK])
    assert fresh.indexes() == [1, 2]
    kept = fresh.get(2)
    assert kept is not None and bytes(kept) == bytes(big[CHUNK : 2 * CHUNK])
    assert isinstance(kept, memoryview) and kept.obj is not big.obj  # a copy
    fresh.keep(3, big[: 5 * CHUNK])  # larger than the limit itself: not kept
    assert fresh.indexes() == [1, 2]
