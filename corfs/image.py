"""One open image: which chunks are local, filling the missing ones (one fill per chunk however
many readers, writers and stream workers wait), and serving reads and writes of byte ranges.

Invariants:
- A read of local chunks is one `pread` on the data file, inline on the trio thread; a read
  within one chunk that a fill for client reads has just stored is a slice of the bytes the
  fill wrote instead (fresh.py: no copy, and no disk read after an O_DIRECT write).
- One fill per chunk: a chunk being filled is waited for, never fetched twice.
- Base bytes are never written over a chunk that is already local: once its fetch is done, a
  fill stores only the chunks still absent, and while it stores them (an O_DIRECT pwrite in a
  worker thread, a few milliseconds) client writes to those chunks wait; a client write
  `pwrite`s and marks its chunks dirty in one step with no `await` between.
- A buffered write (a client's, or a fill's that cannot go direct) never overlaps a fill's
  store within one store.FOLIO_SPAN-aligned span: one page-cache folio can cover both, and a
  folio dirtied during a direct write would keep stale bytes of it (store.FOLIO_SPAN).
- Fill data is written in worker threads (pwrite releases the GIL), so the loop keeps serving
  local reads while a fill lands.
- A write that covers a chunk only partly makes that chunk local first.
- One bad chunk fails only itself: a fill stores every chunk the fetcher verified even when
  another chunk of its run failed on its own; only waiters for the failed chunk get the error.
  Failing chunks (and why) are kept until they fill, for status.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from .base import BaseImage
from .buffers import aligned_copy
from .digest import Buffer, chunk_digest
from .errors import (
    BaseChanged,
    BaseNotFound,
    CacheFull,
    CorfsError,
    ImageHandedOver,
    OutOfImageError,
    ReadOnlyError,
    ShortWrite,
    chunk_error,
)
from .fetcher import FetchedChunk, Fetcher
from .fresh import FreshChunks
from .geometry import ChunkGeometry, contiguous_runs
from .store import FOLIO_SPAN, CacheStore, ChunkState, ImageRecord

log = logging.getLogger(__name__)

ABSENT = bytes([ChunkState.ABSENT])
MAX_FOREGROUND_RUN = 8  # chunks one foreground miss fetches in one request
READ_AHEAD_MAX = 32  # chunks fetched ahead of a sequential reader
# Threads writing fills into data files: O_DIRECT writes wait for the disk, so several overlap
_WRITE_LIMITER = trio.CapacityLimiter(4)
READ_AHEAD_RUN = 4  # chunks per read-ahead request: small runs land (and unblock) sooner
FRESH_BYTES = 64 << 20  # bytes of stored chunks kept for client reads (fresh.py)


@dataclass
class _Fill:
    """A fill in flight: everyone who needs one of its chunks waits on `done`."""

    done: trio.Event = field(default_factory=trio.Event)
    error: CorfsError | None = None  # the whole fill failed (base down, cache full ...)
    chunk_errors: dict[int, CorfsError] = field(default_factory=dict)  # ... or these chunks
    for_readers: bool = False  # keep the stored bytes in `Image._fresh`: client reads want them
    background: bool = False  # only the stream waits for it

    def error_of(self, index: int) -> CorfsError | None:
        return self.chunk_errors.get(index) or self.error


@dataclass(frozen=True)
class FillOutcome:
    """What one pass of fills left undone: chunk -> why it is still absent, and the failure of
    a whole fill among them if there was one (not attributable to one chunk)."""

    failed: dict[int, CorfsError]
    whole_fill_error: CorfsError | None


@dataclass(frozen=True)
class ImageStatistics:
    name: str
    size: int
    chunk_size: int
    chunk_count: int
    local_chunks: int
    dirty_chunks: int
    local_bytes: int
    fills: int
    fill_errors: int
    failing_chunks: int
    error: str | None
    fill_error: str | None = None  # why the latest failed fill of a chunk still absent failed
    failing_chunk_indexes: tuple[int, ...] = ()  # those chunks, in order
    handed_over_to: str | None = None  # the data file's name after a live handoff


class Image:
    def __init__(
        self,
        record: ImageRecord,
        store: CacheStore,
        fetcher: Fetcher,
        source: BaseImage | None,
        fill_nursery: trio.Nursery,
        *,
        read_only: bool = False,
        mtime_ns: int = 0,
    ) -> None:
        self.name = record.name
        self.record = record
        self.geometry = ChunkGeometry(record.size, record.chunk_size)
        self.store = store
        self.fetcher = fetcher
        self.source = source
        self.read_only = read_only
        self.mtime_ns = mtime_ns
        self._nursery = fill_nursery
        self._states, self.dirty_chunks = store.load_states(record)
        self.local_chunks = self.geometry.chunk_count - self._states.count(ABSENT)
        self._local_bytes = sum(
            self.geometry.chunk_length(i)
            for i in range(self.geometry.chunk_count)
            if self._states[i]
        )
        self._fills: dict[int, _Fill] = {}
        self._storing: dict[int, trio.Event] = {}  # chunks a fill is writing right now
        self._storing_buffered: set[int] = set()  # ... through the page cache
        self._fresh = FreshChunks(FRESH_BYTES)
        self._next_sequential = -1  # the chunk a sequential reader would miss next
        self._read_ahead = 0  # current read-ahead window, in chunks
        self._fd = store.data_fd(self.name)
        self.fills = 0
        self.fill_errors = 0
        self.error: str | None = None  # fatal (base changed): the image serves no more fills
        # chunk -> why its last fill failed, until a fill of it succeeds (shown in status)
        # chunk -> (why, group): group numbers the whole fill that failed (0: the chunk failed
        # on its own), so that a chunk filling heals the others that failed with it
        self._fill_failures: dict[int, tuple[str, int]] = {}
        self._failed_fills = 0
        self.last_foreground = 0.0  # trio clock of the last client read or write
        self.miss_listeners: list[Callable[[int], None]] = []  # told of foreground misses
        self.first_reads: Callable[[range], None] | None = None  # trace recorder hook
        # What fills raise while `source` is None: the base lost the image (this), the base
        # does not answer (BaseUnreachable, until attach_source), or it changed (BaseChanged).
        self.missing_source: CorfsError = BaseNotFound("the base image is gone")
        # Set once a live handoff made the data file DEST (handoff.py): no I/O here any more.
        self.handed_over_to: str | None = None
        self.pages_stale = False  # the kernel's page cache of it may be stale (see above)

    def attach_source(self, source: BaseImage) -> None:
        """The base answers again with this image unchanged (mount.py checked its identity):
        missing chunks fill from it from now on."""
        self.source = source

    # ---- state ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.geometry.image_size

    @property
    def complete(self) -> bool:
        return self.local_chunks == self.geometry.chunk_count

    @property
    def local_bytes(self) -> int:
        return self._local_bytes

    @property
    def fill_error(self) -> str | None:
        """Why the latest failed fill of a chunk still not filled failed, or None."""
        if not self._fill_failures:
            return None
        return next(reversed(self._fill_failures.values()))[0]

    @property
    def failing_chunks(self) -> list[int]:
        """The chunks whose latest fill failed and that are still not local, in order."""
        return sorted(self._fill_failures)

    def _clear_failures(self, index: int) -> None:
        """Chunk `index` is local now: forget its failure, and those of the other chunks of a
        whole fill that failed with it (read-ahead neighbours never re-read)."""
        _, group = self._fill_failures.pop(index)
        if group:
            self._fill_failures = {
                i: failure for i, failure in self._fill_failures.items() if failure[1] != group
            }

    def is_local(self, index: int) -> bool:
        return self._states[index] != ChunkState.ABSENT

    def state_of(self, index: int) -> ChunkState:
        return ChunkState(self._states[index])

    def next_missing(self, start: int) -> int | None:
        """The first absent chunk at or after `start`, or None."""
        found = self._states.find(ABSENT, start)
        return None if found < 0 else found

    def is_filling(self, index: int) -> bool:
        return index in self._fills

    def statistics(self) -> ImageStatistics:
        return ImageStatistics(
            self.name,
            self.size,
            self.geometry.chunk_size,
            self.geometry.chunk_count,
            self.local_chunks,
            self.dirty_chunks,
            self._local_bytes,
            self.fills,
            self.fill_errors,
            len(self._fill_failures),
            self.error,
            fill_error=self.fill_error,
            failing_chunk_indexes=tuple(self.failing_chunks),
            handed_over_to=self.handed_over_to,
        )

    def _set_state(self, index: int, state: ChunkState, digest: bytes | None) -> None:
        self._fresh.drop(index)  # whatever changes a chunk makes the bytes kept for it stale
        old = self._states[index]
        if old == ChunkState.ABSENT and state != ChunkState.ABSENT:
            self.local_chunks += 1
            self._local_bytes += self.geometry.chunk_length(index)
        elif old != ChunkState.ABSENT and state == ChunkState.ABSENT:
            self.local_chunks -= 1
            self._local_bytes -= self.geometry.chunk_length(index)
        if state == ChunkState.DIRTY and old != ChunkState.DIRTY:
            self.dirty_chunks += 1
        elif old == ChunkState.DIRTY and state != ChunkState.DIRTY:
            self.dirty_chunks -= 1
        self._states[index] = state
        if state != ChunkState.ABSENT and index in self._fill_failures:
            self._clear_failures(index)  # filled, or written whole by a client
        self.store.record(self.name, index, state, digest)

    def forget_chunk(self, index: int) -> bool:
        """Mark a clean chunk absent again (it failed a scrub): it will be fetched anew. True
        if it was forgotten: the caller must then drop the kernel's cached pages of the image,
        which may hold the bad bytes (see fuse_ops)."""
        if self._states[index] in (ChunkState.CLEAN, ChunkState.ZERO) and index not in self._fills:
            self._set_state(index, ChunkState.ABSENT, None)
            return True
        return False

    # ---- filling -------------------------------------------------------------------------

    async def wait_local(
        self, indexes: Iterable[int], *, background: bool = False, reading: bool = False
    ) -> None:
        """Return once every chunk of `indexes` is local, filling the missing ones (sharing
        fills already in flight). Raises the fill's error (EIO, ESTALE, ENOSPC ...).
        `reading`: a client read waits, keep the stored bytes for it (`_fresh`)."""
        wanted = list(indexes)
        while missing := [i for i in wanted if self._states[i] == ChunkState.ABSENT]:
            outcome = await self._fill_once(
                missing, background=background, reading=reading, first_error=True
            )
            for error in outcome.failed.values():
                raise chunk_error(error)

    async def fill_each(self, indexes: Iterable[int]) -> FillOutcome:
        """The stream's fill: one pass over the absent chunks of `indexes` in the background,
        reporting what failed chunk by chunk instead of raising."""
        missing = [i for i in indexes if self._states[i] == ChunkState.ABSENT]
        return await self._fill_once(missing, background=True, reading=False, first_error=False)

    async def _fill_once(
        self, missing: list[int], *, background: bool, reading: bool, first_error: bool
    ) -> FillOutcome:
        """Start fills of the `missing` chunks not in flight yet and wait for every fill they
        are in (with `first_error`, only until one of them fails)."""
        limit = len(missing) if background else MAX_FOREGROUND_RUN
        self._start_fills(
            [i for i in missing if i not in self._fills], limit, background=background
        )
        owners = {i: self._fills[i] for i in missing if i in self._fills}
        fills = list({id(f): f for f in owners.values()}.values())
        for fill in fills:
            fill.for_readers |= reading
            fill.background &= background
        failed: dict[int, CorfsError] = {}
        whole_fill_error = None
        for fill in fills:
            await fill.done.wait()
            for index, owner in owners.items():
                if owner is fill and (error := fill.error_of(index)) is not None:
                    failed[index] = error
            whole_fill_error = whole_fill_error or fill.error
            if failed and first_error:
                break
        return FillOutcome(failed, whole_fill_error)

    def _start_fills(
        self, indexes: list[int], limit: int, *, for_readers: bool = False, background: bool = False
    ) -> None:
        """Start fills of `indexes` (none in flight yet), at most `limit` chunks per request."""
        limit = max(1, limit)
        for run in contiguous_runs(indexes):
            for start in range(run.start, run.stop, limit):
                piece = range(start, min(start + limit, run.stop))
                fill = _Fill(for_readers=for_readers, background=background)
                for index in piece:
                    self._fills[index] = fill
                self._nursery.start_soon(self._fill, piece, fill)

    async def _fill(self, run: range, fill: _Fill) -> None:
        try:
            if self.source is None:
                missing = self.missing_source
                raise type(missing)(f"{self.name}: chunk {run.start} is not local and {missing}")
            fetched = await self.fetcher.fetch_chunks(
                self.source, self.geometry, run, self._local_copy
            )
            fill.chunk_errors = dict(fetched.failed)
            for index, exc in fetched.failed.items():
                self.fill_errors += 1
                self._fill_failures[index] = (str(exc), 0)
                log.error("filling %s chunk %d: %s", self.name, index, exc)
            keep = fill.for_readers or self._ahead_of_reader(run)
            await self._store_fetched(fetched.chunks, keep=keep, background=fill.background)
            self.fills += 1
        except BaseChanged as exc:
            self.error = f"base image changed: {exc}"
            fill.error = exc
            log.error("%s", exc)
        except CorfsError as exc:
            self.fill_errors += 1
            self._failed_fills += 1
            self._fill_failures.update(dict.fromkeys(run, (str(exc), self._failed_fills)))
            fill.error = exc
            log.error("filling %s chunks %d-%d: %s", self.name, run.start, run.stop - 1, exc)
        except Exception as exc:  # a bug must fail this read, not the daemon
            self.fill_errors += 1
            fill.error = CorfsError(f"internal error filling {self.name}: {exc!r}")
            log.exception("filling %s chunks %d-%d", self.name, run.start, run.stop - 1)
        finally:
            for index in run:
                if self._fills.get(index) is fill:
                    del self._fills[index]
            fill.done.set()

    async def _store_fetched(
        self, chunks: list[FetchedChunk], *, keep: bool = False, background: bool = False
    ) -> None:
        """Write verified chunks to the data file, then mark them local (module invariants);
        `keep` their bytes in `_fresh` for client reads."""
        if not chunks:
            return
        run = range(chunks[0].index, chunks[-1].index + 1)
        buffered = {
            c.index
            for c in chunks
            if not self.store.writes_direct(self.name, self.geometry.chunk_start(c.index), c.data)
        }
        # A buffered store waits for every store in its span, a direct one for buffered ones.
        await self._wait_span_quiet(run, self._storing if buffered else self._storing_buffered)
        todo = [c for c in chunks if self._states[c.index] == ChunkState.ABSENT]
        storing = trio.Event()
        for chunk in todo:
            self._storing[chunk.index] = storing
        buffered.intersection_update(c.index for c in todo)  # _storing_buffered ⊆ _storing
        self._storing_buffered.update(buffered)
        try:
            await trio.to_thread.run_sync(
                self._write_chunks, todo, not background, limiter=_WRITE_LIMITER
            )
            for chunk in todo:
                state = ChunkState.ZERO if chunk.data is None else ChunkState.CLEAN
                self._set_state(chunk.index, state, chunk.digest)
                if keep and chunk.data is not None:
                    self._fresh.keep(chunk.index, chunk.data)
        finally:
            for chunk in todo:
                del self._storing[chunk.index]
            self._storing_buffered.difference_update(buffered)
            storing.set()

    def _span(self, chunks: range) -> range:
        """The chunks that share a FOLIO_SPAN-aligned span with `chunks`."""
        per = max(1, FOLIO_SPAN // self.geometry.chunk_size)
        stop = min(self.geometry.chunk_count, -(-chunks.stop // per) * per)
        return range(chunks.start // per * per, stop)

    async def _wait_span_quiet(self, chunks: range, stores: Iterable[int]) -> None:
        """Wait until no chunk in the span of `chunks` is in `stores` (chunks being stored)."""
        while busy := [self._storing[i] for i in self._span(chunks) if i in stores]:
            await busy[0].wait()

    def _write_chunks(self, chunks: list[FetchedChunk], coalesce: bool) -> None:
        """Worker thread: touches the data file only, never the chunk state. Zero chunks are
        punched. With `coalesce` (a client waits), adjacent chunks go out in one write: 4 MiB
        direct writes run at 2.0 GB/s here, 1 MiB ones at 1.4. Stream fills go chunk by chunk:
        a guest's flush queues behind whatever they have at the disk (bench/flush_latency:
        p50 3.8 ms behind 1 MiB writes, 11-17 ms behind 4 MiB ones)."""
        run: list[FetchedChunk] = []
        for chunk in [*chunks, None]:
            if run and (
                chunk is None
                or chunk.data is None
                or chunk.index != run[-1].index + 1
                or not coalesce
            ):
                pieces = [c.data for c in run if c.data is not None]
                self.store.write_fill(self.name, self.geometry.chunk_start(run[0].index), pieces)
                run = []
            if chunk is None:
                break
            if chunk.data is None:
                start = self.geometry.chunk_start(chunk.index)
                self.store.punch(self.name, start, self.geometry.chunk_length(chunk.index))
            else:
                run.append(chunk)

    def _ahead_of_reader(self, run: range) -> bool:
        """A sequential reader will soon read these chunks (a stream fill that landed in its
        read-ahead window): worth keeping their bytes for it."""
        start = self._next_sequential
        return self._read_ahead > 0 and start <= run.start < start + 2 * READ_AHEAD_MAX

    def _read_fresh(self, chunks: range, offset: int, length: int) -> Buffer | None:
        """The bytes of a read within one kept chunk, as a slice (no copy), or None."""
        if len(chunks) != 1 or (data := self._fresh.get(chunks.start)) is None:
            return None
        lo = offset - self.geometry.chunk_start(chunks.start)
        if lo + length == len(data):
            self._fresh.drop(chunks.start)  # read to its end: a sequential reader is done
        return data[lo : lo + length]

    def _local_copy(self, digest: bytes) -> Buffer | None:
        """Verified bytes of a committed clean chunk with this digest, from any image here."""
        found = self.store.find_by_digest(digest)
        if found is None:
            return None
        name, index = found
        record = self.store.record_of(name)
        if record is None:
            return None
        geometry = ChunkGeometry(record.size, record.chunk_size)
        try:
            data = os.pread(
                self.store.data_fd(name), geometry.chunk_length(index), geometry.chunk_start(index)
            )
        except (OSError, CorfsError):
            return None
        # Copied to an aligned buffer so that it, too, is stored with O_DIRECT (FOLIO_SPAN).
        return aligned_copy(data) if chunk_digest(data) == digest else None

    # ---- client I/O ----------------------------------------------------------------------

    def mark_written_outside(self) -> None:
        """QEMU may have written to the data file directly (a live handoff rolled back after
        its switch began): every local chunk becomes dirty (never refetched, verified or
        deduplicated from), and the kernel's cached pages of the image must go
        (`pages_stale`, dropped by fuse_ops)."""
        for index in range(self.geometry.chunk_count):
            if self._states[index] != ChunkState.ABSENT:
                self._set_state(index, ChunkState.DIRTY, None)
        self.store.touch(self.name)
        self.pages_stale = True

    def check_served(self) -> None:
        if self.handed_over_to is not None:
            raise ImageHandedOver(
                f"{self.name} was handed over to QEMU as {self.handed_over_to}: "
                "corfs no longer serves it"
            )

    async def read(self, offset: int, length: int) -> Buffer:
        self.check_served()
        length = self.geometry.clip(offset, length)
        if length <= 0:
            return b""
        self.last_foreground = trio.current_time()
        chunks = self.geometry.chunks_of(offset, length)
        if self.first_reads is not None:
            self.first_reads(chunks)
        if not self.complete and self.source is not None and self.error is None:
            self._read_ahead_after(chunks)
        if self._states.find(ABSENT, chunks.start, chunks.stop) >= 0:
            for listener in self.miss_listeners:
                listener(chunks.stop - 1)
            try:
                await self.wait_local(chunks, reading=True)
            except CacheFull:
                log.warning("%s: cache disk full, serving a read without caching it", self.name)
                return await self._read_uncached(offset, length)
        if self._fresh and (fresh := self._read_fresh(chunks, offset, length)) is not None:
            return fresh
        return os.pread(self._fd, length, offset)

    def _read_ahead_after(self, chunks: range) -> None:
        """A reader whose read starts where its last one ended is sequential: fetch the chunks
        after it ahead of time, in a window that doubles up to READ_AHEAD_MAX; a random read
        resets the window, so random readers fetch no more than they read. Reads of local
        chunks count too, so the window keeps moving while the reader is served from it.
        New fetches go out READ_AHEAD_RUN chunks at a time (larger requests and writes cost
        less per byte) unless the reader's next chunk is not on its way yet."""
        if chunks.start == self._next_sequential - 1 and chunks.stop == self._next_sequential:
            return  # another read in the same chunk (a concurrent reader, or the rest of it)
        if chunks.start == self._next_sequential:
            self._read_ahead = min(READ_AHEAD_MAX, max(2, self._read_ahead * 2))
        else:
            self._read_ahead = 0
        self._next_sequential = chunks.stop
        if not self._read_ahead:
            return
        stop = min(self.geometry.chunk_count, chunks.stop + self._read_ahead)
        ahead = [
            i
            for i in range(chunks.stop, stop)
            if self._states[i] == ChunkState.ABSENT and i not in self._fills
        ]
        if len(ahead) >= READ_AHEAD_RUN or (ahead and ahead[0] == chunks.stop) or (
            ahead and stop == self.geometry.chunk_count
        ):
            self._start_fills(ahead, READ_AHEAD_RUN, for_readers=True)

    async def _read_uncached(self, offset: int, length: int) -> bytes:
        assert self.source is not None
        parts = []
        for index in self.geometry.chunks_of(offset, length):
            start = self.geometry.chunk_start(index)
            if self.is_local(index):
                data = os.pread(self._fd, self.geometry.chunk_length(index), start)
            else:
                fetched = await self.fetcher.fetch_chunks(
                    self.source, self.geometry, range(index, index + 1)
                )
                for error in fetched.failed.values():
                    raise chunk_error(error)
                data = fetched.chunks[0].data or bytes(self.geometry.chunk_length(index))
            lo = max(offset, start) - start
            hi = min(offset + length, start + len(data)) - start
            parts.append(data[lo:hi])
        return b"".join(parts)

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        self.check_served()
        if self.read_only:
            raise ReadOnlyError(f"{self.name} is mounted read-only")
        if offset + len(data) > self.size:
            raise OutOfImageError(f"write past the end of {self.name} ({self.size} bytes)")
        if not data:
            return 0
        self.last_foreground = trio.current_time()
        touched = self.geometry.chunks_of(offset, len(data))
        partial = self.geometry.partly_covered(offset, len(data))
        while True:
            if any(self._states[i] == ChunkState.ABSENT for i in partial):
                await self.wait_local(partial)
            elif any(i in self._storing for i in self._span(touched)):
                # A fill is storing there (base bytes into these chunks, or a direct write that
                # may share a page-cache folio with them): let it finish first.
                await self._wait_span_quiet(touched, self._storing)
            else:
                break
        # No await from here on: the write and the dirty marks are one atomic step.
        for index in touched:
            self._fresh.drop(index)  # even if the write fails half-way
        # The next commit syncs the data file even when every chunk was dirty already (no new
        # mark): an fsync must never succeed with this write in the page cache only.
        self.store.touch(self.name)
        try:
            self.store.write_data(self.name, offset, data)
        except ShortWrite:
            self._mark_dirty(touched)  # some bytes changed: no longer equal to the base
            raise
        self._mark_dirty(touched)
        self.mtime_ns = time.time_ns()
        return len(data)

    def _mark_dirty(self, chunks: range) -> None:
        for index in chunks:
            if self._states[index] != ChunkState.DIRTY:
                self._set_state(index, ChunkState.DIRTY, None)

    async def fsync(self) -> None:
        self.check_served()
        await self.store.commit()
