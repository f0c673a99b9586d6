"""Buffers for chunk data on its way from the base to the cache, and the allocator settings that
keep them cheap.

Fetched bytes land in a page-aligned buffer so the store can write them to the data file with
O_DIRECT (no copy into the page cache, no writeback backlog for a guest's flush to wait for;
see store.write_fill). A buffer is memory from libc's aligned_alloc behind a memoryview: it is
not zeroed (a bytearray's zeroing cost 6% of the daemon's CPU in a cold read), and it is freed
when the last view of it goes, like any Python object.
"""

from __future__ import annotations

import ctypes
import logging
import weakref

log = logging.getLogger(__name__)

ALIGNMENT = 4096  # O_DIRECT needs buffer, offset and length aligned; 4 KiB suits every device

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc serves larger allocations with a fresh mmap and returns free heap above this to the
# kernel: each multi-MiB fetch buffer then costs page faults and zeroing of fresh pages (10% of
# the daemon's CPU in a cold read, by perf). Raised, freed buffers are reused from the heap.
_MMAP_THRESHOLD = 32 << 20  # glibc's own maximum for a dynamic threshold
_TRIM_THRESHOLD = 64 << 20


_libc = ctypes.CDLL(None)
_libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.aligned_alloc.restype = ctypes.c_void_p
_libc.free.argtypes = [ctypes.c_void_p]


def aligned_buffer(length: int) -> memoryview:
    """A writable buffer of `length` bytes whose first byte is ALIGNMENT-aligned. Its bytes
    are NOT initialized: the caller writes all of them (or uses aligned_zeros)."""
    size = max(ALIGNMENT, -(-length // ALIGNMENT) * ALIGNMENT)  # C11: a multiple of it
    address = _libc.aligned_alloc(ALIGNMENT, size)
    if not address:
        raise MemoryError(f"cannot allocate a {size}-byte buffer")
    memory = (ctypes.c_ubyte * size).from_address(address)
    # Views keep `memory` alive; it is freed with the last of them. Not at interpreter exit:
    # a worker thread may still hold a view then, and the process's memory goes anyway.
    weakref.finalize(memory, _libc.free, address).atexit = False
    return memoryview(memory).cast("B")[:length]


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
    return address_of(data) % ALIGNMENT == 0  # type: ignore[arg-type]


def tune_allocator() -> None:
    """Keep freed fetch buffers in the heap for reuse (see above). glibc only; a no-op
    elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    ):
        log.debug("mallopt refused the buffer settings; fetch buffers come from mmap")
