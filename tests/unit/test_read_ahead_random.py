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


def test_interleaved_sequential_readers_each_keep_their_window() -> None:
    """8 readers of one image, 1 MiB reads each in its own region, interleaved (one FUSE handle
    for all): each is followed as its own run, its window opening and growing; random reads
    among them do not push them out."""
    policy = ReadAhead(8 * 64)
    readers = [r * 64 for r in range(8)]  # each reader's next chunk
    random_chunk = 7 * 64 + 40
    for step in range(4):
        for r, chunk in enumerate(readers):
            ahead = policy.after_read(range(chunk, chunk + 1), lambda i: True,
                                      (chunk * CS, (chunk + 1) * CS))
            if step:
                assert policy.sequential and ahead, (step, r)
                assert ahead[0] == chunk + 1
            readers[r] = chunk + 1
            for k in range(3):  # a random reader beside them
                offset = (random_chunk - 30 * k - step) * CS + 4096
                policy.after_read(range(offset // CS, offset // CS + 1), lambda i: True,
                                  (offset, offset + 4096))
                assert not policy.sequential
    assert policy.ahead_of_reader(range(readers[3] + 1, readers[3] + 2))


def test_the_windows_of_all_readers_share_one_budget() -> None:
    """Chunks fetched ahead wait in memory for their readers: all windows together stay
    within the budget (one reader alone gets READ_AHEAD_MAX), or one reader's chunks push out
    another's before it reads them. A reader that stopped long ago takes no share."""
    from corfs.read_ahead import READ_AHEAD_MAX, STALE_READS

    def read(policy: ReadAhead, chunk: int) -> list[int]:
        return policy.after_read(range(chunk, chunk + 1), lambda i: True,
                                 (chunk * CS, (chunk + 1) * CS))

    alone = ReadAhead(4096, budget_chunks=64)
    assert max(len(read(alone, c)) for c in range(40)) == READ_AHEAD_MAX
    many = ReadAhead(4096, budget_chunks=64)
    starts = [r * 512 for r in range(8)]
    for step in range(40):
        for r in range(8):
            assert len(read(many, starts[r] + step)) <= 64 // 8 + 1
    # The others stop; after a while the one that goes on has the whole budget again.
    widest = max(len(read(many, starts[0] + 40 + i)) for i in range(STALE_READS + 20))
    assert widest == READ_AHEAD_MAX
