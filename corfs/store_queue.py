"""One image's fetched chunks on their way to its data file: verified bytes that answered their
readers at once and are stored behind them (write_behind.py: the budget they count against).

Invariants:
- A queued chunk is absent until it is stored: `on_stored` (which records it local) runs only
  once DataFile.store has written its bytes, in the same step that takes it off the queue (no
  await between), so "never mark before durable" holds and no reader finds it neither queued
  nor local.
- Until then reads are served from its bytes (`get`), and it is not fetched again.
- A chunk that changed state while queued (a client wrote it whole) is not stored: DataFile
  .store asks `is_absent` with no await before it registers the chunks it writes.
- A store that fails leaves its chunks absent and says so once (`on_failed`); its job's
  waiters see the error. Every byte taken from the budget is released when the job ends, however
  it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .datafile import DataFile, StreamTurn
from .errors import CacheError, CorfsError, internal_error
from .fetcher import FetchedChunk
from .write_behind import WriteBehind

log = logging.getLogger(__name__)


@dataclass
class StoreJob:
    """Chunks of one fill stored behind their readers."""

    indexes: frozenset[int]
    done: trio.Event = field(default_factory=trio.Event)
    error: CorfsError | None = None
    turn: StreamTurn = field(default_factory=StreamTurn)  # hurried when a client write waits


@dataclass
class Queued:
    """A verified chunk waiting in memory to be stored: reads are served from its bytes."""

    chunk: FetchedChunk
    job: StoreJob
    read_to_end: bool = False  # a reader has read it to its end: not worth keeping once stored


StoredFn = Callable[[FetchedChunk, bool], None]  # (chunk, keep its bytes for readers)
FailedFn = Callable[[list[int], CorfsError], None]  # (chunks left absent, why)


class StoreQueue:
    """The queue of one image. `on_stored` records a chunk local (and keeps its bytes for
    readers when asked); `on_failed` records chunks left absent by a failed store."""

    def __init__(
        self,
        name: str,
        data: DataFile,
        nursery: trio.Nursery,
        *,
        is_absent: Callable[[int], bool],
        on_stored: StoredFn,
        on_failed: FailedFn,
        refused: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.name = name
        self._refused = refused
        self.data = data
        self._nursery = nursery
        self._is_absent = is_absent
        self._on_stored = on_stored
        self._on_failed = on_failed
        self._queued: dict[int, Queued] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._queued

    def __bool__(self) -> bool:
        return bool(self._queued)

    def get(self, index: int) -> Queued | None:
        return self._queued.get(index)

    def job_in_span(self, chunks: range) -> StoreJob | None:
        """A job storing a chunk that shares a page-cache folio with `chunks` (datafile.py's
        folio-span rule), or None."""
        for index in self.data.span(chunks):
            if (queued := self._queued.get(index)) is not None:
                return queued.job
        return None

    def hurry_span(self, chunks: range) -> None:
        """A client write waits for the stores in the span of `chunks`: they go now, not in the
        stream's line (StreamTurn), and so do the stores in flight they wait for
        (StreamTurn.hurry): those only, not every store whose span touches theirs."""
        for index in self.data.span(chunks):
            if (queued := self._queued.get(index)) is not None:
                queued.job.turn.hurry()

    async def wait_empty(self) -> None:
        """Until no chunk waits to be stored."""
        while self._queued:
            await next(iter(self._queued.values())).job.done.wait()

    def add(
        self, chunks: list[FetchedChunk], budget: WriteBehind, nbytes: int, *, keep: bool,
        background: bool,
    ) -> None:
        """Queue `chunks` (absent, verified; `nbytes` taken from `budget` for them) and store
        them behind their readers; `keep`: their bytes stay in memory for readers once stored.
        The job gives its bytes back to the budget they came from."""
        job = StoreJob(frozenset(chunk.index for chunk in chunks))
        for chunk in chunks:
            self._queued[chunk.index] = Queued(chunk, job)
        self._nursery.start_soon(self._store, chunks, job, budget, nbytes, keep, background)

    async def _store(
        self, chunks: list[FetchedChunk], job: StoreJob, budget: WriteBehind, nbytes: int,
        keep: bool, background: bool,
    ) -> None:
        def queued_by_job(index: int) -> bool:
            queued = self._queued.get(index)
            return queued is not None and queued.job is job and self._is_absent(index)

        def mark_stored(stored: list[FetchedChunk]) -> None:
            for chunk in stored:
                queued = self._queued.pop(chunk.index)
                self._on_stored(chunk, keep and not queued.read_to_end)
            budget.stored(len(stored))

        refused = self._refused()
        try:
            if refused is not None:
                raise CacheError(refused)
            await self.data.store(
                chunks, wanted=queued_by_job, stored=mark_stored, coalesce=not background,
                turn=job.turn,
            )
        except Exception as exc:
            failed = [chunk.index for chunk in chunks if queued_by_job(chunk.index)]
            job.error = exc if isinstance(exc, CorfsError) else internal_error(
                exc, f"storing {self.name}"
            )
            budget.store_failed()
            self._on_failed(failed, job.error)
            log.log(
                logging.DEBUG if refused is not None else logging.ERROR,  # said once (store.py)
                "storing %s chunks %d-%d: %s (left absent)",
                self.name, chunks[0].index, chunks[-1].index, job.error,
                exc_info=not isinstance(exc, CorfsError),
            )
        finally:
            for chunk in chunks:
                if (queued := self._queued.get(chunk.index)) is not None and queued.job is job:
                    del self._queued[chunk.index]
            budget.release(nbytes)
            job.done.set()
