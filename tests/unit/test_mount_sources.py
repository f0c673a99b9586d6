"""How a mount pairs its cache with the base's listing, at mount and when the base comes back:
one rule for both (base_images._listed_once). A real cache store in tmp_path, memory base images."""

from __future__ import annotations

from pathlib import Path

import trio

from corfs.base.memory import MemoryImage
from corfs.base_images import attach_sources, match_images
from corfs.config import MountConfig
from corfs.fetcher import Fetcher, RetryPolicy
from corfs.image import Image
from corfs.store import CacheStore

SIZE = 1 << 20


def _twice() -> list[MemoryImage]:
    """Two listed objects of the same name and size: which one is the image is unknowable."""
    return [
        MemoryImage("disk.raw", bytearray(b"a" * SIZE), identity="first"),
        MemoryImage("disk.raw", bytearray(b"b" * SIZE), identity="second"),
    ]


def test_a_name_listed_twice_is_paired_with_neither_object(tmp_path: Path) -> None:
    """At mount the first was kept (the second refused as 'changed'), on reconnection the
    last: the cache filled from one object went on from the other."""
    store = CacheStore.open(str(tmp_path / "cache"))
    config = MountConfig(base_url="memory://", cache_dir=str(tmp_path / "cache"),
                         mountpoint=str(tmp_path / "mnt"))
    try:
        matched = match_images(store, _twice(), config, "memory://", {})
        assert matched == [] and store.record_of("disk.raw") is None

        # A cache made when the base listed the name once, then reconnected to a base that
        # lists it twice: the image stays without a source.
        once = MemoryImage("disk.raw", bytearray(b"a" * SIZE), identity="first")
        ((record, source),) = match_images(store, [once], config, "memory://", {})

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                image = Image(record, store, Fetcher(RetryPolicy(io_timeout=1.0)), None,
                              nursery)
                attach_sources([image], _twice()[::-1])  # the cached one listed last
                assert image.source is None
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        store.close()
