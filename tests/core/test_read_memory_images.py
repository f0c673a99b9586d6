"""--read-memory over images read at once (read_memory.py): what they keep for their readers
stays within it, together, and their read-ahead stays within their shares, so that nothing
fetched ahead is pushed out before its reader gets there and fetched again, even where the
write-behind budget is full and fetched chunks are kept only in memory."""

from __future__ import annotations

from collections import Counter

import trio

from tests.core.rig import CS, chunk_reads, random_bytes

IMAGES = 3
CHUNKS = 256
READ_MEMORY = 24 * CS  # 8 chunks an image: far below one image's own bounds


def test_images_read_at_once_keep_within_the_shared_memory_and_fetch_each_chunk_once(
    rig_factory,
) -> None:
    datas = {f"img{i}": random_bytes(CHUNKS * CS, seed=i) for i in range(IMAGES)}

    async def main() -> None:
        async with rig_factory(datas, read_memory=READ_MEMORY, write_behind=0) as rig:
            images = list(rig.images.values())
            most = 0
            for chunk in range(CHUNKS):  # one sequential reader per image, interleaved
                for name, data in datas.items():
                    got = await rig.image(name).read(chunk * CS, CS)
                    assert bytes(got) == data[chunk * CS : (chunk + 1) * CS], (name, chunk)
                    # as each image's maps count them (fresh.py), whatever they share
                    most = max(most, sum(image._fresh._bytes for image in images))
                await trio.sleep(0)
            assert 0 < most <= READ_MEMORY
            for name in datas:
                fetched = Counter(chunk_reads(rig.source(name), CS))
                assert max(fetched.values()) == 1, (name, fetched.most_common(3))

    trio.run(main)
