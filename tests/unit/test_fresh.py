"""FreshChunks: kept bytes are bounded by their total size (oldest go first), and dropping or
replacing an entry keeps the count right."""

from __future__ import annotations

from corfs.fresh import FreshChunks


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
