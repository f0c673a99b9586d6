"""Verified bytes of recently fetched chunks, kept in memory for the client reads that want them.

A sequential reader's chunks arrive through read-ahead fills: serving the reader from the fill's
own buffer (a slice, no copy) spares a pread of bytes that are not in the page cache (fills are
written with O_DIRECT, datafile.py), so a disk read, and the copy out of it. Chunks a reader's
fill could not queue for storing (write_behind.py: no room) are kept here too, still absent.

Invariant (kept by Image): an entry holds exactly the base bytes of a chunk whose state has not
changed since they were verified; every state change of a chunk drops its entry first.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from .buffers import aligned_copy
from .digest import Buffer


class KeptMemory:
    """The memory that the FreshChunks maps of every image of a mount keep alive, bounded
    together (read_memory.py): past the limit, the entry kept longest ago goes first, whichever
    image's it is. Each map keeps its own limit too."""

    def __init__(self, limit_bytes: float = math.inf) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0  # the sizes of the distinct buffers the maps keep alive
        self._order: OrderedDict[tuple[FreshChunks, int], None] = OrderedDict()

    def kept(self, chunks: FreshChunks, index: int) -> None:
        self._order[(chunks, index)] = None

    def forgotten(self, chunks: FreshChunks, index: int) -> None:
        self._order.pop((chunks, index), None)

    def trim(self) -> None:
        while self.bytes > self.limit_bytes and self._order:
            (chunks, index), _ = self._order.popitem(last=False)
            chunks.drop(index)


class FreshChunks:
    """A least-recently-stored map chunk index -> bytes, bounded by the memory it keeps alive.

    A chunk is usually a view of a fetch buffer that holds its whole run (one request for
    several chunks): that buffer lives as long as any of its chunks is kept here, so it is
    counted whole, once, while one is. Counting each chunk's own length instead let the
    real memory grow to a multiple of the limit (one chunk kept from each of many runs)."""

    def __init__(self, limit_bytes: int, shared: KeptMemory | None = None) -> None:
        self.limit_bytes = limit_bytes
        self._shared = shared if shared is not None else KeptMemory()
        self._chunks: OrderedDict[int, Buffer] = OrderedDict()
        self._buffers: dict[int, list[int]] = {}  # id(buffer) -> [entries of it, its size]
        self._bytes = 0  # the sizes of the distinct buffers kept alive

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, index: int) -> bool:
        return index in self._chunks

    def indexes(self) -> list[int]:
        return list(self._chunks)

    def get(self, index: int) -> Buffer | None:
        return self._chunks.get(index)

    def keep(self, index: int, data: Buffer, *, only_copy: bool = False) -> None:
        """`only_copy`: the chunk is neither local nor on its way there (no write-behind
        room): pushed out, it would be fetched again, maybe while its reader is half-way
        through. The mount's bound (KeptMemory) counts it but never pushes it out; this
        map's own limit still does."""
        self.drop(index)
        key, size = _buffer_of(data)
        if size > self.limit_bytes:
            # A buffer larger than the whole limit (a run of large chunks): a view of it would
            # push out every other entry, then itself. The chunk alone, copied, may fit.
            if len(data) > self.limit_bytes:
                return
            data = aligned_copy(data)
            key, size = _buffer_of(data)
        self._chunks[index] = data
        self._hold(key, size)
        if not only_copy:
            self._shared.kept(self, index)
        while self._bytes > self.limit_bytes and self._chunks:
            self.drop(next(iter(self._chunks)))
        self._shared.trim()

    def drop(self, index: int) -> None:
        data = self._chunks.pop(index, None)
        if data is not None:
            self._let_go(data)
            self._shared.forgotten(self, index)

    def _hold(self, key: int, size: int) -> None:
        counted = self._buffers.get(key)
        if counted is None:
            self._buffers[key] = [1, size]
            self._bytes += size
            self._shared.bytes += size
        else:
            counted[0] += 1

    def _let_go(self, data: Buffer) -> None:
        key, _ = _buffer_of(data)
        counted = self._buffers[key]
        counted[0] -= 1
        if not counted[0]:
            del self._buffers[key]
            self._bytes -= counted[1]
            self._shared.bytes -= counted[1]


def _buffer_of(data: Buffer) -> tuple[int, int]:
    """(id, size) of the object whose memory `data` keeps alive: a view's exporter (a fetch
    buffer, a bytearray, bytes), or `data` itself. The id is unique while an entry holds it."""
    owner = data.obj if isinstance(data, memoryview) and data.obj is not None else data
    with memoryview(owner) as view:
        return id(owner), view.nbytes
