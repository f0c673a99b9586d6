"""One open image: which chunks are local, filling the missing ones (one fill per chunk however
many readers, writers and stream workers wait), and serving reads and writes of byte ranges.

Invariants:
- A read of local chunks is one `pread` on the data file, inline on the trio thread; a read of
  a chunk whose verified bytes are in memory (held by the fill it waited for, queued to be
  stored, or kept in fresh.py) is a slice of them instead (no copy, no disk read).
- A reader never waits for the cache disk: a fill answers its waiters once its chunks are
  verified, then queues them to be stored behind (store_queue.py; write_behind.py: the budget,
  back-pressure on the stream, chunks dropped rather than stored when a reader's fill finds no
  room). A queued chunk is recorded local only once stored, like any fill (never mark before
  durable); until then it stays absent, on its way (`is_filling`), and is not fetched again.
- One fill per chunk: a chunk being filled (or queued) is waited for, never fetched twice at
  once (a chunk dropped for want of room is fetched again later, by the stream or a reader).
- Base bytes are never written over a chunk that is already local: once its fetch is done, a
  fill stores only the chunks still absent (DataFile.store asks, with no await before it
  registers them), and while it stores them client writes in their folio span wait
  (datafile.py's folio-span rule); a client write `pwrite`s and marks its chunks dirty in one
  step with no `await` between.
- Never change bytes the database may call clean: before a write to a chunk whose clean (or
  zero) mark may be committed, its dirty mark is committed (dirty_first.py).
- A write that covers a chunk only partly makes that chunk local first (its fill is stored,
  never dropped). A write whose folio span holds chunks queued to be stored waits for their
  store: base bytes never land after it, and no store is in flight beside it.
- A read that arrives while client writes of its bytes are in flight is answered after them
  (writes_in_flight.py): the kernel keeps what a read gets.
- Once the base changed under an image (`error`), it starts no more fills: local chunks are
  served, missing ones fail with ESTALE.
- One bad chunk fails only itself: a fill stores every chunk the fetcher verified even when
  another chunk of its run failed on its own; only waiters for the failed chunk get the error.
  Failing chunks (and why) are kept until they fill, for status.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import trio

from .base import BaseImage
from .chunk_table import ChunkTable
from .config import DEFAULT_RANDOM_RANGE
from .datafile import DataFile
from .digest import Buffer
from .dirty_first import DirtyFirst
from .errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseNotFound,
    CacheError,
    CorfsError,
    HandoffUnderWay,
    ImageHandedOver,
    OutOfImageError,
    ReadOnlyError,
    ShortWrite,
    cache_os_error,
    chunk_error,
    internal_error,
)
from .failing import FailingChunks
from .fetcher import FetchedChunk, Fetcher
from .fill import Fill, FillOutcome
from .fresh import FreshChunks
from .geometry import contiguous_runs
from .ranges import SMALL_READ, RangeCache
from .read_ahead import READ_AHEAD_RUN, ReadAhead
from .read_memory import ReadMemory
from .stats import ImageStatistics
from .store import CacheStore, ChunkState, ImageRecord
from .store_queue import StoreQueue
from .write_behind import WriteBehind
from .writes_in_flight import WritesInFlight

log = logging.getLogger(__name__)

MAX_FOREGROUND_RUN = 8  # chunks one foreground miss fetches in one request
FRESH_BYTES = 64 << 20  # bytes of stored chunks kept for client reads (fresh.py)
# Bytes of local chunks read from the cache file ahead of a sequential reader (the read-ahead
# window counts chunks: 32 chunks of 64 MiB would be 2 GiB of page cache, hinted on the loop).
LOCAL_AHEAD_BYTES = 32 << 20


def _never(_index: int) -> bool:
    return False


class _FileRange(NamedTuple):
    """A piece of a read served from the data file."""

    offset: int
    length: int


class Image:
    """`fill_nursery` is the mount's: a fill outlives the request that started it. Other
    readers, writers and the stream share it, a read-ahead fill has no waiter at all, and a
    client request that is interrupted (its task cancelled) must not cancel the fill the others
    wait on. `first_reads` is told of every client read (the trace recorder, trace.py)."""

    def __init__(
        self,
        record: ImageRecord,
        store: CacheStore,
        fetcher: Fetcher,
        source: BaseImage | None,
        fill_nursery: trio.Nursery,
        *,
        read_only: bool = False,
        first_reads: Callable[[range], None] | None = None,
        write_behind: WriteBehind | None = None,
        random_range: int = DEFAULT_RANDOM_RANGE,
        read_memory: ReadMemory | None = None,
    ) -> None:
        self.name = record.name
        self.record = record
        self.geometry = record.geometry
        self.store = store
        self.fetcher = fetcher
        self.source = source
        self.read_only = read_only
        self._nursery = fill_nursery
        self._chunks = ChunkTable(self.geometry, store.load_states(record, track=True)[0])
        self._fills: dict[int, Fill] = {}
        self.write_behind = write_behind if write_behind is not None else WriteBehind()
        # Bounded alone and, with the other images' of the mount, by `read_memory`
        kept = read_memory.kept if read_memory is not None else None
        self._fresh = FreshChunks(FRESH_BYTES, kept)
        self._ranges = RangeCache(block=random_range, shared=kept)  # random readers (ranges.py)
        self._writes_in_flight = WritesInFlight()  # a read waits for earlier writes to its bytes
        self.read_ahead = ReadAhead(
            self.geometry.chunk_count, FRESH_BYTES // self.geometry.chunk_size,
            chunk_size=self.geometry.chunk_size,
            share=read_memory.read_ahead if read_memory is not None else None,
        )
        self._local_ahead_chunks = max(1, LOCAL_AHEAD_BYTES // self.geometry.chunk_size)
        self.data: DataFile = store.data_file(self.name)
        self._forget_past_end()
        self._dirty_first = DirtyFirst(self.name, store, self._chunks, self._set_state)
        # fetched, verified, waiting to be stored (store_queue.py)
        self._queue = StoreQueue(
            self.name, self.data, fill_nursery,
            is_absent=self._chunks.is_absent, on_stored=self._stored, on_failed=self._not_stored,
            refused=lambda: store.sync_failure,
        )
        self.fills = 0
        self.fill_errors = 0
        self.error: str | None = None  # fatal (base changed): no more fills (see invariants)
        self._failing = FailingChunks(self._chunks.is_absent)  # shown in status (failing.py)
        # Chunks whose client writes a failed sync of the cache lost (forget_unsynced)
        self._lost_writes: set[int] = set()
        self.last_foreground = 0.0  # trio clock of the last client read or write
        self._first_reads = first_reads
        # What fills raise while `source` is None: the base lost the image (this), the base
        # does not answer (BaseUnreachable, until attach_source), or it changed (BaseChanged).
        self.missing_source: CorfsError = BaseNotFound("the base image is gone")
        # Set once a live handoff made the data file DEST (handoff.py): no I/O here any more.
        self.handed_over_to: str | None = None
        self.handing_over = False  # a live handoff is under way (handoff.py): no forget now
        self.switching_qemu = False  # ... and QEMU is being re-pointed: an unmount waits
        self.stopping = False  # the mount is stopping (a signal): no QEMU switch starts now
        self.pages_stale = False  # the kernel's page cache of it may be stale (see above)

    def _forget_past_end(self) -> None:
        """A data file shorter than the image (cut short by a damaged file system or a copy)
        would answer reads of its chunks past the end short. Clean and zero ones there are
        forgotten, durably, before the file gets its size back (else a crash between could
        leave them recorded local over zeros); CacheError if a dirty one is (its bytes are
        gone: the mount leaves the image out, its cache as it is)."""
        try:
            end = os.fstat(self.data.fd).st_size
        except OSError as exc:
            raise cache_os_error(exc, f"reading the size of {self.name}'s data file") from None
        if end >= self.size:
            return
        lost = [i for i in range(end // self.geometry.chunk_size, self.geometry.chunk_count)
                if self.is_local(i)]
        if any(self.state_of(i) == ChunkState.DIRTY for i in lost):
            raise CacheError(
                f"the data file of {self.name} is cut short ({end} of {self.size} bytes): "
                "chunks written through the mount are lost"
            )
        log.warning("%s: its data file is cut short (%d of %d bytes): fetching %d chunks again",
                    self.name, end, self.size, len(lost))
        for index in lost:
            self._set_state(index, ChunkState.ABSENT, None)
        self.store.commit_sync()
        try:
            os.truncate(self.data.path, self.size)
        except OSError as exc:
            raise cache_os_error(exc, f"extending the data file of {self.name}") from None

    def attach_source(self, source: BaseImage) -> None:
        """The base answers again with this image unchanged (base_images.py checked its identity):
        missing chunks fill from it from now on."""
        self.source = source

    # ---- state ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.geometry.image_size

    @property
    def complete(self) -> bool:
        return self._chunks.complete

    @property
    def local_chunks(self) -> int:
        return self._chunks.local_chunks

    @property
    def dirty_chunks(self) -> int:
        return self._chunks.dirty_chunks

    @property
    def local_bytes(self) -> int:
        return self._chunks.local_bytes

    @property
    def fill_error(self) -> str | None:
        """Why the latest failed fill of a chunk still not filled failed, or None."""
        return self._failing.latest

    @property
    def failing_chunks(self) -> list[int]:
        """The chunks whose latest fill failed and that are still not local, in order."""
        return self._failing.indexes()

    def is_local(self, index: int) -> bool:
        return not self._chunks.is_absent(index)

    def state_of(self, index: int) -> ChunkState:
        return self._chunks.state_of(index)

    def next_missing(self, start: int) -> int | None:
        """The first absent chunk at or after `start`, or None."""
        return self._chunks.next_absent(start)

    def is_filling(self, index: int) -> bool:
        """Whether the chunk is on its way to local: being fetched, or queued to be stored."""
        return index in self._fills or index in self._queue

    @property
    def storing(self) -> bool:
        """Whether fetched chunks of this image wait to be stored (write_behind.py)."""
        return bool(self._queue)

    async def wait_stored(self) -> None:
        """Until no fetched chunk of this image waits to be stored (write_behind.py)."""
        await self._queue.wait_empty()

    def statistics(self) -> ImageStatistics:
        return ImageStatistics(
            self.name,
            self.size,
            self.geometry.chunk_size,
            self.geometry.chunk_count,
            self.local_chunks,
            self.dirty_chunks,
            self.local_bytes,
            self.fills,
            self.fill_errors,
            len(self._failing),
            self.error,
            fill_error=self.fill_error,
            failing_chunk_indexes=tuple(self.failing_chunks),
            handed_over_to=self.handed_over_to,
        )

    def _set_state(self, index: int, state: ChunkState, digest: bytes | None) -> None:
        self._fresh.drop(index)  # whatever changes a chunk makes the bytes kept for it stale
        self._ranges.drop_range(self.geometry.chunk_start(index), self.geometry.chunk_length(index))
        self._chunks.set(index, state)
        if state != ChunkState.ABSENT:
            self._failing.healed(index)  # filled, or written whole by a client
        self.store.record(self.name, index, state, digest)

    def forget_chunk(self, index: int) -> bool:
        """Mark a clean chunk absent again (it failed a scrub): it will be fetched anew. True
        if it was forgotten: the caller must then drop the kernel's cached pages of the image,
        which may hold the bad bytes (see fuse_ops). Refused once the image is being or has
        been handed over: a refill would write base bytes into the file QEMU now owns."""
        self.check_served()
        if self.handing_over:
            raise HandoffUnderWay(f"{self.name}: a live handoff is under way; forget after it")
        if self.state_of(index) in (ChunkState.CLEAN, ChunkState.ZERO) and index not in self._fills:
            self._set_state(index, ChunkState.ABSENT, None)
            return True
        return False

    # ---- filling -------------------------------------------------------------------------

    def _needs_fill(self, index: int, *, reading: bool, held: dict[int, Buffer | None]) -> bool:
        """Whether chunk `index` is neither local nor queued to be stored, nor (for a `reading`
        client) in memory: `held` by the fills it waited for, or kept in `_fresh`."""
        return (
            self._chunks.is_absent(index)
            and index not in self._queue
            and not (reading and (index in held or index in self._fresh))
        )

    async def wait_local(
        self,
        indexes: Iterable[int],
        *,
        background: bool = False,
        reading: bool = False,
        writing: bool = False,
    ) -> dict[int, Buffer | None]:
        """Return once every chunk of `indexes` is local or queued to be stored (or, for a
        `reading` client, its verified bytes are in memory), filling the missing ones (sharing
        fills already in flight). Raises the fill's error (EIO, ESTALE ...). Returns the bytes
        the fills held for a reader whose chunks were not stored (write_behind.py), valid while
        those chunks stay absent. `writing`: a client write waits, its fills are stored."""
        wanted = list(indexes)
        held: dict[int, Buffer | None] = {}
        while True:
            self._refuse_lost_writes(wanted)  # a sync may have failed during the last pass
            missing = [i for i in wanted if self._needs_fill(i, reading=reading, held=held)]
            if not missing:
                break
            if writing and self.store.sync_failure is not None:  # a fill is no longer stored:
                raise CacheError(self.store.sync_failure)  # a write's would be fetched again
            outcome = await self._fill_once(
                missing, background=background, reading=reading, writing=writing,
                first_error=True,
            )
            held.update(outcome.held)
            for index, error in outcome.failed.items():
                # Not if a client wrote the chunk whole while its fill failed: it is local now.
                if self._needs_fill(index, reading=reading, held=held):
                    raise chunk_error(error)
        return held

    async def fill_each(self, indexes: Iterable[int]) -> FillOutcome:
        """The stream's fill: one pass over the absent chunks of `indexes` in the background,
        reporting what failed chunk by chunk instead of raising."""
        if self.store.sync_failure is not None:  # a fill would be fetched, then not stored
            return FillOutcome({}, CacheError(self.store.sync_failure))
        missing = [i for i in indexes if self._needs_fill(i, reading=False, held={})]
        return await self._fill_once(missing, background=True, reading=False, first_error=False)

    async def _fill_once(
        self,
        missing: list[int],
        *,
        background: bool,
        reading: bool,
        first_error: bool,
        writing: bool = False,
    ) -> FillOutcome:
        """Start fills of the `missing` chunks not in flight yet and wait for every fill they
        are in (with `first_error`, only until one of them fails)."""
        limit = len(missing) if background else MAX_FOREGROUND_RUN
        self._start_fills(
            [i for i in missing if i not in self._fills], limit, background=background
        )
        owners = {i: self._fills[i] for i in missing if i in self._fills}
        fills = list({id(f): f for f in owners.values()}.values())
        for fill in fills:  # new and shared alike, before the first await (Fill.share)
            fill.share(reading=reading, background=background, writing=writing)
        failed: dict[int, CorfsError] = {}
        held: dict[int, Buffer | None] = {}
        whole_fill_error = None
        for fill in fills:
            await fill.done.wait()
            for index, owner in owners.items():
                if owner is fill and (error := fill.error_of(index)) is not None:
                    failed[index] = error
                elif owner is fill and index in fill.held:
                    held[index] = fill.held[index]
            whole_fill_error = whole_fill_error or fill.error
            if failed and first_error:
                break
        return FillOutcome(failed, whole_fill_error, held)

    def _start_fills(
        self, indexes: list[int], limit: int, *, for_readers: bool = False, background: bool = False
    ) -> None:
        """Start fills of `indexes` (none in flight yet), at most `limit` chunks per request."""
        limit = max(1, limit)
        for run in contiguous_runs(indexes):
            for start in range(run.start, run.stop, limit):
                piece = range(start, min(start + limit, run.stop))
                fill = Fill(for_readers=for_readers, background=background)
                for index in piece:
                    self._fills[index] = fill
                self._nursery.start_soon(self._fill, piece, fill)

    async def _fill(self, run: range, fill: Fill) -> None:
        room = 0  # write-behind room this fill holds and has not queued bytes in yet
        try:
            self.check_served()  # its data file is QEMU's now: never store base bytes there
            if self.error is not None:
                raise BaseChanged(f"{self.name}: chunk {run.start} is not local and {self.error}")
            if self.source is None:
                missing = self.missing_source
                raise type(missing)(f"{self.name}: chunk {run.start} is not local and {missing}")
            if fill.background:  # the stream waits for room before it fetches (back-pressure)
                wanted = sum(self.geometry.chunk_length(i) for i in run)
                with trio.CancelScope() as fill.room_wait:  # cancelled if a client joins
                    await self.write_behind.wait_room(wanted)
                    room = wanted
                fill.room_wait = None
            fetched = await self.fetcher.fetch_chunks(
                self.source, self.geometry, run, self.store.read_by_digest, fill.ticket
            )
            fill.chunk_errors = dict(fetched.failed)
            for index, exc in fetched.failed.items():
                self.fill_errors += 1
                self._failing.record([index], str(exc))
                log.error("filling %s chunk %d: %s", self.name, index, exc)
            room = self._queue_fetched(fetched.chunks, fill, run, room)
            self.fills += 1
        except BaseChanged as exc:
            if self.error is None:
                self.error = f"base image changed: {exc}"
            fill.error = exc
            log.error("%s", exc)
        except CorfsError as exc:
            self.fill_errors += 1
            self._failing.record(run, str(exc), whole_fill=True)
            fill.error = exc
            # Said by who waits for it (a reader's request, the stream's failure log): a line
            # here too was one per failed fill through a whole outage.
            log.debug("filling %s chunks %d-%d: %s", self.name, run.start, run.stop - 1, exc)
        except Exception as exc:  # a bug must fail this read, not the daemon
            self.fill_errors += 1
            fill.error = internal_error(exc, f"filling {self.name}")
            log.exception("filling %s chunks %d-%d", self.name, run.start, run.stop - 1)
        finally:
            self.write_behind.release(room)
            for index in run:
                if self._fills.get(index) is fill:
                    del self._fills[index]
            fill.done.set()

    def _queue_fetched(self, chunks: list[FetchedChunk], fill: Fill, run: range, room: int) -> int:
        """Hand a fill's verified chunks to its waiters (`fill.held`) and queue them to be
        stored behind them, within the write-behind budget (write_behind.py: a fill only
        readers wait for and that finds no room is dropped instead); the room left unused."""
        chunks = [chunk for chunk in chunks if self._chunks.is_absent(chunk.index)]
        fill.held = {chunk.index: chunk.data for chunk in chunks}
        nbytes = sum(len(chunk.data) for chunk in chunks if chunk.data is not None)
        if room >= nbytes:
            room -= nbytes
        elif self.write_behind.take_nowait(
            nbytes - room, overdraw=fill.for_writers or fill.background
        ):
            room = 0
        else:  # no room: zero chunks (holes, no bytes held) are stored, the others dropped
            dropped = [chunk for chunk in chunks if chunk.data is not None]
            self.write_behind.dropped(len(dropped))
            for chunk in dropped:
                self._fresh.keep(chunk.index, chunk.data, only_copy=True)  # type: ignore[arg-type]
            chunks = [chunk for chunk in chunks if chunk.data is None]
            nbytes = 0
        if chunks:
            for chunk in chunks:
                self._failing.healed(chunk.index)  # on its way: no longer failing
            keep = fill.for_readers or self.read_ahead.ahead_of_reader(run)
            self._queue.add(
                chunks, self.write_behind, nbytes, keep=keep, background=fill.background
            )
        return room

    def _stored(self, chunk: FetchedChunk, keep: bool) -> None:
        """A queued chunk is on disk: record it local (store_queue.py), its bytes kept for the
        readers not done with them (`keep`)."""
        state = ChunkState.ZERO if chunk.data is None else ChunkState.CLEAN
        self._set_state(chunk.index, state, chunk.digest)
        if keep and chunk.data is not None:
            self._fresh.keep(chunk.index, chunk.data)

    def _not_stored(self, indexes: list[int], error: CorfsError) -> None:
        """A store failed: these chunks stay absent, failing (status) until a fill of them."""
        self.fill_errors += 1
        self._failing.record(indexes, str(error))

    def _memory_of(self, index: int, held: dict[int, Buffer | None]) -> tuple[bool, Buffer | None]:
        """The verified bytes of an absent chunk that are in memory (held for this read, queued
        to be stored, or kept): (True, bytes or None for zeros), or (False, None)."""
        if not self._chunks.is_absent(index):
            return False, self._fresh.get(index)
        if index in held:
            return True, held[index]
        if (queued := self._queue.get(index)) is not None:
            return True, queued.chunk.data
        data = self._fresh.get(index)
        return data is not None, data

    def _serve(
        self, chunks: range, offset: int, length: int, held: dict[int, Buffer | None]
    ) -> Buffer:
        """The bytes of a read whose chunks are local or in memory (`_memory_of`): a slice of
        a chunk's bytes when the read is within one (no copy), else pieces joined."""
        pieces: list[Buffer | _FileRange] = []
        end = offset + length
        for index in chunks:
            start = self.geometry.chunk_start(index)
            lo, hi = max(offset, start), min(end, start + self.geometry.chunk_length(index))
            in_memory, data = self._memory_of(index, held)
            if data is not None:
                if hi - start == len(data):  # read to its end: a sequential reader is done
                    self._fresh.drop(index)
                    if (queued := self._queue.get(index)) is not None:
                        queued.read_to_end = True
                pieces.append(data[lo - start : hi - start])
            elif in_memory:
                pieces.append(bytes(hi - lo))
            elif pieces and isinstance(pieces[-1], _FileRange):
                pieces[-1] = _FileRange(pieces[-1].offset, hi - pieces[-1].offset)
            else:
                pieces.append(_FileRange(lo, hi - lo))
        out = [
            self.data.read(piece.offset, piece.length) if isinstance(piece, _FileRange) else piece
            for piece in pieces
        ]
        return out[0] if len(out) == 1 else b"".join(out)

    # ---- client I/O ----------------------------------------------------------------------

    def mark_written_outside(self) -> None:
        """QEMU may have written to the data file directly (a live handoff rolled back after
        its switch began): every local chunk becomes dirty (never refetched, verified or
        deduplicated from), and the kernel's cached pages of the image must go
        (`pages_stale`, dropped by fuse_ops)."""
        for index in range(self.geometry.chunk_count):
            if self.is_local(index):
                self._set_state(index, ChunkState.DIRTY, None)
        self.store.touch(self.name)
        self.pages_stale = True

    def check_served(self) -> None:
        if self.handed_over_to is not None:
            raise ImageHandedOver(
                f"{self.name} was handed over to QEMU as {self.handed_over_to}: "
                "corfs no longer serves it"
            )

    def forget_unsynced(self) -> None:
        """After a failed sync of the cache, the chunks whose bytes no good commit synced are
        absent again (CacheStore.take_unsynced): served from the base as a remount would,
        never from a disk that may have lost them (zeros). Client writes to them since then
        go with them: none was fsynced (every fsync fails from then on), but a reader may
        have seen them, so reads of those chunks fail (EIO) until a remount rather than turn
        to the base's bytes unannounced; the kernel's cached pages go too. Nothing is stored
        any more (store_queue.py), nor written to a chunk not local (`write`)."""
        for index in self.store.take_unsynced(self.name):
            if self.state_of(index) == ChunkState.DIRTY:
                self._lost_writes.add(index)
            if self.is_local(index):
                self._set_state(index, ChunkState.ABSENT, None)
                self.pages_stale = True

    def _refuse_lost_writes(self, chunks: Iterable[int]) -> None:
        """CacheError (EIO) if a failed sync of the cache lost client writes to `chunks`:
        checked again after every await of a read (the sync may fail meanwhile), so that the
        base's bytes are never served in their place."""
        if self.store.sync_failure is not None:
            self.forget_unsynced()
        if self._lost_writes and not self._lost_writes.isdisjoint(chunks):
            raise CacheError(
                f"{self.name}: writes to this range were lost when the cache disk failed to "
                f"sync ({self.store.sync_failure}); restart the mount"
            )

    async def read(self, offset: int, length: int) -> Buffer:
        if self._writes_in_flight:  # the kernel keeps what a read gets (writes_in_flight.py)
            await self._writes_in_flight.wait_before(offset, offset + length)
        self.check_served()
        length = self.geometry.clip(offset, length)
        if length <= 0:
            return b""
        self.last_foreground = trio.current_time()
        chunks = self.geometry.chunks_of(offset, length)
        self._refuse_lost_writes(chunks)
        if self._first_reads is not None:
            self._first_reads(chunks)
        # Nothing read ahead once fills are no longer stored (a failed sync): fetched for
        # nothing
        fetching = (
            not self.complete and self.source is not None and self.error is None
            and self.store.sync_failure is None
        )
        # With nothing to fetch, only a large read's run is followed (for the cache file's
        # read-ahead): following small ones cost ~5 us, 4 % of a local 4 KiB read.
        if fetching or length > SMALL_READ:
            ahead = self.read_ahead.after_read(
                chunks, self._fetchable if fetching else _never, (offset, offset + length),
                fetching=fetching,
            )
            if ahead:
                self._start_fills(ahead, READ_AHEAD_RUN, for_readers=True)
            self._read_local_soon(self.read_ahead.newly_ahead(self._local_ahead_chunks))
        held: dict[int, Buffer | None] = {}
        if self._chunks.any_absent(chunks):
            if any(self._needs_fill(i, reading=True, held=held) for i in chunks):
                self.read_ahead.after_miss(chunks)
                if self._takes_a_range(chunks, length):
                    return await self._read_range(chunks, offset, length)
                held = await self.wait_local(chunks, reading=True)
                self._refuse_lost_writes(chunks)
            # No await from here on: what is in memory now is served (if the image is still
            # ours: a handoff may have finished while this read waited).
            self.check_served()
            return self._serve(chunks, offset, length, held)
        if self._fresh:
            return self._serve(chunks, offset, length, held)
        return self.data.read(offset, length)

    def _read_local_soon(self, chunks: range) -> None:
        """The local chunks among `chunks` (a sequential reader's window) start coming from the
        cache file into the page cache now: the reader's reads of them, inline on the event
        loop, then do not wait for the disk one at a time (a thick image read through the
        mount, page cache dropped: 1291-1357 MB/s against 938-1036, bench.reads)."""
        room = LOCAL_AHEAD_BYTES  # a chunk larger than that is hinted in part
        for run in contiguous_runs([i for i in chunks if self.is_local(i)]):
            length = min(room, self.geometry.length_of_chunks(run))
            self.data.read_soon(self.geometry.chunk_start(run.start), length)
            room -= length
            if not room:
                break

    def _takes_a_range(self, chunks: range, length: int) -> bool:
        """A small random miss on a raw base, none of its chunks local or on their way: it
        fetches a small range, not the chunks (ranges.py)."""
        return (
            length <= max(self._ranges.block, SMALL_READ)
            and self.source is not None
            and self.source.layout is None
            # blocks nest in chunks; a chunk no larger than a small read is filled whole
            and self.geometry.chunk_size > max(self._ranges.block, SMALL_READ)
            and self.error is None
            and not self.read_ahead.sequential
            and all(self._fetchable(i) for i in chunks)
        )

    async def _read_range(self, chunks: range, offset: int, length: int) -> Buffer:
        """Serve a random miss from the aligned blocks around it (fetched once, kept while
        its chunks stay absent); its chunks stay absent."""
        assert self.source is not None
        blocks = self._ranges.blocks_of(offset, length)
        if not self._ranges.missing(blocks):
            return self._ranges.read(offset, length)  # no await: every block is held now
        # Every block of the read is fetched and the answer comes from the fetched bytes: a
        # block held before the await may be evicted by other readers' blocks meanwhile.
        block = self._ranges.block
        start = blocks.start * block
        end = min(self.size, blocks.stop * block)
        try:
            data = await self.fetcher.read_with_retry(self.source, start, end - start)
        except BaseChanged as exc:
            if self.error is None:
                self.error = f"base image changed: {exc}"
            log.error("%s", exc)
            raise
        except (BaseNotFound, BaseAccessDenied) as exc:  # as a fill's: EIO, the disk's data
            raise chunk_error(exc) from None
        self._refuse_lost_writes(chunks)
        if not all(self._chunks.is_absent(i) for i in chunks):  # a write came meanwhile
            return await self.read(offset, length)
        view = memoryview(data)
        for number in blocks:
            lo = number * block - start
            self._ranges.keep(number, view[lo : lo + block])
        return view[offset - start : offset - start + length]

    def _fetchable(self, index: int) -> bool:
        """Absent, not on its way, and not held in memory: a chunk served but not stored (no
        write-behind room) stays in `_fresh` for its reader; fetching it ahead again would only
        be dropped again (4 base bytes per byte read on a slow cache disk)."""
        return (
            self._chunks.is_absent(index)
            and not self.is_filling(index)
            and index not in self._fresh
        )

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        self.check_served()
        if self.read_only:
            raise ReadOnlyError(f"{self.name} is mounted read-only")
        if not data:
            return 0
        if offset >= self.size:
            raise OutOfImageError(f"write past the end of {self.name} ({self.size} bytes)")
        # A write across the end is cut at it and answered short, as a block device does
        # (the caller learns how much went in); only a write wholly past the end is ENOSPC.
        if offset + len(data) > self.size:  # most writes are inside: no view made for them
            data = memoryview(data)[: self.size - offset]
        with self._writes_in_flight.writing(offset, offset + len(data)):
            return await self._write_inside(offset, data)

    async def _write_inside(self, offset: int, data: bytes | memoryview) -> int:
        """A write of at least one byte, all inside the image."""
        self.last_foreground = trio.current_time()
        touched = self.geometry.chunks_of(offset, len(data))
        partial = self.geometry.partly_covered(offset, len(data))
        while True:
            if self.store.sync_failure is not None:
                # Only over bytes a good commit synced: a chunk absent now could be filled
                # but not stored, and a write's bytes alone, if their writeback fails, would
                # leave the disk's zeros where the chunk's other bytes belong.
                self.forget_unsynced()
                if self._chunks.any_absent(touched):
                    raise CacheError(self.store.sync_failure)
            if any(self._chunks.is_absent(i) and i not in self._queue for i in partial):
                await self.wait_local(partial, writing=True)
            elif (job := self._queue.job_in_span(touched)) is not None:
                # Base bytes of these chunks (or of a neighbour sharing a folio with them) wait
                # to be stored: the write goes after them (never under base bytes, and never
                # beside a store in flight in its span), which now go first. Every store is a
                # queued job's and stays queued while in flight (store_queue.py).
                self._queue.hurry_span(touched)
                await job.done.wait()
                if job.error is not None and any(
                    i in job.indexes and self._chunks.is_absent(i) for i in partial
                ):  # a chunk of the job stored before its store failed is local: go on
                    raise job.error
            elif said_clean := self._dirty_first.needed(touched):
                await self._dirty_first.make(said_clean)
            else:
                break
        # No await from here on: the write and the dirty marks are one atomic step. A handoff
        # finished while this write waited: the data file is QEMU's DEST now, not ours to write.
        self.check_served()
        for index in touched:
            self._fresh.drop(index)  # even if the write fails half-way
        # The next commit syncs the data file even when every chunk was dirty already (no new
        # mark): an fsync must never succeed with this write in the page cache only.
        self.store.touch(self.name)
        try:
            self.data.write(offset, data)
        except ShortWrite as short:
            self._mark_written(offset, short.written)
            raise
        self._mark_dirty(touched)
        self.data.mtime_ns = time.time_ns()  # touched above: the next commit keeps it
        return len(data)

    @property
    def mtime_ns(self) -> int:
        """When a client last changed the image (a write, utime): kept by its data file."""
        return self.data.mtime_ns

    @mtime_ns.setter
    def mtime_ns(self, value: int) -> None:
        self.data.mtime_ns = value
        self.store.touch(self.name)  # the next commit keeps it

    def _mark_dirty(self, chunks: range) -> None:
        for index in chunks:
            if self.state_of(index) != ChunkState.DIRTY:
                self._set_state(index, ChunkState.DIRTY, None)

    def _mark_written(self, offset: int, written: int) -> None:
        """After a write cut short: the chunks whose bytes it changed are no longer the
        base's, where their other bytes are right: local ones, and absent ones it wrote whole.
        An absent chunk it wrote in part stays absent (the rest of it is a hole, not the
        base's bytes: a fill writes it whole), and one it never reached is left as it was; as
        on a disk, each block then holds its old bytes or the write's."""
        if written <= 0:
            return
        end = offset + written
        for index in self.geometry.chunks_of(offset, written):
            start = self.geometry.chunk_start(index)
            whole = offset <= start and start + self.geometry.chunk_length(index) <= end
            if (whole or self.is_local(index)) and self.state_of(index) != ChunkState.DIRTY:
                self._set_state(index, ChunkState.DIRTY, None)

    async def fsync(self) -> None:
        self.check_served()
        await self.store.commit()
