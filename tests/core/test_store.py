"""The chunk store: never mark before durable (rows only after fdatasync, failed commits keep
their marks), zero chunks stay holes, the lock, records and data files, the digest index, and
the trio thread never waiting for a commit."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest
import trio

from corfs import cache_files
from corfs.digest import chunk_digest
from corfs.errors import CacheError, CacheLocked, UsageError
from corfs.store import CacheStore, ChunkState
from tests.core.rig import CS, committed_states, random_bytes, st_allocated


def test_read_marks_are_not_committed_until_commit(tmp_path, rig_factory) -> None:
    data = random_bytes(4 * CS)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            assert await image.read(CS, 10) == data[CS : CS + 10]
            await image.wait_stored()
            assert image.is_local(1)
            # In memory it is local; a fresh process must not see it yet.
            assert committed_states(rig.cache_dir, "a") == {}
            assert rig.store.pending_count == 1
            await rig.store.commit()
            assert rig.store.pending_count == 0
            rows = committed_states(rig.cache_dir, "a")
            assert rows == {1: (ChunkState.CLEAN, chunk_digest(data[CS : 2 * CS]))}
            # ... and the bytes behind the row are right on disk.
            with open(rig.store.data_path("a"), "rb") as f:
                f.seek(CS)
                assert f.read(CS) == data[CS : 2 * CS]

    trio.run(main)


def test_failed_fdatasync_stops_recording(tmp_path, rig_factory, monkeypatch) -> None:
    """Linux reports a writeback error once and then calls the pages clean: a retried
    fdatasync could succeed without the bytes on disk. So after one failure nothing more is
    recorded local, ever, in this mount; what was committed before stays."""
    data = random_bytes(4 * CS)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(3 * CS, CS)
            await image.wait_stored()
            await rig.store.commit()  # chunk 3 is durable before the failure
            await image.read(0, 3 * CS)
            await image.wait_stored()
            assert rig.store.pending_count == 3
            real_fdatasync = os.fdatasync
            calls = []

            def failing_once(fd: int) -> None:
                calls.append(fd)
                if len(calls) == 1:
                    raise OSError(errno.EIO, "injected EIO")
                real_fdatasync(fd)

            monkeypatch.setattr(os, "fdatasync", failing_once)
            with pytest.raises(CacheError):
                await rig.store.commit()
            # Chunks 0-2, filled since the last good commit, are absent again (their bytes may
            # be lost with the failed writeback): a write to one fails, one to chunk 3 goes on.
            assert [image.is_local(i) for i in range(4)] == [True] * 4
            with pytest.raises(CacheError, match="restart the mount"):
                await image.write(0, b"x" * CS)
            assert [image.is_local(i) for i in range(4)] == [False] * 3 + [True]
            await image.write(3 * CS, b"x" * CS)
            with pytest.raises(CacheError, match="restart the mount"):
                await rig.store.commit()  # no retry: it could "succeed" with the data lost
            with pytest.raises(CacheError):
                await image.fsync()  # the client's flush fails (EIO), never a false success
            with pytest.raises(CacheError):
                rig.store.commit_sync()
            assert len(calls) == 1
            rows = committed_states(rig.cache_dir, "a")
            # chunk 3 was made dirty before its write (dirty_first.py): true whatever lands
            assert rows == {3: (ChunkState.DIRTY, None)}

    trio.run(main)


def test_enospc_on_sync_is_cache_full(tmp_path, rig_factory, monkeypatch) -> None:
    from corfs.errors import CacheFull

    async def main() -> None:
        async with rig_factory({"a": random_bytes(CS)}) as rig:
            await rig.image("a").read(0, 1)
            await rig.image("a").wait_stored()

            def full(fd: int) -> None:
                raise OSError(errno.ENOSPC, "no space")

            monkeypatch.setattr(os, "fdatasync", full)
            with pytest.raises(CacheFull) as info:
                await rig.store.commit()
            assert info.value.errno == errno.ENOSPC
            assert rig.store.sync_failure is not None  # no retry: see the test above

    trio.run(main)


def test_zero_chunks_are_recorded_zero_and_stay_sparse(tmp_path, rig_factory) -> None:
    big = 64 * 1024
    data = bytes(3 * big) + random_bytes(big) + bytes(2 * big)

    async def main() -> None:
        async with rig_factory({"z": data}, chunk_size=big) as rig:
            image = rig.image("z")
            assert await image.read(0, len(data)) == data
            await image.wait_stored()
            await rig.store.commit()
            states = [image.state_of(i) for i in range(6)]
            assert states == [ChunkState.ZERO] * 3 + [ChunkState.CLEAN] + [ChunkState.ZERO] * 2
            rows = committed_states(rig.cache_dir, "z")
            assert {i: s for i, (s, _) in rows.items()} == {
                0: ChunkState.ZERO, 1: ChunkState.ZERO, 2: ChunkState.ZERO,
                3: ChunkState.CLEAN, 4: ChunkState.ZERO, 5: ChunkState.ZERO,
            }  # fmt: skip
            assert all(d is None for i, (_, d) in rows.items() if i != 3)
            # Only the one data chunk takes space (plus a little filesystem slack).
            allocated = st_allocated(rig.store.data_path("z"))
            assert allocated <= big + 16 * 1024, allocated
            assert rig.data_file("z") == data

    trio.run(main)


def test_zero_chunk_read_alone_allocates_nothing(tmp_path, rig_factory) -> None:
    data = random_bytes(CS) + bytes(4 * CS)

    async def main() -> None:
        async with rig_factory({"z": data}) as rig:
            assert await rig.image("z").read(2 * CS, CS) == bytes(CS)
            await rig.image("z").wait_stored()
            await rig.store.commit()
            assert st_allocated(rig.store.data_path("z")) == 0
            assert committed_states(rig.cache_dir, "z") == {2: (ChunkState.ZERO, None)}

    trio.run(main)


def test_lock_keeps_a_second_store_off(tmp_path) -> None:
    first = CacheStore.open(str(tmp_path / "c"))
    try:
        with pytest.raises(CacheLocked):
            CacheStore.open(str(tmp_path / "c"))
        assert cache_files.is_locked(str(tmp_path / "c"))
        CacheStore.open(str(tmp_path / "c"), lock=False).close()
    finally:
        first.close()
    assert not cache_files.is_locked(str(tmp_path / "c"))
    CacheStore.open(str(tmp_path / "c")).close()


def test_open_refuses_non_cache(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        CacheStore.open(str(tmp_path / "file"))
    with pytest.raises(UsageError):
        CacheStore.open(str(tmp_path / "nothing"), create=False)


def test_records_and_drop(tmp_path) -> None:
    store = CacheStore.open(str(tmp_path / "c"))
    try:
        rec = store.create_image("a/b c", 10 * CS + 5, CS, "v1", "memory://")
        assert store.record_of("a/b c") == rec
        assert os.path.getsize(store.data_path("a/b c")) == 10 * CS + 5
        data_dir = os.path.dirname(store.data_path("a/b c"))  # through the held CACHE
        assert os.path.realpath(data_dir) == str(tmp_path / "c" / "data")
        states, dirty = store.load_states(rec)
        assert states == bytearray(11) and dirty == 0
        store.record("a/b c", 3, ChunkState.DIRTY)
        store.record("a/b c", 4, ChunkState.CLEAN, b"d" * 16)
        store.commit_sync()
        states, dirty = store.load_states(rec)
        assert states[3] == ChunkState.DIRTY and states[4] == ChunkState.CLEAN and dirty == 1
        assert store.find_by_digest(b"d" * 16) == ("a/b c", 4)
        assert store.digests_of("a/b c") == {4: b"d" * 16}
        store.drop_image("a/b c")
        assert store.record_of("a/b c") is None
        assert not os.path.exists(store.data_path("a/b c"))
        assert store.find_by_digest(b"d" * 16) is None
    finally:
        store.close()


def test_marking_absent_deletes_the_row(tmp_path) -> None:
    store = CacheStore.open(str(tmp_path / "c"))
    try:
        rec = store.create_image("a", 4 * CS, CS, "v1", "memory://")
        store.record("a", 1, ChunkState.CLEAN, b"x" * 16)
        store.commit_sync()
        store.record("a", 1, ChunkState.ABSENT)
        store.commit_sync()
        assert store.load_states(rec)[0] == bytearray(4)
    finally:
        store.close()


def test_digest_index_follows_marks_and_survives_a_reopen(tmp_path) -> None:
    d, e = b"d" * 16, b"e" * 16
    store = CacheStore.open(str(tmp_path / "c"))
    try:
        store.create_image("a", 4 * CS, CS, "v1", "memory://")
        store.create_image("b", 4 * CS, CS, "v1", "memory://")
        store.record("a", 0, ChunkState.CLEAN, d)
        store.record("b", 1, ChunkState.CLEAN, e)
        assert store.find_by_digest(d) == ("a", 0)
        store.record("a", 0, ChunkState.DIRTY)  # written through the mount: other bytes now
        assert store.find_by_digest(d) is None
        store.record("a", 2, ChunkState.CLEAN, d)
        store.record("a", 2, ChunkState.ABSENT)  # forgotten (failed a scrub)
        assert store.find_by_digest(d) is None
        store.record("a", 3, ChunkState.CLEAN, d)
        assert store.find_by_digest(d) == ("a", 3)
        store.commit_sync()
    finally:
        store.close()
    store = CacheStore.open(str(tmp_path / "c"))
    try:
        assert store.find_by_digest(d) == ("a", 3) and store.find_by_digest(e) == ("b", 1)
        store.create_image("a", 4 * CS, CS, "v2", "memory://")  # a new version: rows gone
        assert store.find_by_digest(d) is None
        store.drop_image("b")
        assert store.find_by_digest(e) is None
    finally:
        store.close()


def test_the_trio_thread_never_waits_for_a_commit(rig_factory) -> None:
    """A commit stuck in its SQL holds the store's database lock (as a slow WAL fsync would;
    here another connection holds the write lock, so BEGIN IMMEDIATE waits out busy_timeout,
    5 s). Meanwhile a dedup lookup, a dedup fill and a local read all complete."""
    shared = random_bytes(CS, seed=42)
    a = shared + random_bytes(CS, seed=1)
    b = random_bytes(CS, seed=2) + shared

    async def main() -> None:
        async with rig_factory({"a": a, "b": b}, published=True) as rig:
            store = rig.store
            await rig.image("a").read(0, 2 * CS)
            await rig.image("a").wait_stored()
            await store.commit()
            await rig.image("b").read(0, 1)  # a mark for the commit to write
            await rig.image("b").wait_stored()
            blocker = sqlite3.connect(os.path.join(store.cache_dir, "state.db"))
            blocker.isolation_level = None
            blocker.execute("BEGIN IMMEDIATE")
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store.commit)
                    with trio.fail_after(5):
                        while not store._db_lock.locked():  # the commit is in its SQL
                            await trio.sleep(0.001)
                    with trio.fail_after(2):
                        assert store.find_by_digest(chunk_digest(shared)) == ("a", 0)
                        assert await rig.image("b").read(CS, CS) == shared  # copied from a
                        await rig.image("b").wait_stored()
                        assert await rig.image("a").read(CS, 100) == a[CS : CS + 100]
                        await rig.image("a").wait_stored()
                    assert rig.fetcher.dedup_hits == 1
                    assert store._db_lock.locked(), "the commit was not held meanwhile"
                    blocker.execute("ROLLBACK")
            finally:
                blocker.close()
            assert sorted(committed_states(rig.cache_dir, "b")) == [0]

    trio.run(main)


def test_a_cache_whose_database_is_opened_elsewhere_is_refused(tmp_path, monkeypatch) -> None:
    """SQLite resolves the held path it is given to the directory's name and opens by name:
    another user who owns a parent of CACHE could swap another directory in between. Here
    SQLite is given another cache's state.db, as that swap would: the open is refused, and a
    plain open still checks out."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    CacheStore.open(str(other)).close()
    CacheStore.open(str(mine)).close()
    connect = sqlite3.connect

    def swapped(path: str, *args, **kw):
        return connect(str(other / "state.db"), *args, **kw)

    monkeypatch.setattr(sqlite3, "connect", swapped)
    with pytest.raises(UsageError, match="moved while it was opened"):
        CacheStore.open(str(mine))
    monkeypatch.setattr(sqlite3, "connect", connect)
    CacheStore.open(str(mine)).close()
