"""The memory the images of one mount keep for their client reads, bounded together
(`--read-memory`): the bytes fetched ahead of sequential readers and kept for them (fresh.py)
and the blocks kept for random readers (ranges.py).

Each image also has its own bounds (64 MiB of chunks, 16 MiB of blocks, a read-ahead window of
at most READ_AHEAD_MAX chunks), which alone let the daemon's memory grow with the number of
images read at once. Bounding only the kept bytes is not enough: the images' read-ahead
windows then outgrow their share, chunks fetched ahead are pushed out before their reader
gets there, and those not yet stored are fetched again (8 images read at once with 128 MiB:
1.4 GiB fetched for 1 GiB read). So the read-ahead is bounded by the same bytes, shared
equally among the images reading ahead lately (ReadAheadShare).
"""

from __future__ import annotations

from dataclasses import dataclass

from .fresh import KeptMemory
from .read_ahead import ReadAheadShare


@dataclass(frozen=True)
class ReadMemory:
    kept: KeptMemory
    read_ahead: ReadAheadShare

    @classmethod
    def bounded(cls, limit_bytes: int) -> ReadMemory:
        return cls(KeptMemory(limit_bytes), ReadAheadShare(limit_bytes))
