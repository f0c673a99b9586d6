"""The write-behind budget of a mount: fetched, verified chunk bytes waiting in memory to be
stored in CACHE, so that no reader waits for the cache disk.

A fill answers its waiters as soon as its chunks are verified, then stores them behind
(store_queue.py): their bytes stay queued in memory, serving reads, until DataFile.store
has written them; only then are they recorded local (so the commit's fdatasync-then-rows order,
"never mark before durable", is unchanged; a crash loses at most queued bytes, fetched again).

The budget (MountConfig.write_behind, `--write-behind SIZE`) bounds the queued bytes; it is
exceeded only by one fill queued alone (an empty queue always takes one: a budget of 0 stores
one fill at a time) and by the bounded overdraft of client writes below:
- A stream fill (no client waits) reserves room before it fetches and waits for it: the stream
  runs at the cache disk's pace once its share is full (back-pressure). It takes no more than
  STREAM_SHARE of the budget: the rest is room for clients' fills, which are then stored, not
  dropped and fetched again (with the whole budget to the stream, a 1 GiB cold read of a
  default mount had 160 chunks dropped and 1180 MiB fetched by its end: bench/RESULTS.md).
- A client's fill never waits for room. If there is none, a fill only readers wait for is
  served from its bytes and not stored ("dropped": the chunk stays absent, its bytes are kept
  a while for re-reads (fresh.py), the stream fetches it again later; counted in status).
- A fill a client write waits for (a partial write needs the chunk local) is always stored; it
  may overdraw the budget, by at most the two partial chunks of each write in flight.

A store that fails (ENOSPC, EIO) leaves its chunks absent (one log line, status); stream fills
then wait before they take room again (STORE_RETRY_FIRST doubling up to STORE_RETRY_MAX, until
a store succeeds), so a full disk does not turn the stream into a loop of fetches.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .config import DEFAULT_WRITE_BEHIND

STREAM_SHARE = 0.5  # of the budget, at most, for stream fills
STORE_RETRY_FIRST = 1.0  # seconds stream fills wait after a store failed
STORE_RETRY_MAX = 30.0


@dataclass(frozen=True)
class WriteBehindStatistics:
    limit_bytes: int
    queued_bytes: int
    stored_chunks: int  # stored behind their readers
    dropped_chunks: int  # served and not stored: no room (module docstring)
    store_failures: int


class WriteBehind:
    def __init__(self, limit_bytes: int = DEFAULT_WRITE_BEHIND) -> None:
        self.limit_bytes = limit_bytes
        self.queued_bytes = 0
        self.stored_chunks = 0
        self.dropped_chunks = 0
        self.store_failures = 0
        self._released = trio.Event()  # set (and replaced) whenever bytes are released
        self._failures_in_a_row = 0
        self._retry_at = 0.0

    def statistics(self) -> WriteBehindStatistics:
        return WriteBehindStatistics(
            self.limit_bytes,
            self.queued_bytes,
            self.stored_chunks,
            self.dropped_chunks,
            self.store_failures,
        )

    def take_nowait(self, nbytes: int, *, overdraw: bool = False, share: float = 1.0) -> bool:
        """Take room for `nbytes` if there is some within `share` of the budget: True if
        taken. An empty queue always has room (a fill larger than the budget, or a budget of
        0, goes alone); `overdraw` takes it anyway (module docstring)."""
        if (
            overdraw
            or not self.queued_bytes
            or self.queued_bytes + nbytes <= self.limit_bytes * share
        ):
            self.queued_bytes += nbytes
            return True
        return False

    async def wait_room(self, nbytes: int) -> None:
        """Take room for a stream fill's `nbytes` within STREAM_SHARE of the budget, waiting
        for it (and for a failing disk's retry time)."""
        while (delay := self._retry_at - trio.current_time()) > 0:
            await trio.sleep(delay)
        while not self.take_nowait(nbytes, share=STREAM_SHARE):
            await self._released.wait()

    def release(self, nbytes: int) -> None:
        """Queued bytes left memory (stored, failed, or not queued after all)."""
        if nbytes:
            self.queued_bytes -= nbytes
            self._released.set()  # every waiter checks again
            self._released = trio.Event()

    def stored(self, chunks: int) -> None:
        self.stored_chunks += chunks
        self._failures_in_a_row = 0
        self._retry_at = 0.0

    def dropped(self, chunks: int) -> None:
        self.dropped_chunks += chunks

    def store_failed(self) -> None:
        self.store_failures += 1
        self._failures_in_a_row += 1
        delay = min(STORE_RETRY_MAX, STORE_RETRY_FIRST * 2 ** min(self._failures_in_a_row - 1, 8))
        self._retry_at = trio.current_time() + delay
