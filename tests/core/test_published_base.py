"""The published-image adapter over real stores (in-memory and directory): listing, reads,
zero chunks, concurrency, bad manifests and damaged chunk objects."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
import zstandard

from corfs.base import BaseImage, open_base
from corfs.base.memory import MemoryBase
from corfs.base.published import decompress_chunk, with_published_images
from corfs.digest import chunk_digest, is_zero
from corfs.errors import BaseCorrupt, BaseNotFound
from corfs.manifest import Manifest, chunk_key, manifest_key
from tests.unit.test_manifest import BAD

CS = 4096


def put_published(base: MemoryBase, name: str, data: bytes, cs: int = CS) -> Manifest:
    """Publish `data` into the memory base by hand (the format, not corfs.publish)."""
    digests: list[bytes | None] = []
    for off in range(0, len(data), cs):
        chunk = data[off : off + cs]
        if is_zero(chunk):
            digests.append(None)
            continue
        digest = chunk_digest(chunk)
        digests.append(digest)
        base.objects[chunk_key(digest)] = zstandard.ZstdCompressor().compress(chunk)
    manifest = Manifest(name=name, size=len(data), chunk_size=cs, digests=tuple(digests))
    put_manifest(base, name, manifest.to_json())
    return manifest


def put_manifest(base: MemoryBase, name: str, raw: bytes) -> None:
    from corfs.base.memory import MemoryImage

    key = manifest_key(name)
    base.add(MemoryImage(key, bytearray(raw), identity=f"v-{chunk_digest(raw).hex()}"))
    base.objects[key] = raw


def sample(seed: int = 0) -> bytes:
    rnd = os.urandom
    return rnd(CS) + bytes(2 * CS) + rnd(3 * CS) + rnd(100) if seed == 0 else rnd(5 * CS + 7)


async def images_of(store) -> dict[str, BaseImage]:
    return {i.name: i for i in await store.list_images()}


def test_listing_reads_and_zero_chunks_are_not_fetched() -> None:
    async def main() -> None:
        inner = MemoryBase({"plain.raw": b"raw bytes", "index.json": b'{"images": []}'})
        data = sample()
        manifest = put_published(inner, "pub.raw", data)
        store = await with_published_images(inner)
        images = await images_of(store)
        assert sorted(images) == ["plain.raw", "pub.raw"]  # manifest and index hidden
        assert images["plain.raw"].layout is None
        pub = images["pub.raw"]
        assert pub.size == len(data)
        assert pub.layout is not None and pub.layout.digests == manifest.digests
        assert pub.layout.chunk_size == CS
        assert pub.identity.startswith("manifest:") and len(pub.identity) == 9 + 32

        inner.object_reads.clear()
        assert bytes(await pub.read(CS, 2 * CS)) == bytes(2 * CS)
        assert inner.object_reads == []  # zero chunks: zeros, no fetch
        assert bytes(await pub.read(0, len(data))) == data
        assert len(inner.object_reads) == 5  # the 5 non-zero chunks only
        assert bytes(await pub.read(6 * CS, 100)) == data[6 * CS :]  # short last chunk
        assert bytes(await pub.read(CS - 10, 30)) == data[CS - 10 : CS + 20]  # unaligned
        assert await pub.read(0, 0) == b""
        with pytest.raises(ValueError):
            await pub.read(0, len(data) + 1)

        assert await store.read_object(chunk_key(manifest.digests[0]), 1 << 20) == inner.objects[
            chunk_key(manifest.digests[0])
        ]
        await store.aclose()

    trio.run(main)


class SlowObjects(MemoryBase):
    """A memory base whose object reads take a while, counting how many run at once."""

    in_flight = 0
    max_in_flight = 0

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(0.05)
            return await super().read_object(key, max_bytes)
        finally:
            self.in_flight -= 1


def test_chunks_of_one_read_are_fetched_concurrently() -> None:
    async def main() -> None:
        inner = SlowObjects()
        data = os.urandom(6 * CS)
        put_published(inner, "pub.raw", data)
        pub = (await images_of(await with_published_images(inner)))["pub.raw"]
        start = trio.current_time()
        assert bytes(await pub.read(0, len(data))) == data
        assert inner.max_in_flight == 6
        assert trio.current_time() - start < 0.2

    trio.run(main)


def test_published_shadows_raw_and_identity_follows_manifest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        inner = MemoryBase({"disk.raw": b"the raw one"})
        put_published(inner, "disk.raw", sample())
        store = await with_published_images(inner)
        with caplog.at_level(logging.INFO):
            first = (await images_of(store))["disk.raw"]
        assert first.layout is not None
        assert "shadows" in caplog.text
        inner.object_reads.clear()
        assert (await images_of(store))["disk.raw"] is first  # unchanged manifest: reused
        assert inner.object_reads == []
        put_published(inner, "disk.raw", sample(1))
        second = (await images_of(store))["disk.raw"]
        assert second.identity != first.identity and second.size == 5 * CS + 7

    trio.run(main)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_leaves_that_image_out_with_one_warning(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> dict[str, BaseImage]:
        inner = MemoryBase({"plain.raw": b"x"})
        put_published(inner, "good.raw", sample())
        put_manifest(inner, "disk.raw", BAD[case])
        return await images_of(await with_published_images(inner))

    with caplog.at_level(logging.WARNING):
        images = trio.run(main)
    assert sorted(images) == ["good.raw", "plain.raw"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'disk.raw'" in warnings[0].getMessage()


def test_manifest_listed_but_gone_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> dict[str, BaseImage]:
        inner = MemoryBase()
        put_published(inner, "good.raw", sample())
        put_published(inner, "gone.raw", sample())
        del inner.objects[manifest_key("gone.raw")]
        return await images_of(await with_published_images(inner))

    with caplog.at_level(logging.WARNING):
        assert sorted(trio.run(main)) == ["good.raw"]
    assert "'gone.raw'" in caplog.text


def damaged_read(damage) -> bytes | BaseCorrupt:
    """Publish, damage the object of chunk 0 with `damage(objects, key, chunk)`, read chunk 0:
    returns the bytes read, or the BaseCorrupt raised."""

    async def main() -> bytes | BaseCorrupt:
        inner = MemoryBase()
        data = os.urandom(CS) + os.urandom(CS)
        manifest = put_published(inner, "pub.raw", data)
        key = chunk_key(manifest.digests[0])
        damage(inner.objects, key, data[:CS], chunk_key(manifest.digests[1]))
        pub = (await images_of(await with_published_images(inner)))["pub.raw"]
        try:
            got = bytes(await pub.read(0, CS))
        except BaseCorrupt as exc:
            return exc
        assert chunk_digest(got) != manifest.digests[0], "a damaged object read as right"
        return got

    return trio.run(main)


def _flip(objects: dict, key: str, chunk: bytes, other: str) -> None:
    packed = bytearray(objects[key])
    packed[len(packed) // 2] ^= 0x40
    objects[key] = bytes(packed)


def _truncate(objects: dict, key: str, chunk: bytes, other: str) -> None:
    objects[key] = objects[key][: len(objects[key]) // 2]


def _swap(objects: dict, key: str, chunk: bytes, other: str) -> None:
    objects[key] = objects[other]


def _bomb(objects: dict, key: str, chunk: bytes, other: str) -> None:
    objects[key] = zstandard.ZstdCompressor().compress(bytes(256 << 20))


def _bomb_without_size(objects: dict, key: str, chunk: bytes, other: str) -> None:
    comp = zstandard.ZstdCompressor(write_content_size=False)
    objects[key] = comp.compress(bytes(64 << 20))


def _short(objects: dict, key: str, chunk: bytes, other: str) -> None:
    objects[key] = zstandard.ZstdCompressor().compress(chunk[:-1])


def _long(objects: dict, key: str, chunk: bytes, other: str) -> None:
    objects[key] = zstandard.ZstdCompressor().compress(chunk + b"x")


def _not_zstd(objects: dict, key: str, chunk: bytes, other: str) -> None:
    objects[key] = chunk


def _empty(objects: dict, key: str, chunk: bytes, other: str) -> None:
    objects[key] = b""


@pytest.mark.parametrize(
    "damage",
    [_flip, _truncate, _swap, _bomb, _bomb_without_size, _short, _long, _not_zstd, _empty],
    ids=lambda f: f.__name__.strip("_"),
)
def test_damaged_chunk_object_is_never_a_right_looking_answer(damage) -> None:
    result = damaged_read(damage)
    if damage in (_bomb, _bomb_without_size, _short, _long, _truncate, _not_zstd, _empty):
        assert isinstance(result, BaseCorrupt), result
    if damage is _swap:
        assert isinstance(result, bytes)  # the digest check in the fetcher catches it


def test_missing_chunk_object_raises_not_found() -> None:
    async def main() -> None:
        inner = MemoryBase()
        manifest = put_published(inner, "pub.raw", os.urandom(2 * CS))
        del inner.objects[chunk_key(manifest.digests[1])]
        pub = (await images_of(await with_published_images(inner)))["pub.raw"]
        assert len(await pub.read(0, CS)) == CS
        with pytest.raises(BaseNotFound):
            await pub.read(0, 2 * CS)

    trio.run(main)


def test_decompress_chunk_bounds_output() -> None:
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(10 * CS))
    with pytest.raises(BaseCorrupt, match="x.zst"):
        decompress_chunk(packed, CS, "x.zst")
    assert decompress_chunk(zstandard.ZstdCompressor().compress(b"abc"), 3, "k") == b"abc"


def test_open_base_dir_mixes_raw_and_published(tmp_path: Path) -> None:
    from corfs.publish import run_publish

    src = tmp_path / "src"
    src.mkdir()
    data = sample()
    (src / "pub.raw").write_bytes(data)
    base = tmp_path / "base"
    run_publish([str(src / "pub.raw")], str(base), chunk_size=CS, level=3, jobs=1,
                progress=False, endpoint_url=None, region=None, profile=None)
    (base / "plain.raw").write_bytes(b"plain")

    async def main() -> None:
        store = await open_base(str(base))
        images = await images_of(store)
        assert sorted(images) == ["plain.raw", "pub.raw"]
        assert bytes(await images["plain.raw"].read(0, 5)) == b"plain"
        assert bytes(await images["pub.raw"].read(0, len(data))) == data
        await store.aclose()

    trio.run(main)


def test_two_listings_at_once_read_each_manifest_once() -> None:
    """A forget and a reconnect may list the base at the same moment: one listing at a time,
    so the second finds the first's images (each would read and parse every manifest, and
    each take a whole --manifest-memory)."""

    async def main() -> None:
        inner = MemoryBase()
        for n in range(3):
            put_published(inner, f"p{n}.raw", sample(1))
        store = await with_published_images(inner)
        results: list[list[str]] = []

        async def listing() -> None:
            results.append(sorted(i.name for i in await store.list_images()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listing)
            nursery.start_soon(listing)
        assert results == [["p0.raw", "p1.raw", "p2.raw"]] * 2
        manifests = [key for key in inner.object_reads if key.endswith(".corfs.json")]
        assert sorted(manifests) == [manifest_key(f"p{n}.raw") for n in range(3)]

    trio.run(main)
