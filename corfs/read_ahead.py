"""The one read-ahead policy of an image: which chunks are fetched before a client asks.

- A reader whose read starts where its last one ended is sequential: the chunks after it are
  fetched now, for it (Image keeps their bytes for the reader), in a window that doubles up to
  READ_AHEAD_MAX; a random read resets the window, and its miss fetches only a small range
  around it (ranges.py) where the base allows. Reads of local chunks count too, so the window
  keeps moving while the reader is served from it. New fetches go out READ_AHEAD_RUN chunks at
  a time (larger requests and writes cost less per byte) unless the reader's next chunk is not
  on its way yet.
- After a foreground miss, the MISS_HINT_CHUNKS chunks after it are hinted to the stream, which
  fills them (newest hint first) before its own order: a client that missed there is likely to
  read on there. Hints are bounded (a long-paused stream must not collect them forever).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

READ_AHEAD_MAX = 32  # chunks fetched ahead of a sequential reader
READ_AHEAD_RUN = 4  # chunks per read-ahead request: small runs land (and unblock) sooner
MISS_HINT_CHUNKS = 8  # chunks after a foreground miss hinted to the stream
_MAX_HINTS = 256


class ReadAhead:
    def __init__(self, chunk_count: int) -> None:
        self._chunk_count = chunk_count
        self._next_sequential = -1  # the chunk a sequential reader would miss next
        self._window = 0  # current read-ahead window, in chunks
        self._last_end = -1  # where the latest read ended, in bytes
        self._continued = False  # the latest read started there
        self._hints: collections.deque[int] = collections.deque(maxlen=_MAX_HINTS)

    def after_read(
        self, chunks: range, fetchable: Callable[[int], bool], span: tuple[int, int] = (-2, -1)
    ) -> list[int]:
        """A client reads `chunks` (bytes `span`, start and end): the chunks to fetch for it
        now (`fetchable`: absent and not being filled), possibly none."""
        self._continued = span[0] == self._last_end
        self._last_end = span[1]
        if chunks.start == self._next_sequential - 1 and chunks.stop == self._next_sequential:
            return []  # another read in the same chunk (a concurrent reader, or the rest of it)
        # A window opens only for a read that starts at the very byte the last one ended at: a
        # random reader landing in the next chunk by chance must not fetch ahead (amplification).
        if chunks.start == self._next_sequential and (self._window or self._continued):
            self._window = min(READ_AHEAD_MAX, max(2, self._window * 2))
        else:
            self._window = 0
        self._next_sequential = chunks.stop
        if not self._window:
            return []
        stop = min(self._chunk_count, chunks.stop + self._window)
        ahead = [i for i in range(chunks.stop, stop) if fetchable(i)]
        if len(ahead) >= READ_AHEAD_RUN or (
            ahead and (ahead[0] == chunks.stop or stop == self._chunk_count)
        ):
            return ahead
        return []

    @property
    def sequential(self) -> bool:
        """Whether the latest read continued a sequential run: its window is open, or it
        started at the byte where the read before it ended (the first chunk of a run)."""
        return self._window > 0 or self._continued

    def ahead_of_reader(self, run: range) -> bool:
        """A sequential reader will soon read these chunks (a stream fill that landed in its
        read-ahead window): worth keeping their bytes for it."""
        start = self._next_sequential
        return self._window > 0 and start <= run.start < start + 2 * READ_AHEAD_MAX

    def after_miss(self, chunks: range) -> None:
        """A client read missed in `chunks`: hint the chunks after them to the stream."""
        ahead = range(chunks.stop, min(self._chunk_count, chunks.stop + MISS_HINT_CHUNKS))
        self._hints.extendleft(reversed(ahead))

    def take_hint(self) -> int | None:
        """The next chunk hinted to the stream, or None."""
        return self._hints.popleft() if self._hints else None
