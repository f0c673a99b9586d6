"""Chunk geometry: which chunks a byte range touches. Pure arithmetic, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkGeometry:
    image_size: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk size must be a power of two, not {self.chunk_size}")
        if self.image_size < 0:
            raise ValueError("image size must not be negative")

    @property
    def chunk_count(self) -> int:
        return -(-self.image_size // self.chunk_size)

    def chunk_start(self, index: int) -> int:
        return index * self.chunk_size

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk `index` inside the image (the last chunk may be short)."""
        start = index * self.chunk_size
        return max(0, min(self.chunk_size, self.image_size - start))

    def length_of_chunks(self, indexes: Iterable[int]) -> int:
        """Bytes of these chunks inside the image (say, the local ones)."""
        return sum(self.chunk_length(index) for index in indexes)

    def most_bytes_of(self, count: int) -> int:
        """The most bytes `count` chunks can hold, when which chunks is not known: `count`
        whole chunks, capped at the image size (the dirty bytes of a status)."""
        return min(count * self.chunk_size, self.image_size)

    def clip(self, offset: int, length: int) -> int:
        """Length of [offset, offset+length) that lies inside the image."""
        return max(0, min(length, self.image_size - offset))

    def chunks_of(self, offset: int, length: int) -> range:
        """Indexes of the chunks that [offset, offset+length) touches, clipped to the image."""
        length = self.clip(offset, length)
        if length <= 0:
            return range(0)
        return range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1)

    def partly_covered(self, offset: int, length: int) -> list[int]:
        """Chunks that a write of [offset, offset+length) touches without covering them whole."""
        chunks = self.chunks_of(offset, length)
        end = offset + self.clip(offset, length)
        partial: list[int] = []
        for index in sorted({chunks[0], chunks[-1]}) if chunks else []:
            start = self.chunk_start(index)
            if offset > start or end < start + self.chunk_length(index):
                partial.append(index)
        return partial


def contiguous_runs(indexes: list[int]) -> list[range]:
    """Sorted chunk indexes as runs of adjacent ones: [1,2,3,7,8] -> [range(1,4), range(7,9)]."""
    runs: list[range] = []
    for index in indexes:
        if runs and runs[-1].stop == index:
            runs[-1] = range(runs[-1].start, index + 1)
        else:
            runs.append(range(index, index + 1))
    return runs
