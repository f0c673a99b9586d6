"""One contract, every BaseStore: listing, identity, exact reads, objects, errors, change
detection and concurrency."""

from __future__ import annotations

import random

import pytest
import trio

from corfs.base import BaseImage, BaseStore, open_base
from corfs.errors import BaseChanged, BaseNotFound

MiB = 1 << 20


def run(fn, *args):
    return trio.run(fn, *args)


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def opened(backend) -> tuple[BaseStore, dict[str, BaseImage]]:
    store = await open_base(backend.url, backend.options)
    return store, {img.name: img for img in await store.list_images()}


def test_lists_direct_children_with_sizes(backend) -> None:
    backend.put("a.raw", pattern(3 * MiB + 123, 1))
    backend.put("empty.raw", b"")
    backend.put("one.img", b"x")
    backend.put("sub/deeper.raw", b"not an image of this base")

    async def main() -> None:
        store, images = await opened(backend)
        try:
            assert sorted(images) == ["a.raw", "empty.raw", "one.img"]
            assert images["a.raw"].size == 3 * MiB + 123
            assert images["empty.raw"].size == 0
            assert images["one.img"].size == 1
            assert all(img.identity for img in images.values())
            assert "testing" not in store.description
        finally:
            await store.aclose()

    run(main)


def test_identity_stable_then_changes_on_replace(backend) -> None:
    backend.put("a.raw", pattern(MiB, 1))
    backend.put("b.raw", pattern(1000, 2))

    async def main() -> None:
        store, first = await opened(backend)
        try:
            second = {img.name: img for img in await store.list_images()}
            assert {n: i.identity for n, i in first.items()} == {
                n: i.identity for n, i in second.items()
            }
            backend.put("a.raw", pattern(MiB, 3))  # same size, other bytes
            backend.put("b.raw", pattern(2000, 2))  # other size
            third = {img.name: img for img in await store.list_images()}
            assert third["a.raw"].identity != first["a.raw"].identity
            assert third["b.raw"].identity != first["b.raw"].identity
            assert third["b.raw"].size == 2000
            assert await third["a.raw"].read(0, MiB) == pattern(MiB, 3)
        finally:
            await store.aclose()

    run(main)


def test_reads_equal_the_file(backend) -> None:
    size = 4 * MiB + 4096 + 17  # a short last chunk at any power-of-two chunk size
    data = pattern(size, 7)
    backend.put("disk.raw", data)
    backend.put("empty.raw", b"")
    rng = random.Random(5)
    ranges = [(0, size), (0, 1), (size - 1, 1), (MiB - 1, 2), (MiB, MiB), (4 * MiB, size - 4 * MiB)]
    ranges += [(o, rng.randint(1, min(2 * MiB, size - o))) for o in rng.sample(range(size), 20)]

    async def main() -> None:
        store, images = await opened(backend)
        try:
            disk = images["disk.raw"]
            for offset, length in ranges:
                got = await disk.read(offset, length)
                assert len(got) == length, (offset, length)
                assert bytes(got) == data[offset : offset + length], (offset, length)
            assert bytes(await images["empty.raw"].read(0, 0)) == b""
        finally:
            await store.aclose()

    run(main)


def test_concurrent_reads(backend) -> None:
    size = 8 * MiB
    data = pattern(size, 11)
    backend.put("disk.raw", data)
    rng = random.Random(3)
    ranges = [(rng.randrange(0, size - MiB), rng.choice([4096, 65536, MiB])) for _ in range(48)]

    async def main() -> None:
        store, images = await opened(backend)
        results: dict[int, bytes] = {}

        async def one(i: int, offset: int, length: int) -> None:
            results[i] = bytes(await images["disk.raw"].read(offset, length))

        try:
            async with trio.open_nursery() as nursery:
                for i, (offset, length) in enumerate(ranges):
                    nursery.start_soon(one, i, offset, length)
        finally:
            await store.aclose()
        for i, (offset, length) in enumerate(ranges):
            assert results[i] == data[offset : offset + length]

    run(main)


def test_read_object(backend) -> None:
    backend.put("disk.raw", b"d" * 10)
    backend.put_object("chunks/ab/abcdef.zst", b"compressed bytes")

    async def main() -> None:
        store, images = await opened(backend)
        try:
            assert list(images) == ["disk.raw"]
            assert await store.read_object("chunks/ab/abcdef.zst", 100) == b"compressed bytes"
            assert await store.read_object("disk.raw", 100) == b"d" * 10
            with pytest.raises(BaseNotFound):
                await store.read_object("chunks/ab/missing.zst", 100)
        finally:
            await store.aclose()

    run(main)


def test_missing_base(backend) -> None:
    async def main() -> None:
        with pytest.raises(backend.missing_error):
            await open_base(backend.missing_url(), backend.options)
        single = backend.single_url("no-such-image.raw")
        if single is not None:
            with pytest.raises(BaseNotFound):
                await open_base(single, backend.options)

    run(main)


def test_single_image_base(backend) -> None:
    data = pattern(MiB + 5, 13)
    backend.put("disk.raw", data)
    backend.put("other.raw", b"other")
    url = backend.single_url("disk.raw")
    if url is None:
        pytest.skip(f"{backend.kind} has no single-image form")

    async def main() -> None:
        store = await open_base(url, backend.options)
        try:
            images = await store.list_images()
            assert [(i.name, i.size) for i in images] == [("disk.raw", MiB + 5)]
            assert bytes(await images[0].read(MiB, 5)) == data[MiB:]
            assert await store.read_object("other.raw", 100) == b"other"
        finally:
            await store.aclose()

    run(main)


def test_removed_image_is_not_found(backend) -> None:
    backend.put("disk.raw", pattern(1000, 1))

    async def main() -> None:
        store, images = await opened(backend)
        try:
            backend.remove("disk.raw")
            with pytest.raises(BaseNotFound):
                await images["disk.raw"].read(0, 100)
        finally:
            await store.aclose()

    run(main)


@pytest.mark.parametrize("new_size", [MiB, MiB // 2, 2 * MiB])
def test_changed_image_raises_base_changed(backend, new_size: int) -> None:
    old = pattern(MiB, 21)
    backend.put("disk.raw", old)

    async def main() -> None:
        store, images = await opened(backend)
        disk = images["disk.raw"]
        try:
            assert bytes(await disk.read(0, 4096)) == old[:4096]
            backend.put("disk.raw", pattern(new_size, 22))
            for offset, length in [(0, 4096), (4096, 65536), (MiB // 2 - 10, 10)]:
                with pytest.raises(BaseChanged):
                    await disk.read(offset, length)
        finally:
            await store.aclose()

    run(main)
