"""Cache scrub (`corfs verify`) driven directly on a real CacheStore, and the two local-cache
lookups a scrub interacts with: forgetting a chunk (the running mount's side of verify) and
dedup from chunks written but not yet committed. No kernel: see tests/fuse/test_verify.py for
the same through real mounts and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corfs import scrub
from corfs.errors import ControlError, UsageError
from corfs.store import CacheStore, ChunkState
from tests.core.conftest import CS, chunk_reads, committed_states, random_bytes, run_with_mock_clock

run = run_with_mock_clock


def damage(path: str, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)


def test_verify_finds_bad_clean_and_zero_chunks_and_forgets_only_them(
    tmp_path: Path, rig_factory
) -> None:
    data = random_bytes(2 * CS, seed=1) + bytes(CS) + random_bytes(2 * CS, seed=2)
    cache = tmp_path / "cache"

    async def fill() -> None:
        async with rig_factory({"a": data}, published=True, cache_dir=cache) as rig:
            assert await rig.image("a").read(0, len(data)) == data
            await rig.store.commit()

    run(fill)
    path = str(cache / "data" / "a")
    damage(path, 1 * CS + 100)  # clean chunk 1
    damage(path, 2 * CS + 5)  # zero chunk 2 (a hole now holding a byte)

    (report,) = scrub.verify_cache(str(cache))
    assert (report.image, report.checked, report.bad, report.bad_chunks) == ("a", 5, 2, [1, 2])
    rows = committed_states(cache, "a")
    assert sorted(rows) == [0, 3, 4]
    assert rows[0][0] == ChunkState.CLEAN

    # A second scrub checks what is left and finds nothing.
    (again,) = scrub.verify_cache(str(cache), "a")
    assert (again.checked, again.bad) == (3, 0)

    async def refill() -> None:
        async with rig_factory({"a": data}, published=True, cache_dir=cache) as rig:
            image = rig.image("a")
            assert not image.is_local(1) and not image.is_local(2)
            assert await image.read(0, len(data)) == data
            assert chunk_reads(rig.source("a"), CS) == [1]  # chunk 2 is zero: never fetched

    run(refill)
    assert scrub.verify_cache(str(cache))[0].bad == 0


def test_verify_unknown_image_is_a_usage_error(tmp_path: Path, rig_factory) -> None:
    cache = tmp_path / "cache"

    async def fill() -> None:
        async with rig_factory({"a": random_bytes(CS)}, cache_dir=cache) as rig:
            await rig.image("a").read(0, 1)
            await rig.store.commit()

    run(fill)
    with pytest.raises(UsageError, match="no image 'b'"):
        scrub.verify_cache(str(cache), "b")


def test_verify_skips_dirty_chunks(tmp_path: Path, rig_factory) -> None:
    """A written chunk has no base digest to check against: it is never forgotten."""
    cache = tmp_path / "cache"

    async def fill() -> None:
        async with rig_factory({"a": random_bytes(2 * CS)}, cache_dir=cache) as rig:
            await rig.image("a").write(0, b"x" * CS)
            await rig.image("a").read(CS, CS)
            await rig.store.commit()

    run(fill)
    (report,) = scrub.verify_cache(str(cache))
    assert (report.checked, report.bad) == (1, 0)
    assert committed_states(cache, "a")[0][0] == ChunkState.DIRTY


def test_forget_chunk_only_forgets_clean_chunks_and_a_read_refetches(rig_factory) -> None:
    data = random_bytes(3 * CS, seed=5)

    async def main() -> None:
        async with rig_factory({"a": data}, published=True) as rig:
            image = rig.image("a")
            await image.read(0, len(data))
            await image.write(2 * CS, b"y")
            assert image.forget_chunk(1) is True
            assert image.forget_chunk(1) is False  # already absent
            assert image.forget_chunk(2) is False  # dirty: keep the user's write
            assert not image.is_local(1) and image.state_of(2) == ChunkState.DIRTY
            os.pwrite(rig.store.data_fd("a"), b"\0" * 10, CS)  # the bad bytes forget hid
            assert await image.read(CS, CS) == data[CS : 2 * CS]
            assert chunk_reads(rig.source("a"), CS).count(1) == 2

    run(main)


def test_dedup_takes_a_chunk_written_but_not_yet_committed(rig_factory) -> None:
    """Image B finds A's copy of a shared chunk within the commit interval: the lookup sees
    marks still pending (and ones being committed), not only committed rows."""
    shared = random_bytes(CS, seed=42)
    a = random_bytes(CS, seed=1) + shared
    b = shared + random_bytes(CS, seed=3)

    async def main() -> None:
        async with rig_factory({"a": a, "b": b}, published=True) as rig:
            await rig.image("a").read(CS, CS)
            assert rig.store.pending_count > 0  # nothing committed yet
            assert await rig.image("b").read(0, CS) == shared
            assert chunk_reads(rig.source("b"), CS) == []
            assert rig.fetcher.dedup_hits == 1
            await rig.store.commit()
            assert committed_states(rig.cache_dir, "b")[0] == (
                ChunkState.CLEAN,
                rig.source("b").layout.digests[0],
            )

    run(main)


def test_dedup_lookup_never_takes_bad_bytes(rig_factory) -> None:
    """A pending clean mark whose bytes were damaged after it was written: the copy fails
    its digest check and the chunk is fetched from the base instead."""
    shared = random_bytes(CS, seed=42)

    async def main() -> None:
        async with rig_factory({"a": shared, "b": shared}, published=True) as rig:
            await rig.image("a").read(0, 1)
            os.pwrite(rig.store.data_fd("a"), b"bad", 0)
            assert await rig.image("b").read(0, CS) == shared
            assert chunk_reads(rig.source("b"), CS) == [0]
            assert rig.fetcher.dedup_hits == 0

    run(main)


def test_find_by_digest_sees_pending_committing_and_committed(tmp_path: Path) -> None:
    store = CacheStore.open(str(tmp_path / "c"))
    try:
        store.create_image("a", 2 * CS, CS, "id", "memory://")
        store.record("a", 0, ChunkState.CLEAN, b"d" * 16)
        assert store.find_by_digest(b"d" * 16) == ("a", 0)
        store.commit_sync()
        assert store.find_by_digest(b"d" * 16) == ("a", 0)
        store.record("a", 1, ChunkState.ZERO, None)
        assert store.find_by_digest(b"e" * 16) is None
    finally:
        store.close()


def test_verify_of_a_mounted_cache_sends_forgets_the_kernel_accepts(
    tmp_path: Path, monkeypatch
) -> None:
    """The forget command reaches the daemon as an xattr value, which the kernel refuses
    (E2BIG) above XATTR_SIZE_MAX (64 KiB): many bad chunks must go in several commands."""
    cache = str(tmp_path / "cache")
    count = 20_000
    store = CacheStore.open(cache)
    try:
        store.create_image("a", count * 512, 512, "id", "memory://")
        for index in range(count):
            store.record("a", index, ChunkState.CLEAN, b"\x01" * 16)  # the bytes are zeros
        store.commit_sync()
    finally:
        store.close()

    sent: list[int] = []

    def send_command(mountpoint: str, command: dict) -> None:
        if len(json.dumps(command).encode()) > 65536:
            raise ControlError(f"{mountpoint} refused the command: Argument list too long")
        assert command["op"] == "forget" and command["image"] == "a"
        sent.extend(command["chunks"])

    monkeypatch.setattr(CacheStore, "is_locked", staticmethod(lambda cache_dir: True))
    monkeypatch.setattr(scrub.control, "send_command", send_command)
    (report,) = scrub.verify_cache(cache)
    assert report.bad == count
    assert sorted(sent) == list(range(count))


def test_forget_refuses_chunk_indexes_outside_the_image(rig_factory) -> None:
    import json

    from corfs.config import StreamConfig
    from corfs.control import Controller
    from corfs.errors import ControlError
    from corfs.stream import StreamWorker

    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = rig.image("a")
            await image.read(3 * CS, 1)
            controller = Controller(
                [image],
                StreamWorker([image], StreamConfig(enabled=False)),
                cache=rig.cache_dir,
                base="memory://",
                mountpoint="/nowhere",
            )
            for bad in (-1, 4):
                with pytest.raises(ControlError):
                    controller.apply(json.dumps({"op": "forget", "image": "a", "chunks": [bad]}))
            assert image.is_local(3)  # a negative index must not forget the last chunk

    run(main)
