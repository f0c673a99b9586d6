"""ranges.RangeCache.drop_range forgets exactly the blocks overlapping a range, whether it looks
them up one by one (a short range) or goes through the blocks held (fewer than the range's)."""

from __future__ import annotations

import pytest

from corfs.ranges import RangeCache

BLOCK = 4096


@pytest.mark.parametrize("held", [[0, 1, 5], list(range(0, 400, 3))], ids=["few", "many"])
@pytest.mark.parametrize(
    ("offset", "length"), [(0, BLOCK), (BLOCK + 1, 2), (BLOCK, 4 * BLOCK - 1), (0, 1 << 30)]
)
def test_drop_range_forgets_exactly_the_overlapping_blocks(
    held: list[int], offset: int, length: int
) -> None:
    cache = RangeCache(limit_bytes=1 << 30, block=BLOCK)
    for number in held:
        cache.keep(number, bytes(BLOCK))
    cache.drop_range(offset, length)
    overlapping = range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)
    assert [n for n in held if not cache.missing(range(n, n + 1))] == [
        n for n in held if n not in overlapping
    ]
