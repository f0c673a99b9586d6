"""Cache scrub (`corfs verify`) driven directly on a real CacheStore, and the two local-cache
lookups a scrub interacts with: forgetting a chunk (the running mount's side of verify) and
dedup from chunks written but not yet committed. No kernel: see tests/fuse/test_verify.py for
the same through real mounts and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest.mock import ANY

import pytest

from corfs import cache_files, scrub
from corfs.base.memory import MemoryBase
from corfs.config import StreamConfig
from corfs.control import Controller
from corfs.digest import chunk_digest
from corfs.errors import ControlError, ForgetRefused, ImageHandedOver, UsageError
from corfs.store import CacheStore, ChunkState
from corfs.stream import StreamWorker
from tests.core.rig import CS, chunk_reads, committed_states, random_bytes, run_with_mock_clock
from tests.hostile import HostileServer

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
            await rig.image("a").wait_stored()
            await rig.store.commit()

    run(fill)
    path = str(cache / "data" / "a")
    damage(path, 1 * CS + 100)  # clean chunk 1
    damage(path, 2 * CS + 5)  # zero chunk 2 (a hole now holding a byte)

    base = MemoryBase({"a": data})
    base.images["a"].identity = "id-a"  # what the rig recorded: the base can refetch
    (report,) = scrub.verify_cache(str(cache), base=base)
    assert (report.image, report.checked, report.bad, report.bad_chunks) == ("a", 5, 2, [1, 2])
    assert report.kept is None
    rows = committed_states(cache, "a")
    assert sorted(rows) == [0, 3, 4]
    assert rows[0][0] == ChunkState.CLEAN

    # A second scrub checks what is left and finds nothing.
    (again,) = scrub.verify_cache(str(cache), "a", base=base)
    assert (again.checked, again.bad) == (3, 0)

    async def refill() -> None:
        async with rig_factory({"a": data}, published=True, cache_dir=cache) as rig:
            image = rig.image("a")
            assert not image.is_local(1) and not image.is_local(2)
            assert await image.read(0, len(data)) == data
            await image.wait_stored()
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
            await rig.image("a").wait_stored()
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


def test_no_forget_during_or_after_a_live_handoff(rig_factory) -> None:
    """A forgotten chunk would be refilled into the data file QEMU owns after a handoff: refused
    while one is under way (handoff.claim_for_handoff sets `handing_over`) and after it."""
    data = random_bytes(3 * CS, seed=6)

    async def main() -> None:
        async with rig_factory({"a": data}, published=True) as rig:
            image = rig.image("a")
            await image.read(0, len(data))
            await image.wait_stored()
            image.handing_over = True
            with pytest.raises(ControlError, match="handoff is under way"):
                image.forget_chunk(1)
            image.handing_over = False
            image.handed_over_to = "/vm/a.raw"
            with pytest.raises(ImageHandedOver):
                image.forget_chunk(1)
            assert image.is_local(1)

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
            await rig.image("a").wait_stored()
            assert rig.store.pending_count > 0  # nothing committed yet
            assert await rig.image("b").read(0, CS) == shared
            await rig.image("b").wait_stored()
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

    monkeypatch.setattr(cache_files, "is_locked", lambda cache_dir: True)
    monkeypatch.setattr(scrub, "_mount_serving", lambda cache_dir: "/nowhere")
    monkeypatch.setattr(scrub.control_client, "send_command", send_command)
    (report,) = scrub.verify_cache(cache)
    assert report.bad == count
    assert sorted(sent) == list(range(count))


def _controller(images, base=None) -> Controller:
    return Controller(
        images,
        StreamWorker(images, StreamConfig(enabled=False)),
        store=images[0].store,
        base="memory://",
        mountpoint="/nowhere",
        current_base=lambda: base,
    )


def _forget(controller: Controller, name: str, chunks: list[int]) -> list[str]:
    command = json.dumps({"op": "forget", "image": name, "chunks": chunks}).encode()
    return controller.apply(command)  # type: ignore[return-value]


def test_forget_refuses_chunk_indexes_outside_the_image(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = rig.image("a")
            await image.read(3 * CS, 1)
            await image.wait_stored()
            controller = _controller([image], rig.base)
            for bad in (-1, 4):
                with pytest.raises(ControlError):
                    await _forget(controller, "a", [bad])
            assert image.is_local(3)  # a negative index must not forget the last chunk

    run(main)


def test_forget_asks_the_base_at_forget_time_and_keeps_what_it_cannot_supply(
    rig_factory,
) -> None:
    """Forgetting a chunk whose base is gone or changed would destroy the only copy."""
    data = random_bytes(4 * CS, seed=9)

    async def main() -> None:
        async with rig_factory({"a": data, "b": data}) as rig:
            a, b = rig.image("a"), rig.image("b")
            await a.read(0, len(data))
            await a.wait_stored()
            await b.read(0, len(data))
            await b.wait_stored()
            controller = _controller([a, b], rig.base)

            rig.source("a").identity = "id-a-rewritten"  # changed in the base
            del rig.base.images["b"]  # removed from the base
            for name, image in (("a", a), ("b", b)):
                with pytest.raises(ForgetRefused, match=f"not forgetting chunks of {name}"):
                    await _forget(controller, name, [1])
                assert image.is_local(1)

            rig.source("a").identity = "id-a"  # as cached again: forget works as before
            assert await _forget(controller, "a", [1]) == ["a"]
            assert not a.is_local(1)

            # Served without a source (the base did not list it at mount): nothing to ask.
            orphan = _controller([b], base=None)
            b.source = None
            with pytest.raises(ForgetRefused, match="without its base"):
                await _forget(orphan, "b", [2])
            assert b.is_local(2)

    run(main)


def test_verify_of_an_unmounted_cache_keeps_bad_chunks_its_base_cannot_supply(
    tmp_path: Path, rig_factory
) -> None:
    data = random_bytes(3 * CS, seed=4)
    cache = tmp_path / "cache"

    async def fill() -> None:
        async with rig_factory({"a": data}, cache_dir=cache) as rig:
            await rig.image("a").read(0, len(data))
            await rig.image("a").wait_stored()
            await rig.store.commit()

    run(fill)
    damage(str(cache / "data" / "a"), CS + 7)
    for base in (MemoryBase({}), None):  # the image is gone; the recorded base cannot open
        (report,) = scrub.verify_cache(str(cache), base=base)
        assert (report.bad, report.bad_chunks) == (1, [1])
        assert report.kept is not None
        assert sorted(committed_states(cache, "a")) == [0, 1, 2]


def test_verify_of_an_unmounted_cache_never_contacts_a_remote_base(tmp_path: Path) -> None:
    """Offline, the mount's base options (auth header, CA, S3 endpoint) are unknown: opening
    the recorded URL without them could send credentials elsewhere. The base is not asked, the
    bad chunk is kept and the report says to verify through a mount."""
    server = HostileServer(lambda method, path, headers: None).start()
    try:
        cache = tmp_path / "cache"
        store = CacheStore.open(str(cache))
        store.create_image("a", CS, CS, "size=4096;etag=\"e\"", server.url)
        store.write_data("a", 0, random_bytes(CS, seed=5))
        store.record("a", 0, ChunkState.CLEAN, chunk_digest(random_bytes(CS, seed=6)))
        store.commit_sync()
        store.close()
        (report,) = scrub.verify_cache(str(cache))
        assert (report.bad, report.bad_chunks) == (1, [0])
        assert report.kept is not None and "remote" in report.kept
        assert server.requests == []
        assert committed_states(cache, "a") == {0: (ChunkState.CLEAN, ANY)}
    finally:
        server.stop()
