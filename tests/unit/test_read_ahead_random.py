"""Issue 13.2: a random reader fetches no more than it reads. A read landing by chance in the
chunk after the previous one is not a sequential run: no read-ahead, and it may take a small
range (ranges.py); a read starting at the byte where the last one ended is one."""

from __future__ import annotations

from corfs.read_ahead import ReadAhead

CS = 1 << 20


def test_a_random_read_in_the_next_chunk_opens_no_window() -> None:
    policy = ReadAhead(64)
    assert policy.after_read(range(3, 4), lambda i: True, (3 * CS + 4096, 3 * CS + 8192)) == []
    assert not policy.sequential
    # Chunk 4 right after chunk 3, but not where the last read ended: random still.
    assert policy.after_read(range(4, 5), lambda i: True, (4 * CS + 65536, 4 * CS + 69632)) == []
    assert not policy.sequential


def test_a_read_where_the_last_one_ended_is_sequential() -> None:
    policy = ReadAhead(64)
    policy.after_read(range(3, 4), lambda i: True, (4 * CS - 4096, 4 * CS))
    ahead = policy.after_read(range(4, 5), lambda i: True, (4 * CS, 4 * CS + 4096))
    assert policy.sequential and ahead == [5, 6]
