"""Fetch buffers: page-aligned, writable, zeroed, exactly as long as asked; and which buffers
may be written with O_DIRECT."""

from __future__ import annotations

import pytest

from corfs.buffers import ALIGNMENT, address_of, aligned_buffer, is_aligned


@pytest.mark.parametrize("length", [0, 1, 4095, ALIGNMENT, 3 * ALIGNMENT + 17, 1 << 20])
def test_aligned_buffer_is_aligned_zeroed_and_exact(length: int) -> None:
    buf = aligned_buffer(length)
    assert len(buf) == length and not buf.readonly
    if length:
        assert address_of(buf) % ALIGNMENT == 0
        assert bytes(buf) == bytes(length)
        buf[-1] = 7  # writable up to its last byte
        assert buf[-1] == 7


def test_only_aligned_writable_whole_blocks_count_as_aligned() -> None:
    buf = aligned_buffer(4 * ALIGNMENT)
    assert is_aligned(buf)
    assert is_aligned(buf[ALIGNMENT : 3 * ALIGNMENT])  # chunk slices of one fetch buffer
    assert not is_aligned(buf[1 : ALIGNMENT + 1])  # misaligned start
    assert not is_aligned(buf[: ALIGNMENT + 1])  # length not a whole block
    assert not is_aligned(bytes(ALIGNMENT))  # read-only: its address is not ours to know
    assert not is_aligned(memoryview(bytes(ALIGNMENT)))
