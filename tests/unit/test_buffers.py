"""Fetch buffers: page-aligned, writable, exactly as long as asked, zeroed when asked, freed
with their last view; and which buffers may be written with O_DIRECT."""

from __future__ import annotations

import pytest

from corfs.buffers import (
    ALIGNMENT,
    SMALL_BYTES,
    address_of,
    aligned_buffer,
    aligned_zeros,
    is_aligned,
)


@pytest.mark.parametrize("length", [0, 1, 4095, ALIGNMENT, 3 * ALIGNMENT + 17, 1 << 20])
def test_aligned_buffers_are_aligned_exact_and_writable(length: int) -> None:
    for buf in (aligned_buffer(length), aligned_zeros(length)):
        assert len(buf) == length and not buf.readonly and buf.format == "B"
        if length:
            assert address_of(buf) % ALIGNMENT == 0
            buf[-1] = 7  # writable up to its last byte
            assert buf[-1] == 7
            buf[:] = b"x" * length  # and takes bytes as a bytearray would
    dirty = aligned_buffer(length)
    dirty[:] = b"\xff" * length  # memory that held something: aligned_zeros must clear it
    del dirty
    assert bytes(aligned_zeros(length)) == bytes(length)


def test_buffers_are_freed_with_their_last_view() -> None:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss()
    for _ in range(200):  # 800 MiB in all, if nothing were freed
        buf = aligned_buffer(4 << 20)
        piece = buf[ALIGNMENT : 2 * ALIGNMENT]
        buf[:] = b"\x01" * len(buf)  # touch every page
        del buf
        assert piece[0] == 1  # the slice still holds the memory
        del piece
    assert rss() - before < 100 << 20


def test_only_aligned_writable_whole_blocks_count_as_aligned() -> None:
    buf = aligned_buffer(4 * ALIGNMENT)
    assert is_aligned(buf)
    assert is_aligned(buf[ALIGNMENT : 3 * ALIGNMENT])  # chunk slices of one fetch buffer
    assert not is_aligned(buf[1 : ALIGNMENT + 1])  # misaligned start
    assert not is_aligned(buf[: ALIGNMENT + 1])  # length not a whole block
    assert not is_aligned(bytes(ALIGNMENT))  # read-only: its address is not ours to know
    assert not is_aligned(memoryview(bytes(ALIGNMENT)))


def test_released_buffers_are_reused_not_mapped_anew() -> None:
    first = aligned_buffer(SMALL_BYTES + ALIGNMENT)  # a mapping (smaller ones: bytearrays)
    where = address_of(first)
    del first
    again = aligned_buffer(SMALL_BYTES + ALIGNMENT)  # same size: the released mapping
    assert address_of(again) == where


def test_a_buffer_freed_by_a_collection_inside_the_pool_does_not_deadlock() -> None:
    # An allocation under the pool's lock can set off a garbage collection, which frees a
    # buffer held in a reference cycle and runs its release in the same thread, lock held.
    import gc
    import threading

    from corfs import buffers

    class Cycle:
        pass

    finished = threading.Event()

    def collect_inside_the_lock() -> None:
        holder = Cycle()
        holder.me = holder  # only the cycle collector frees it
        holder.buffer = aligned_buffer(ALIGNMENT)
        del holder
        with buffers._POOL._lock:
            gc.collect()  # what an allocation in give_back or take may do
        finished.set()

    threading.Thread(target=collect_inside_the_lock, daemon=True).start()
    assert finished.wait(10), "the pool deadlocked on a buffer released during a collection"
