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


def _read(policy: ReadAhead, chunk: int, offset: int = 0, length: int = CS) -> list[int]:
    start = chunk * CS + offset
    return policy.after_read(range(chunk, chunk + 1), lambda i: True, (start, start + length))


def test_a_random_read_after_a_run_that_stopped_does_not_revive_its_window() -> None:
    """A reader reads chunks 0-9 and stops; random reads follow elsewhere. A random 4 KiB read
    that lands in chunk 10 by chance is random: no read-ahead, and not `sequential` (it may
    take a small range)."""
    policy = ReadAhead(4096)
    for chunk in range(10):
        _read(policy, chunk)
    assert policy.ahead_of_reader(range(12, 13))  # the reader may come back: keep its chunks
    for k in range(50):
        _read(policy, 1000 + 37 * k, 4096, 4096)
    assert _read(policy, 10, 8192, 4096) == []
    assert not policy.sequential


def test_a_run_that_stopped_neither_keeps_chunks_nor_takes_a_slot() -> None:
    """Runs of readers that stopped long ago: stream fills after them are not kept for them,
    and a new sequential reader among random reads still gets its read-ahead."""
    from corfs.read_ahead import MAX_RUNS, STALE_READS

    policy = ReadAhead(1 << 20)
    for r in range(MAX_RUNS):  # readers that read a file each, then stopped
        for chunk in range(r * 100, r * 100 + 5):
            _read(policy, chunk)
    for k in range(STALE_READS):
        _read(policy, 500_000 + 7 * k, 4096, 4096)
    assert not policy.ahead_of_reader(range(3 * 100 + 6, 3 * 100 + 7))
    got = []
    for chunk in range(200_000, 200_020):  # a new reader, a random read between its reads
        got.append(_read(policy, chunk))
        _read(policy, 700_000 + 13 * chunk, 4096, 4096)
    assert all(got[2:]), got


def test_what_is_followed_stays_bounded() -> None:
    from corfs.read_ahead import MAX_RUNS

    policy = ReadAhead(1 << 20)
    for k in range(20_000):
        _read(policy, (k * 7919) % (1 << 20), 4096 * (k % 3), 4096)
        if k % 5 == 0:
            _read(policy, k % 1000)  # sequential-ish reads among them
    assert len(policy._runs) <= MAX_RUNS and len(policy._by_end) <= MAX_RUNS


def test_window_chunks_are_handed_out_once_per_run_for_the_cache_file() -> None:
    """newly_ahead: the chunks a read brought into its run's window (Image reads the local ones
    from the cache file ahead of the reader), each once; a random read brings none."""
    policy = ReadAhead(256)
    handed: list[int] = []
    for chunk in range(6):
        policy.after_read(range(chunk, chunk + 1), lambda i: False, (chunk * CS, (chunk + 1) * CS))
        handed += policy.newly_ahead(32)
    assert handed == list(range(2, 6 + 32)), handed  # the window grew 2, 4, ... 32: each once
    policy.after_read(range(200, 201), lambda i: False, (200 * CS + 4096, 200 * CS + 8192))
    assert policy.newly_ahead(32) == range(0)
    # The reader goes on after the random read: its run carries on from where it was.
    policy.after_read(range(6, 7), lambda i: False, (6 * CS, 7 * CS))
    assert list(policy.newly_ahead(32)) == [38]
    # With large chunks fewer of the window's chunks are handed out (Image passes its cap).
    policy = ReadAhead(256)
    for chunk in range(6):
        policy.after_read(range(chunk, chunk + 1), lambda i: False, (chunk * CS, (chunk + 1) * CS))
        assert max(policy.newly_ahead(2), default=chunk) <= chunk + 2


def test_a_new_run_is_remembered_however_many_reads_came_before() -> None:
    """A run made by a read is live from that read on (not "stopped" because the image had
    STALE_READS reads before it): a read continuing it is sequential, also when the oldest
    run followed is a live sequential reader's (which is not forgotten either)."""
    from corfs.read_ahead import STALE_READS

    policy = ReadAhead(1 << 20)
    for k in range(STALE_READS + 100):  # long random history: every run is a random read's
        _read(policy, 1000 + 37 * k, 4096, 4096)
    start = 600_000 * CS + 8192
    policy.after_read(range(600_000, 600_001), lambda i: True, (start, start + 4096))
    for k in range(10):
        _read(policy, 900_000 + 53 * k, 4096, 4096)
    policy.after_read(range(600_000, 600_001), lambda i: True, (start + 4096, start + 8192))
    assert policy.sequential  # it continued the run made 10 reads before

    policy = ReadAhead(1 << 20)
    reader = 10  # a sequential reader among the random reads, read every 50 of them
    for k in range(STALE_READS + 100):
        if k % 50 == 0:
            _read(policy, reader)
            reader += 1
        _read(policy, 1000 + 37 * k, 4096, 4096)
    _read(policy, reader)
    reader += 1
    for k in range(70):  # its run is now the oldest followed, and live
        _read(policy, 500_000 + 41 * k, 4096, 4096)
    start = 700_000 * CS + 8192
    policy.after_read(range(700_000, 700_001), lambda i: True, (start, start + 4096))
    policy.after_read(range(700_000, 700_001), lambda i: True, (start + 4096, start + 8192))
    assert policy.sequential
    assert _read(policy, reader)  # and the reader's window is still there
