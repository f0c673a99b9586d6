"""Buffers for chunk data on its way from the base to the cache.

Fetched bytes land in a page-aligned buffer so the store can write them to the data file with
O_DIRECT (no copy into the page cache, no writeback backlog for a guest's flush to wait for;
see store.write_fill). A buffer is an anonymous memory mapping behind a memoryview (a small
one: part of a bytearray), released when the last view of it goes, like any Python object.
Released mappings are kept for reuse (up to POOL_BYTES): a fresh one costs a page fault and
the kernel's zeroing of every page on first touch, and a bytearray a memset of it all, together
a sixth of the daemon's CPU in a cold read (perf). So a buffer's bytes are NOT initialized: its
user writes all of them.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import weakref

ALIGNMENT = 4096  # O_DIRECT needs buffer, offset and length aligned; 4 KiB suits every device
POOL_BYTES = 64 << 20  # released mappings kept for reuse: the read-ahead window's worth
SMALL_BYTES = 16 << 10  # smaller buffers are carved from a bytearray (_small_aligned)


class _MappingPool:
    """Released anonymous mappings by size. Buffers are released from whichever thread drops
    the last view, hence the lock; a reentrant one, because a garbage collection that an
    allocation under the lock sets off can release a buffer (run its finalizer) right there."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._free: dict[int, list[tuple[mmap.mmap, int]]] = {}
        self._bytes = 0
        self._lock = threading.RLock()

    def take(self, size: int) -> tuple[mmap.mmap, int]:
        with self._lock:
            free = self._free.get(size)
            if free:
                self._bytes -= size
                return free.pop()
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        probe = ctypes.c_char.from_buffer(mapping)
        address = ctypes.addressof(probe)
        del probe  # its buffer export would keep the mapping from ever closing
        return mapping, address

    def give_back(self, mapping: mmap.mmap, address: int) -> None:
        size = len(mapping)
        entry = (mapping, address)
        with self._lock:
            if self._bytes + size <= self.limit_bytes:
                self._free.setdefault(size, []).append(entry)
                self._bytes += size
                return
        mapping.close()


_POOL = _MappingPool(POOL_BYTES)


def aligned_buffer(length: int) -> memoryview:
    """A writable buffer of `length` bytes whose first byte is page-aligned. Its bytes are NOT
    initialized: the caller writes all of them (or uses aligned_zeros)."""
    size = max(ALIGNMENT, -(-length // ALIGNMENT) * ALIGNMENT)
    if size <= SMALL_BYTES:
        return _small_aligned(length)
    mapping, address = _POOL.take(size)
    memory = (ctypes.c_ubyte * size).from_address(address)
    # Views keep `memory` alive; the mapping goes back to the pool with the last of them (the
    # finalizer holds it till then). Not at interpreter exit: a worker thread may still hold a
    # view then, and the process's memory goes anyway.
    weakref.finalize(memory, _POOL.give_back, mapping, address).atexit = False
    return memoryview(memory).cast("B")[:length]


def _small_aligned(length: int) -> memoryview:
    """The aligned part of a bytearray one page longer: a random reader's 4 KiB miss wanted a
    mapping each (mmap, page fault, finalizer, munmap: 7 % of the daemon's time per miss) while
    the blocks it keeps (ranges.py) hold theirs, so the pool had none to give back. Zeroing a
    few KiB costs less."""
    raw = bytearray(length + ALIGNMENT)
    skip = -address_of(raw) % ALIGNMENT
    return memoryview(raw)[skip : skip + length]


def aligned_zeros(length: int) -> memoryview:
    """aligned_buffer, all zeros."""
    buffer = aligned_buffer(length)
    if length:
        ctypes.memset(address_of(buffer), 0, length)
    return buffer


def aligned_copy(data: bytes | bytearray | memoryview) -> memoryview:
    """`data` in an aligned buffer: for bases whose client library hands out its own bytes."""
    out = aligned_buffer(len(data))
    out[:] = data
    return out


def address_of(buffer: bytearray | memoryview) -> int:
    """Where a writable buffer's first byte is in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def is_aligned(data: bytes | bytearray | memoryview) -> bool:
    """True if `data` may be written with O_DIRECT: its start and its length are aligned.
    Read-only buffers (bytes) are never reported aligned: their address is not exposed."""
    if len(data) % ALIGNMENT:
        return False
    if isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly):
        return False
    return address_of(data) % ALIGNMENT == 0
