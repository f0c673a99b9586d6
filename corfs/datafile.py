"""One image's data file in CACHE: its descriptors, how bytes reach it, and which stores are in
flight in it. CacheStore opens one per image (and syncs its `fd` at commit); Image writes
through it.

How a fill's chunk reaches the file (its `Way`), decided once per chunk before the write and
registered with the store in flight (`_way_of`):
- DIRECT: aligned bytes (buffers.aligned_buffer) go around the page cache with O_DIRECT: no
  copy into the page cache (a fifth of the daemon's CPU in a cold read) and no dirty backlog for
  the next commit's fdatasync, which still makes the new extents durable. The kernel drops any
  cached pages of a range written directly, so later buffered reads see the new bytes.
- PUNCH: a zero chunk becomes a hole (it dirties no page either).
- BUFFERED: anything else through the page cache (a client's write, unaligned bytes, the short
  last chunk), with its writeback started at once (`start_writeback`).

EINVAL from O_DIRECT (on open or on a write; every buffer, offset and length we write direct is
4 KiB-aligned) is taken as a property of the file system under CACHE, not of one write: once
seen, this data file writes buffered for good. Likewise EOPNOTSUPP from hole punching: zeros are
written instead. A refused write is not retried in place: its chunks are stored anew, as
BUFFERED, waiting their turn like any buffered store (the fallback never hides from the
folio-span rule below).

Invariant (the folio-span rule): a buffered write (a client's, or a fill's) never overlaps a
store in flight within one FOLIO_SPAN-aligned span, and a direct store never overlaps a buffered
one there. One page-cache folio can cover both, and a folio dirtied during a direct write keeps
stale bytes of it (the kernel cannot drop a dirty folio after the direct write) and writes them
back later. Two direct stores may overlap (O_DIRECT keeps no folio).

Stores are written in worker threads (pwrite releases the GIL, so the loop keeps serving local
reads while a fill lands); the bookkeeping of stores in flight is touched on the trio thread
only. `store` takes any chunks that have an index and bytes, so a queue of fetched chunks (a
write-behind buffer) can feed it as well as a fill.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import mmap
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from .buffers import ALIGNMENT, is_aligned
from .cache_layout import held_path
from .errors import CacheError, ShortWrite, cache_os_error

if TYPE_CHECKING:  # only the type: the arithmetic is the caller's object's
    from .geometry import ChunkGeometry

log = logging.getLogger(__name__)

# The largest page-cache folio (x86-64 and arm64 with 4 KiB pages: a PMD, 2 MiB): the span of
# the folio-span rule (module docstring).
FOLIO_SPAN = 2 << 20
_READ_SOON_STEP = 128 << 10  # bytes per read-ahead hint (read_soon)
_DIRECT_PAGE_SIZE = 4096  # O_DIRECT fills only where FOLIO_SPAN is known to bound a folio
# Threads writing fills into data files: O_DIRECT writes wait for the disk, so several overlap
_WRITE_LIMITER = trio.CapacityLimiter(4)
# ... of them, those writing stream fills (stores no client waits for): one store at a time,
# which stops between chunks while the cache syncs (a commit: a guest's flush or the periodic
# one). Since fills are stored behind (write_behind.py) the stream no longer waits for its
# stores, and 4 of them at once kept the disk's queue deep: a guest's flush waited behind them
# (bench/flush_latency: p50 16 ms, against 4 ms when each of the 2 stream workers waited for
# its own store; BOOT_RESULTS.md has the figures with this rule).
_STREAM_WRITE_LIMITER = trio.CapacityLimiter(1)

Buffer = bytes | bytearray | memoryview


class Way(enum.Enum):
    """How one chunk of a store reaches the file (module docstring)."""

    DIRECT = "direct"
    PUNCH = "punch"
    BUFFERED = "buffered"


class StreamTurn:
    """A stream store's wait for its turn (`_STREAM_WRITE_LIMITER`, then the syncs waiting).
    `hurry()`: a client write now waits for this store (its chunk's base bytes must be stored
    first), which then goes at once, as a client's store does; else that write waited behind
    every stream store queued before it (at 20 MB/s with the stream's 128 MiB of write-behind
    queued: 3 s for one 4 KiB write)."""

    def __init__(self) -> None:
        self.hurried = False
        self._wait: trio.CancelScope | None = None
        self._ahead: list[StreamTurn] = []  # the stores in flight this one waits for now

    def hurry(self) -> None:
        """Also hurries the stores this one waits for (DataFile._wait_span_quiet): the write
        that hurried it waits for them too, and only for them (no whole queue goes first)."""
        self.hurried = True
        if self._wait is not None:
            self._wait.cancel()
        for ahead in self._ahead:
            if not ahead.hurried:
                ahead.hurry()

    def waits_for(self, ahead: list[StreamTurn]) -> None:
        """This store now waits for the stores of `ahead` (hurried with it, at once if it is)."""
        self._ahead = ahead
        if self.hurried:
            self.hurry()

    async def take(self, after_syncs: Callable[[], Awaitable[None]]) -> bool:
        """Wait for the turn; True if the limiter was taken (release it), False if hurried."""
        taken = False
        try:
            with trio.CancelScope() as self._wait:  # hurry() ends this wait, nothing else
                if not self.hurried:
                    await _STREAM_WRITE_LIMITER.acquire()
                    taken = True
                    await after_syncs()  # a guest's flush goes first (see the limiter)
        except BaseException:  # the store itself is cancelled (the mount stops)
            if taken:
                _STREAM_WRITE_LIMITER.release()
            raise
        finally:
            self._wait = None
        return taken


class ChunkBytes(Protocol):
    """What `DataFile.store` writes: a chunk's index and its verified bytes (None: all zeros)."""

    @property
    def index(self) -> int: ...

    @property
    def data(self) -> Buffer | None: ...


