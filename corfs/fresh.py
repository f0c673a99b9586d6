"""Verified bytes of recently fetched chunks, kept in memory for the client reads that want them.

A sequential reader's chunks arrive through read-ahead fills: serving the reader from the fill's
own buffer (a slice, no copy) spares a pread of bytes that are not in the page cache (fills are
written with O_DIRECT, datafile.py), so a disk read, and the copy out of it. Chunks a reader's
fill could not queue for storing (write_behind.py: no room) are kept here too, still absent.

Invariant (kept by Image): an entry holds exactly the base bytes of a chunk whose state has not
changed since they were verified; every state change of a chunk drops its entry first.
"""

from __future__ import annotations

from collections import OrderedDict

from .digest import Buffer


class FreshChunks:
    """A least-recently-stored map chunk index -> bytes, bounded by the bytes it holds."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._chunks: OrderedDict[int, Buffer] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, index: int) -> bool:
        return index in self._chunks

    def indexes(self) -> list[int]:
        return list(self._chunks)

    def get(self, index: int) -> Buffer | None:
        return self._chunks.get(index)

    def keep(self, index: int, data: Buffer) -> None:
        self.drop(index)
        self._chunks[index] = data
        self._bytes += len(data)
        while self._bytes > self.limit_bytes and self._chunks:
            _, oldest = self._chunks.popitem(last=False)
            self._bytes -= len(oldest)

    def drop(self, index: int) -> None:
        data = self._chunks.pop(index, None)
        if data is not None:
            self._bytes -= len(data)
