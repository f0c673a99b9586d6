"""--read-memory over images read at once (read_memory.py): what they keep for their readers
stays within it, together, and their read-ahead stays within their shares, so that nothing
fetched ahead is pushed out before its reader gets there and fetched again, even where the
write-behind budget is full and fetched chunks are kept only in memory."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from tests.core.rig import CS, chunk_reads, random_bytes

IMAGES = 3
CHUNKS = 128


@pytest.mark.parametrize(
    ("read_memory", "read_size"),
    [
        (24 * CS, CS),  # 8 chunks an image: far below one image's own bounds
        (24 * CS, CS // 8),  # review: readers half-way through a chunk kept only in memory
        (4 * CS, CS // 8),  # less than a window's worth for each image
        (0, CS // 8),  # none: nothing read ahead, nothing fetched twice
    ],
    ids=["whole-chunks", "eighths", "tiny", "zero"],
)
def test_images_read_at_once_keep_within_the_shared_memory_and_fetch_each_chunk_once(
    rig_factory, read_memory: int, read_size: int
) -> None:
    datas = {f"img{i}": random_bytes(CHUNKS * CS, seed=i) for i in range(IMAGES)}

    async def main() -> None:
        async with rig_factory(datas, read_memory=read_memory, write_behind=0) as rig:
            images = list(rig.images.values())
            most = 0
            for offset in range(0, CHUNKS * CS, read_size):  # a reader per image, interleaved
                for name, data in datas.items():
                    got = await rig.image(name).read(offset, read_size)
                    assert bytes(got) == data[offset : offset + read_size], (name, offset)
                    # as each image's maps count them (fresh.py), whatever they share
                    most = max(most, sum(image._fresh._bytes for image in images))
                await trio.sleep(0)
            if read_memory >= 24 * CS:
                assert most <= read_memory
            for name in datas:
                fetched = Counter(chunk_reads(rig.source(name), CS))
                assert max(fetched.values()) == 1, (name, fetched.most_common(3))

    trio.run(main)
