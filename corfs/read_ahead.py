"""The one read-ahead policy of an image: which chunks are fetched before a client asks.

- A reader whose read starts where its last one ended is sequential: the chunks after it are
  fetched now, for it (Image keeps their bytes for the reader), in a window that doubles up to
  READ_AHEAD_MAX; a random read resets the window, and its miss fetches only a small range
  around it (ranges.py) where the base allows. Reads of local chunks count too, so the window
  keeps moving while the reader is served from it. New fetches go out READ_AHEAD_RUN chunks at
  a time (larger requests and writes cost less per byte) unless the reader's next chunk is not
  on its way yet. Chunks of the window that are local already are read from the cache file
  into the page cache ahead of the reader (`newly_ahead`).
- After a foreground miss, the MISS_HINT_CHUNKS chunks after it are hinted to the stream, which
  fills them (newest hint first) before its own order: a client that missed there is likely to
  read on there. Hints are bounded (a long-paused stream must not collect them forever).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

READ_AHEAD_MAX = 32  # chunks fetched ahead of a sequential reader
READ_AHEAD_RUN = 4  # chunks per read-ahead request: small runs land (and unblock) sooner
MISS_HINT_CHUNKS = 8  # chunks after a foreground miss hinted to the stream
_MAX_HINTS = 256
MAX_RUNS = 64  # runs followed at once: sequential readers, and random reads that may become one
STALE_READS = 1024  # a run not read during this many reads of the image has stopped
ACTIVE_SECONDS = 1.0  # an image whose readers did not read ahead this long takes no share


class ReadAheadShare:
    """The read-ahead of all the images of a mount, bounded together (read_memory.py): what
    is fetched ahead is kept in memory for its readers, and each image's own bound (its
    `budget_chunks`) let the memory grow with the number of images read at once. Each image
    reading ahead lately gets an equal share of the bytes."""

    def __init__(
        self, budget_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._active: dict[int, float] = {}  # id(ReadAhead) -> when it last read ahead

    def chunks_of(self, reader: ReadAhead, chunk_size: int) -> int:
        """The chunks `reader` may have ahead of its readers now (it reads ahead, so it is
        active). Less than its share of the bytes: what is kept for a reader is more than its
        window, as counted (fresh.py): the buffer of the run being read, whole, until the run
        is read through (READ_AHEAD_RUN chunks), another run that arrived before its turn,
        and for small chunks the page each fetch buffer has beyond its bytes (buffers.py)."""
        now = self._clock()
        self._active[id(reader)] = now
        if len(self._active) > 1:
            for key in [k for k, t in self._active.items() if now - t > ACTIVE_SECONDS]:
                del self._active[key]
        share = self.budget_bytes // len(self._active)
        return share * 3 // 4 // chunk_size - 2 * READ_AHEAD_RUN


@dataclass
class _Run:
    """One sequential reader's state: where its last read ended and its window."""

    next_sequential: int = -1  # the chunk this reader would miss next
    window: int = 0  # its read-ahead window, in chunks
    last_end: int = -1  # where its latest read ended, in bytes
    last_read: int = 0  # ReadAhead._reads when it was last read
    hinted: int = 0  # the chunks before this one were handed out by `newly_ahead`


