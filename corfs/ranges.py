"""Small aligned ranges of a raw base image, fetched for random readers (issue 13.2).

A client read of at most RANGE_SIZE that misses and is not part of a sequential run
(read_ahead.py decides) fetches only the RANGE_SIZE-aligned blocks around it, not whole
chunks: an aligned random 4 KiB reader fetches RANGE_SIZE / 4 KiB = 16 times what it reads (a
whole 1 MiB chunk was 256 times). Larger reads fill whole chunks. The chunk stays absent
(the stream makes it local, whole); the blocks are kept, bounded, for re-reads. Only where
chunks are larger than RANGE_SIZE: a block then lies within one chunk (both are powers of
two), so it never holds bytes of another chunk, which may be dirty.

Only for bases whose bytes are verified by identity on every request (raw dir, http and s3
images: validators on each ranged read). A published image verifies each chunk against its
digest, which needs the whole chunk: it keeps whole-chunk fills.

Invariant (kept by Image): a block held here is the base's bytes of chunks that were absent
when it was fetched and have not changed state since; a chunk changing state drops the blocks
that overlap it.
"""

from __future__ import annotations

from collections import OrderedDict

from .digest import Buffer

RANGE_SIZE = 64 << 10  # bytes fetched around a random miss (module docstring)
RANGE_CACHE_BYTES = 8 << 20  # blocks kept for re-reads, per image


class RangeCache:
    """Least-recently-fetched blocks, by block number (offset // RANGE_SIZE)."""

    def __init__(self, limit_bytes: int = RANGE_CACHE_BYTES, block: int = RANGE_SIZE) -> None:
        self.block = block
        self.limit_bytes = limit_bytes
        self._blocks: OrderedDict[int, Buffer] = OrderedDict()
        self._bytes = 0

    def blocks_of(self, offset: int, length: int) -> range:
        return range(offset // self.block, (offset + length - 1) // self.block + 1)

    def missing(self, blocks: range) -> list[int]:
        return [b for b in blocks if b not in self._blocks]

    def keep(self, number: int, data: Buffer) -> None:
        self.drop_block(number)
        self._blocks[number] = data
        self._bytes += len(data)
        while self._bytes > self.limit_bytes and self._blocks:
            _, oldest = self._blocks.popitem(last=False)
            self._bytes -= len(oldest)

    def drop_block(self, number: int) -> None:
        data = self._blocks.pop(number, None)
        if data is not None:
            self._bytes -= len(data)

    def drop_range(self, offset: int, length: int) -> None:
        """Forget the blocks overlapping [offset, offset+length)."""
        if self._blocks:
            for number in self.blocks_of(offset, length):
                self.drop_block(number)

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of [offset, offset+length), every block of it held."""
        pieces = []
        for number in self.blocks_of(offset, length):
            start = number * self.block
            data = self._blocks[number]
            pieces.append(data[max(offset, start) - start : offset + length - start])
        return b"".join(pieces)
