"""Before a client write changes bytes the cache database may call clean or zero (equal to the
base), the chunks become dirty there first (Image.write asks; crash_view.py says which rows
may say so).

Why: a kill -9 keeps a write's bytes in the page cache. With the row still clean, the next
mount served them as the base's, and `corfs verify` (or a forget) later put the base's bytes
back under a guest that had read them. Dirty over the base's bytes is true whether the write
lands or not, provided those bytes are durable: then the rows alone are written (one small
transaction, no data sync, once per chunk for the cache's life). A chunk with a newer mark not
yet committed (refilled after a forget, or forgotten) may hold bytes not yet synced: a full
commit then. A write that fails after this leaves its chunks dirty. Writes racing to one chunk
(QEMU's native AIO) wait for the first one's marking rather than commit again.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .chunk_table import ChunkTable
from .store import CacheStore, ChunkState


class DirtyFirst:
    """The dirty-before-write rule for one image's chunks."""

    def __init__(
        self,
        name: str,
        store: CacheStore,
        chunks: ChunkTable,
        set_state: Callable[[int, ChunkState, bytes | None], None],
    ) -> None:
        self._name = name
        self._store = store
        self._chunks = chunks
        self._set_state = set_state  # Image's: kept state, fresh bytes and marks together
        self._marking: dict[int, trio.Event] = {}  # chunks being made dirty now

    def needed(self, chunks: range) -> list[int]:
        """Those of `chunks` whose rows may say clean or zero: a write must wait for `make`."""
        return [i for i in chunks if self._store.may_say_clean(self._name, i)]

    async def make(self, chunks: list[int]) -> None:
        """Make `chunks` dirty in the database (module docstring). Returns early if another
        write is marking one of them: the caller asks `needed` again."""
        under_way = {id(e): e for i in chunks if (e := self._marking.get(i)) is not None}
        if under_way:
            for event in under_way.values():
                await event.wait()
            return
        unsynced = [i for i in chunks if self._store.has_uncommitted_mark(self._name, i)]
        done = trio.Event()
        for index in chunks:
            self._marking[index] = done
        try:
            for index in chunks:
                if self._chunks.state_of(index) in (ChunkState.CLEAN, ChunkState.ZERO):
                    self._set_state(index, ChunkState.DIRTY, None)
            if unsynced or any(self._chunks.is_absent(i) for i in chunks):
                await self._store.commit()
            else:
                await self._store.commit_dirty_marks(self._name, chunks)
        finally:
            for index in chunks:
                if self._marking.get(index) is done:
                    del self._marking[index]
            done.set()