class ReadAhead:
    """Read-ahead per reader: FUSE gives one handle per image, so the reads of many clients
    (VMs booting from one image, threads of one) arrive interleaved. Each read is matched to
    the run it continues (`_run_of`); up to MAX_RUNS runs are followed (`_to_forget`). With a
    single run, 8 readers of one image reset each other's window on every read."""

    def __init__(
        self, chunk_count: int, budget_chunks: int = 2 * READ_AHEAD_MAX, *,
        chunk_size: int = 1, share: ReadAheadShare | None = None,
    ) -> None:
        self._chunk_count = chunk_count
        self._chunk_size = chunk_size
        self._share = share  # the mount's bound over all images, with this one's below
        # How far ahead of a reader a stream fill is kept for it: twice the window it may
        # grow to, within the image's share of the mount's memory (review: 64 chunks whatever
        # the share, which pushed other images' read-ahead out).
        self._reach = 2 * READ_AHEAD_MAX
        # The bytes fetched ahead are kept in memory for their readers (Image's fresh chunks,
        # bounded): the windows of all runs together stay within that, or chunks fetched for
        # one reader push out another's before it reads them (then each of its reads goes to
        # the cache disk, on the event loop: 8 readers of one image ran at half one's speed).
        self._budget = budget_chunks
        self._runs: collections.OrderedDict[int, _Run] = collections.OrderedDict()  # by id
        self._latest = _Run()  # the run of the latest read
        self._continued = False  # the latest read started where its run's last read ended
        self._hints: collections.deque[int] = collections.deque(maxlen=_MAX_HINTS)
        self._reads = 0  # reads seen: a run not read for a while no longer takes its share
        self._by_end: dict[int, _Run] = {}  # runs by where their last read ended (byte)

    def _live(self, run: _Run) -> bool:
        """Read lately: a run not read during STALE_READS reads of the image has stopped."""
        return self._reads - run.last_read < STALE_READS

    def _run_of(self, chunks: range, start: int) -> _Run:
        """The run this read continues, or a new one: a live run whose last read ended at the
        byte where this one starts, else the latest read's run if this read is in its next
        chunk (or the rest of its chunk), as with one reader. Only the latest run matches by
        chunk: a random read landing after a run that stopped must not revive its window."""
        run = self._by_end.get(start)
        if run is not None and not self._live(run):
            run = None
        self._continued = run is not None
        if run is None:
            latest = self._latest
            if chunks.start == latest.next_sequential or (
                chunks.start == latest.next_sequential - 1
                and chunks.stop == latest.next_sequential
            ):
                run = latest
            else:
                run = _Run(last_read=self._reads)  # live from now on, not "stopped" at birth
        key = id(run)
        self._runs[key] = run
        self._runs.move_to_end(key)
        if len(self._runs) > MAX_RUNS:
            forgotten = self._runs.pop(self._to_forget(run))
            if self._by_end.get(forgotten.last_end) is forgotten:
                del self._by_end[forgotten.last_end]
        return run

    def _to_forget(self, current: _Run) -> int:
        """The run to stop following: the oldest if it stopped or has no window (with random
        reads it is one: scanning every run on each random read was 5 % of the daemon's time
        per miss), else one that stopped (oldest first), else one with no window (random reads
        each make one, and must not push out the readers that stream), else this read's run if
        it has none, else the oldest."""
        key, oldest = next(iter(self._runs.items()))
        if oldest is not current and (not oldest.window or not self._live(oldest)):
            return key
        runs = self._runs.items()
        for key, run in runs:
            if not self._live(run):
                return key
        for key, run in runs:
            if not run.window and run is not current:
                return key
        return id(current) if not current.window else next(iter(self._runs))

    def after_read(
        self, chunks: range, fetchable: Callable[[int], bool], span: tuple[int, int] = (-2, -1),
        *, fetching: bool = True,
    ) -> list[int]:
        """A client reads `chunks` (bytes `span`, start and end): the chunks to fetch for it
        now (`fetchable`: absent and not being filled), possibly none. Not `fetching` (the
        image is complete): the window only hints local chunks to the page cache, and takes
        no share of the mount's memory."""
        run = self._latest = self._run_of(chunks, span[0])
        self._reads += 1
        if self._by_end.get(run.last_end) is run:
            del self._by_end[run.last_end]
        run.last_end, run.last_read = span[1], self._reads
        if id(run) in self._runs:  # not if it was the one forgotten (`_to_forget`)
            self._by_end[run.last_end] = run
        if chunks.start == run.next_sequential - 1 and chunks.stop == run.next_sequential:
            return []  # another read in the same chunk (the rest of it)
        # A window opens only for a read that starts at the very byte the last one ended at: a
        # random reader landing in the next chunk by chance must not fetch ahead (amplification).
        if chunks.start == run.next_sequential and (run.window or self._continued):
            run.window = min(self._max_window(run, fetching), max(2, run.window * 2))
        else:
            run.window = 0
        run.next_sequential = chunks.stop
        if not run.window:
            return []
        stop = min(self._chunk_count, chunks.stop + run.window)
        ahead = [i for i in range(chunks.stop, stop) if fetchable(i)]
        if len(ahead) >= READ_AHEAD_RUN or (
            ahead and (ahead[0] == chunks.stop or stop == self._chunk_count)
        ):
            return ahead
        return []

    def newly_ahead(self, most: int) -> range:
        """The chunks that came into the latest read's window (its first `most` chunks) with
        it, each handed out once per run: Image has the kernel read the local ones from the
        cache file before the reader gets there (the data file's own read-ahead left the loop's
        1 MiB preads waiting for the disk one at a time)."""
        run = self._latest
        if not run.window:
            return range(0)
        stop = min(self._chunk_count, run.next_sequential + min(run.window, most))
        start = max(run.next_sequential, run.hinted)
        run.hinted = max(run.hinted, stop)
        return range(start, stop)

    def _max_window(self, run: _Run, fetching: bool = True) -> int:
        """READ_AHEAD_MAX for a reader alone, else its share of the budget among the live
        runs reading ahead (at least 2); and within the image's share of the mount's
        (ReadAheadShare), which may be none at all: then nothing is read ahead, and each
        chunk is fetched when its reader gets there."""
        others = sum(1 for r in self._runs.values() if r.window and r is not run and self._live(r))
        window = READ_AHEAD_MAX if not others else min(READ_AHEAD_MAX, self._budget // (others + 1))
        window = max(2, window)
        if self._share is not None and fetching:
            shared = self._share.chunks_of(self, self._chunk_size)
            self._reach = 2 * max(0, min(READ_AHEAD_MAX, shared))  # see ahead_of_reader
            window = min(window, shared // (others + 1))
        return max(0, window)

    @property
    def sequential(self) -> bool:
        """Whether the latest read continued a sequential run: its window is open, or it
        started at the byte where its run's read before it ended (the first chunk of a run)."""
        return self._latest.window > 0 or self._continued

    def ahead_of_reader(self, chunks: range) -> bool:
        """A sequential reader will soon read these chunks (a stream fill that landed within
        twice the window it may grow to): worth keeping their bytes for it."""
        return any(
            run.window > 0
            and self._live(run)
            and run.next_sequential <= chunks.start < run.next_sequential + self._reach
            for run in self._runs.values()
        )

    def after_miss(self, chunks: range) -> None:
        """A client read missed in `chunks`: hint the chunks after them to the stream."""
        ahead = range(chunks.stop, min(self._chunk_count, chunks.stop + MISS_HINT_CHUNKS))
        self._hints.extendleft(reversed(ahead))

    def take_hint(self) -> int | None:
        """The next chunk hinted to the stream, or None."""
        return self._hints.popleft() if self._hints else None
