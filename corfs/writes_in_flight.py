"""The client writes of one image the daemon is serving now, so that a read that arrives after
a write to the same bytes is answered after that write (Image.read waits for them).

Why: without FUSE's writeback cache the kernel writes through its page cache. A written page
is clean and unlocked while its WRITE waits here (for a fill, a store, a dirty mark), so the
kernel may drop it meanwhile (memory pressure, or auto_inval_data dropping an image's pages when
a GETATTR shows a new mtime, which every write gives) and ask for it again. Answered before the
write lands, those old bytes stayed in the page cache (keep_cache) after the write returned: a
mapping of the page, or a read before the next mtime check, saw them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import trio


class WritesInFlight:
    def __init__(self) -> None:
        self._writes: dict[int, tuple[int, int, trio.Event]] = {}  # key -> (start, end, done)
        self._keys = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._writes)

    @contextlib.contextmanager
    def writing(self, start: int, end: int) -> Iterator[None]:
        """A write of [start, end) is served inside this block, however it ends."""
        key, done = next(self._keys), trio.Event()
        self._writes[key] = (start, end, done)
        try:
            yield
        finally:
            del self._writes[key]
            done.set()

    async def wait_before(self, start: int, end: int) -> None:
        """Until every write of bytes in [start, end) in flight now has ended (not those that
        arrive meanwhile: they came after this read)."""
        overlapping = [done for lo, hi, done in self._writes.values() if lo < end and start < hi]
        for done in overlapping:
            await done.wait()
