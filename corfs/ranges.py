"""Small aligned ranges of a raw base image, fetched for random readers (issue 13.2).

A client read of at most SMALL_READ (or one block, `--random-range`, default 4 KiB) that
misses and is not part of a sequential run (read_ahead.py decides) fetches only the aligned
blocks it touches, in one request, not whole chunks. Larger reads fill whole chunks. The chunk
stays absent (the stream makes it local, whole); the blocks are kept, bounded, for re-reads.
Only where chunks are larger than a block and than SMALL_READ: a block then lies within one
chunk (both are powers of two), so it never holds bytes of another chunk, which may be dirty;
and a chunk of SMALL_READ or less costs no more to fetch than a small read, so it is filled
whole and becomes local at once.

Why 4 KiB: a cold 4 KiB QD1 reader against a loopback nginx (bench.peers, `--range-sizes`)
ran fastest with the smallest range: the origin reads less from its own disk (4 KiB: ~0.09 ms,
64 KiB: ~0.23 ms there), and what a random reader reads next is rarely in the same 64 KiB. A
base with a long round trip (S3, a far server) pays the same for 64 KiB as for 4 KiB, and
neighbouring reads then save whole round trips: there a larger `--random-range` may win.

Only for bases whose bytes are verified by identity on every request (raw dir, http and s3
images: validators on each ranged read). A published image verifies each chunk against its
digest, which needs the whole chunk: it keeps whole-chunk fills.

Invariant (kept by Image): a block held here is the base's bytes of chunks that were absent
when it was fetched and have not changed state since; a chunk changing state drops the blocks
that overlap it.
"""

from __future__ import annotations

from .config import DEFAULT_RANDOM_RANGE
from .digest import Buffer
from .fresh import FreshChunks, KeptMemory

SMALL_READ = 64 << 10  # a miss up to this size (or one block) may take a range
# Memory of the blocks kept for re-reads, per image, counted as the buffers they keep alive
# (fresh.py): a 4 KiB block's takes 8 KiB (buffers.py: small buffers are part of a bytearray
# one page longer), so 2048 blocks of the default 4 KiB.
RANGE_CACHE_BYTES = 16 << 20


class RangeCache:
    """Least-recently-fetched blocks, by block number (offset // block), bounded by bytes
    (a FreshChunks map of blocks: the same bounded map as the fresh chunks')."""

    def __init__(
        self, limit_bytes: int = RANGE_CACHE_BYTES, block: int = DEFAULT_RANDOM_RANGE,
        shared: KeptMemory | None = None,
    ) -> None:
        self.block = block
        self._blocks = FreshChunks(limit_bytes, shared)

    def blocks_of(self, offset: int, length: int) -> range:
        return range(offset // self.block, (offset + length - 1) // self.block + 1)

    def missing(self, blocks: range) -> list[int]:
        return [b for b in blocks if b not in self._blocks]

    def keep(self, number: int, data: Buffer) -> None:
        self._blocks.keep(number, data)

    def drop_block(self, number: int) -> None:
        self._blocks.drop(number)

    def drop_range(self, offset: int, length: int) -> None:
        """Forget the blocks overlapping [offset, offset+length): by looking up each block of
        the range, or by going through the blocks held when they are fewer (every chunk state
        change asks; a 64 MiB chunk has 16384 blocks of 4 KiB, 1.6 ms of lookups)."""
        if not len(self._blocks):
            return
        blocks = self.blocks_of(offset, length)
        held = self._blocks.indexes() if len(blocks) > len(self._blocks) else blocks
        for number in held:
            if number in blocks:
                self.drop_block(number)

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of [offset, offset+length), every block of it held."""
        pieces = []
        for number in self.blocks_of(offset, length):
            start = number * self.block
            data = self._blocks.get(number)
            assert data is not None, "read of a block not held (check `missing` first)"
            pieces.append(data[max(offset, start) - start : offset + length - start])
        return b"".join(pieces)