C = TypeVar("C", bound=ChunkBytes)


class _Refused(Exception):
    """The file system refused a way of writing (EINVAL for O_DIRECT, EOPNOTSUPP for a hole)."""

    def __init__(self, way: Way) -> None:
        super().__init__(way.value)
        self.way = way


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_SYNC_FILE_RANGE_WRITE = 2
_libc = None


def _c_library() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        off_t = ctypes.c_longlong
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, off_t, off_t]
        if hasattr(_libc, "sync_file_range"):
            _libc.sync_file_range.argtypes = [ctypes.c_int, off_t, off_t, ctypes.c_uint]
    return _libc


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros without allocating space; _Refused(PUNCH)
    where the file system cannot."""
    if length <= 0:
        return
    mode = _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE
    if _c_library().fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise _Refused(Way.PUNCH)
        raise OSError(err, os.strerror(err))


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a just-written range to disk, without waiting (sync_file_range WRITE).

    Why: a commit's fdatasync (a guest's flush) otherwise has to write back everything the
    stream stored since the last commit; started early, little is left by then
    (bench/flush_latency.py). It may wait for the device queue: call it off the trio thread.
    Best effort: a write error still surfaces at the fdatasync."""
    sync_file_range = getattr(_c_library(), "sync_file_range", None)
    if sync_file_range is not None and length > 0:
        sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class DataFile:
    """The data file of image `name`, chunked as `geometry`, at `path`."""

    def __init__(
        self,
        path: str,
        name: str,
        geometry: ChunkGeometry,
        on_written: Callable[[int], None] = lambda nbytes: None,  # metrics: any thread
        after_syncs: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint,
        sync_pending: Callable[[], bool] = lambda: False,
    ) -> None:
        self.path = path
        self._on_written = on_written
        # Stream stores give way to syncs of the cache (CacheStore): `_after_syncs` returns once
        # none runs; `_sync_pending` (read by the write thread) says one waits or runs.
        self._after_syncs = after_syncs
        self._sync_pending = sync_pending
        self.name = name
        self.geometry = geometry
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise CacheError(f"data file of {name} is missing from the cache") from None
        except OSError as exc:
            raise cache_os_error(exc, f"opening the data file of {name}") from None
        self._direct_fd: int | None = None  # opened on the first direct store
        # The image's modification time as clients see it (their writes, utime): kept as the
        # data file's own, which the kernel also moves at every store (each CacheStore commit
        # sets it back: _Batch.stamps), so that a remount shows it again.
        self.mtime_ns = os.fstat(self.fd).st_mtime_ns
        self.refused: set[Way] = set()  # ways the file system refused: for good (docstring)
        self._storing: dict[int, trio.Event] = {}  # chunks a store is writing right now
        self._storing_turn: dict[int, StreamTurn] = {}  # ... and that store's turn
        self._storing_buffered: set[int] = set()  # ... through the page cache (⊆ _storing)

    def close(self) -> None:
        for fd in (self.fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._direct_fd = None

    # ---- plain I/O -----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:  # the cache disk failing under a reader: EIO, said as such
            raise cache_os_error(exc, f"reading the data file of {self.name}") from None

    def read_soon(self, offset: int, length: int) -> None:
        """Have the kernel start reading these bytes into the page cache, so that `read` of
        them, inline on the event loop, finds them there. The reads are started, not waited
        for; starting them can still block a while (a full device queue, memory reclaim), as
        an inline `read` would. One posix_fadvise(WILLNEED) reads no more than the device's
        read-ahead (128 KiB by default), so a longer range is hinted in pieces (~0.1 ms of CPU
        per MiB)."""
        try:
            for start in range(offset, offset + length, _READ_SOON_STEP):
                step = min(_READ_SOON_STEP, offset + length - start)
                os.posix_fadvise(self.fd, start, step, os.POSIX_FADV_WILLNEED)
        except OSError as exc:  # only a hint: the read itself still works
            log.debug("%s: read-ahead hint refused: %s", self.name, exc)

    def write(self, offset: int, data: Buffer) -> None:
        """A client's write, buffered, inline. It must not overlap a store (folio-span rule):
        the caller first waits for every queued store in the span (StoreQueue.job_in_span)."""
        self._write_all(self.fd, offset, [data])

    def _write_all(self, fd: int, offset: int, pieces: Sequence[Buffer]) -> None:
        """All of `pieces`, back to back from `offset`: CacheFull / CacheError on a failure,
        ShortWrite if the file took only part; _Refused(DIRECT) for EINVAL on a direct fd.
        A short count is not a failure by itself: Linux takes at most 2 GiB - 4 KiB per call
        (MAX_RW_COUNT), so the rest is written by further calls; one that fails or takes
        nothing after some bytes landed is a ShortWrite (the caller's "some bytes changed")."""
        todo = [view for piece in pieces if len(view := memoryview(piece).cast("B"))]
        done = 0
        while todo:
            try:
                written = os.pwritev(fd, todo, offset + done)
            except OSError as exc:
                if fd == self._direct_fd and exc.errno == errno.EINVAL:
                    raise _Refused(Way.DIRECT) from None
                error = cache_os_error(exc, f"writing {self.name}")
                if done:
                    short = f"short write to the data file of {self.name}: {error}"
                    raise ShortWrite(short, error.errno, done) from None
                raise error from None
            self._on_written(written)
            if written <= 0:
                raise ShortWrite(f"short write to the data file of {self.name}", written=done)
            done += written
            while todo and written >= len(todo[0]):
                written -= len(todo.pop(0))
            if written:
                todo[0] = todo[0][written:]

    # ---- stores in flight ----------------------------------------------------------------

    def span(self, chunks: range) -> range:
        """The chunks that share a FOLIO_SPAN-aligned span with `chunks`."""
        per = max(1, FOLIO_SPAN // self.geometry.chunk_size)
        stop = min(self.geometry.chunk_count, -(-chunks.stop // per) * per)
        return range(chunks.start // per * per, stop)

    async def _wait_span_quiet(
        self, chunks: range, stores: Iterable[int], turn: StreamTurn
    ) -> None:
        """Wait until no chunk in the span of `chunks` is in `stores`; the store waiting so
        names its `turn`, which hurries the stores it waits for when hurried."""
        try:
            while busy := [i for i in self.span(chunks) if i in stores]:
                turn.waits_for([self._storing_turn[i] for i in busy])
                await self._storing[busy[0]].wait()
        finally:
            turn.waits_for([])

    def _way_of(self, chunk: ChunkBytes) -> Way:
        """How this chunk will be written; the one place that decides (module docstring)."""
        data = chunk.data
        if data is None:
            return Way.BUFFERED if Way.PUNCH in self.refused else Way.PUNCH
        if (
            mmap.PAGESIZE != _DIRECT_PAGE_SIZE
            or Way.DIRECT in self.refused
            or self.geometry.chunk_start(chunk.index) % ALIGNMENT
            or not is_aligned(data)
        ):
            return Way.BUFFERED
        if self._direct_fd is None:
            try:
                # The open file itself, not its name again (held_path in cache_layout.py)
                self._direct_fd = os.open(
                    held_path(self.fd), os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
                )
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self._refuse(Way.DIRECT)
                return Way.BUFFERED  # or out of descriptors: buffered this time, retry later
        return Way.DIRECT

    def _refuse(self, way: Way) -> None:
        if way not in self.refused:
            self.refused.add(way)
            log.info("%s: the cache's file system refuses %s writes", self.name, way.value)

    async def store(
        self,
        chunks: Sequence[C],
        *,
        wanted: Callable[[int], bool],
        stored: Callable[[list[C]], None],
        coalesce: bool,
        turn: StreamTurn | None = None,
    ) -> None:
        """Write verified chunks (ascending indexes) to the file in a worker thread, keeping the
        folio-span rule, and call `stored` with those written, on the trio thread, before their
        store stops being in flight. `wanted(index)` is asked after the wait for the span and
        before the write with no await between: a chunk it declines (written by a client
        meanwhile) is left alone. With `coalesce` (a client waits), adjacent chunks go out in
        one write: 4 MiB direct writes run at 2.0 GB/s here, 1 MiB ones at 1.4. Stream fills
        go chunk by chunk: a guest's flush queues behind whatever they have at the disk
        (bench/flush_latency: p50 3.8 ms behind 1 MiB writes, 11-17 ms behind 4 MiB ones),
        one store at a time, each waiting its `turn` (StreamTurn) unless hurried."""
        turn = turn or StreamTurn()
        todo = list(chunks)
        while todo:
            ways = {chunk.index: self._way_of(chunk) for chunk in todo}
            buffered = {index for index, way in ways.items() if way is Way.BUFFERED}
            run = range(todo[0].index, todo[-1].index + 1)
            # A buffered store waits for every store in its span, a direct one for buffered ones.
            await self._wait_span_quiet(
                run, self._storing if buffered else self._storing_buffered, turn
            )
            # No await from here until the chunks are registered.
            todo = [chunk for chunk in todo if wanted(chunk.index)]
            in_flight = trio.Event()
            for chunk in todo:
                self._storing[chunk.index] = in_flight
                self._storing_turn[chunk.index] = turn
            buffered.intersection_update(chunk.index for chunk in todo)
            self._storing_buffered.update(buffered)
            try:
                taken = not coalesce and await turn.take(self._after_syncs)
                try:  # hurried before its turn: it goes as a client's store
                    left, refused = await trio.to_thread.run_sync(
                        self._write_chunks, todo, ways, coalesce or not taken,
                        limiter=_WRITE_LIMITER,
                    )
                finally:
                    if taken:
                        _STREAM_WRITE_LIMITER.release()
                if refused is not None:
                    self._refuse(refused)
                stored(todo[: len(todo) - len(left)])
            finally:
                for chunk in todo:
                    del self._storing[chunk.index]
                    del self._storing_turn[chunk.index]
                self._storing_buffered.difference_update(buffered)
                in_flight.set()
            todo = left  # refused: stored anew, as buffered chunks; or after a sync

    def _write_chunks(
        self, chunks: list[C], ways: dict[int, Way], coalesce: bool
    ) -> tuple[list[C], Way | None]:
        """Worker thread: touches the file only, never the bookkeeping. Writes `chunks` in
        order; if the file system refuses a way, stops there and returns the chunks not written
        and the way refused (nothing of a refused write landed). A stream store (not
        `coalesce`) also stops between chunks when a sync of the cache waits: the chunks not
        written come back with no way refused, and are stored after the sync."""
        group: list[C] = []
        for position, chunk in enumerate([*chunks, None]):
            if group and (
                chunk is None
                or not coalesce
                or ways[chunk.index] is not ways[group[0].index]
                or ways[chunk.index] is Way.PUNCH
                or chunk.index != group[-1].index + 1
            ):
                try:
                    self._write_group(group, ways[group[0].index])
                except _Refused as refused:
                    return chunks[position - len(group) :], refused.way
                group = []
                if chunk is not None and not coalesce and self._sync_pending():
                    return chunks[position:], None  # a stream store: the sync goes first
            if chunk is not None:
                group.append(chunk)
        return [], None

    def _write_group(self, group: list[C], way: Way) -> None:
        """Adjacent chunks that take one way, in one call."""
        offset = self.geometry.chunk_start(group[0].index)
        if way is Way.PUNCH:
            length = sum(self.geometry.chunk_length(chunk.index) for chunk in group)
            try:
                _punch_hole(self.fd, offset, length)
            except OSError as exc:
                raise cache_os_error(exc, f"punching {self.name}") from None
            return
        pieces = [
            chunk.data if chunk.data is not None else bytes(self.geometry.chunk_length(chunk.index))
            for chunk in group
        ]
        self._write_run(way, offset, pieces)

    def _write_run(self, way: Way, offset: int, pieces: list[Buffer]) -> None:
        if way is Way.DIRECT:
            assert self._direct_fd is not None  # opened when the way was chosen
            self._write_all(self._direct_fd, offset, pieces)
        else:
            self._write_all(self.fd, offset, pieces)
            _start_writeback(self.fd, offset, sum(len(piece) for piece in pieces))
