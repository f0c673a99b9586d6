"""fsync through the mount never reports success for data it did not sync, and a commit that
fails keeps every mark it did not write. `kill -9` tests cannot see these (the page cache
survives the daemon; a power cut does not), so they are checked here, at the store: which
fds were fdatasynced, in what order against the rows, and which rows a fresh process sees
after a commit whose SQL failed for real (a trigger in state.db makes the INSERT abort)."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Iterator

import pytest
import trio

from corfs.digest import chunk_digest
from corfs.errors import CacheError
from corfs.store import CacheStore, ChunkState
from tests.core.rig import CS, committed_states, random_bytes, wait_until


@contextlib.contextmanager
def failing_inserts(store: CacheStore) -> Iterator[None]:
    """Every INSERT into the chunk table aborts with an SQLite error while this is open: a
    real failure of the commit's SQL step after its fdatasync succeeded (another connection
    adds the trigger, as any writer of state.db could)."""
    db = sqlite3.connect(os.path.join(store.cache_dir, "state.db"))
    try:
        db.execute(
            "CREATE TRIGGER corfs_test_fail BEFORE INSERT ON chunks "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        db.commit()
        yield
    finally:
        db.execute("DROP TRIGGER IF EXISTS corfs_test_fail")
        db.commit()
        db.close()


def spy_fdatasync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The inode of every file fdatasynced from now on."""
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    return synced


async def committed_clean(rig, name: str, chunks: int):
    """Image `name` of `rig` with its first `chunks` chunks filled and committed clean."""
    image = rig.image(name)
    await image.read(0, chunks * CS)
    await image.wait_stored()
    await rig.store.commit()
    return image


def test_every_fsync_after_a_write_syncs_the_data_file(rig_factory, monkeypatch) -> None:
    """A second write to a chunk that is dirty already records no new mark: the fsync after it
    must still sync the data file (the write's bytes are in the page cache only)."""

    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = rig.image("a")
            data_inode = os.stat(rig.store.data_path("a")).st_ino
            synced = spy_fdatasync(monkeypatch)
            await image.write(CS, b"1" * CS)
            await image.fsync()
            assert synced == [data_inode]
            synced.clear()
            await image.write(CS + 100, b"2" * 100)  # the same chunk, dirty already
            assert rig.store.pending_count == 0  # no new mark: only the sync can save it
            await image.fsync()
            assert synced == [data_inode], "fsync reported success without syncing the write"
            synced.clear()
            await image.fsync()  # nothing written since: nothing to sync
            assert synced == []

    trio.run(main)


def test_a_failed_sql_commit_keeps_its_marks_for_the_next(rig_factory) -> None:
    """The fdatasync succeeded, the SQL failed: the fsync fails (EIO to the client), and the
    marks it did not write are written by the next commit. Dropping them would let the next
    fsync succeed while a restart refetches the written chunk from the base."""

    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = rig.image("a")
            await image.write(2 * CS, b"w" * CS)
            with failing_inserts(rig.store), pytest.raises(CacheError, match="injected"):
                await image.fsync()
            assert committed_states(rig.cache_dir, "a") == {}
            await image.fsync()
            assert committed_states(rig.cache_dir, "a") == {2: (ChunkState.DIRTY, None)}

    trio.run(main)


def test_a_failed_shutdown_commit_keeps_its_marks_too(rig_factory) -> None:
    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            await rig.image("a").write(0, b"w" * CS)
            with failing_inserts(rig.store), pytest.raises(CacheError, match="injected"):
                rig.store.commit_sync()
            rig.store.commit_sync()
            assert committed_states(rig.cache_dir, "a") == {0: (ChunkState.DIRTY, None)}

    trio.run(main)


def test_a_mark_taken_during_a_failing_commit_wins_over_the_marks_put_back(
    rig_factory, monkeypatch
) -> None:
    """Chunk 1 is read and forgotten (ABSENT, pending); a commit starts; while it is in its
    thread the client overwrites chunk 1 whole (DIRTY, pending anew); the commit's SQL fails
    and its ABSENT mark goes back. The newer DIRTY mark must stay: ABSENT would let a restart
    refetch the chunk from the base over the client's write. (A clean mark in the batch would
    make the write wait for a commit of its dirty mark first: Image._unclean_durably.)"""
    data = random_bytes(4 * CS)
    in_commit, written = threading.Event(), threading.Event()
    real = os.fdatasync

    def sync_after_the_write(fd: int) -> None:
        in_commit.set()
        written.wait(10)
        real(fd)

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.read(CS, 2 * CS)  # chunk 2's clean mark: an INSERT in the batch
            await image.wait_stored()
            assert image.forget_chunk(1)
            with failing_inserts(rig.store):
                monkeypatch.setattr(os, "fdatasync", sync_after_the_write)
                async with trio.open_nursery() as nursery:

                    async def failing_commit() -> None:
                        with pytest.raises(CacheError, match="injected"):
                            await rig.store.commit()

                    nursery.start_soon(failing_commit)
                    assert await trio.to_thread.run_sync(in_commit.wait, 10), "in_commit never came"
                    await image.write(CS, b"w" * CS)
                    written.set()
                monkeypatch.setattr(os, "fdatasync", real)
            await rig.store.commit()
            assert committed_states(rig.cache_dir, "a")[1] == (ChunkState.DIRTY, None)
            assert bytes(await image.read(CS, CS)) == b"w" * CS
            await image.wait_stored()

    trio.run(main)


@pytest.mark.parametrize("path", ["periodic", "shutdown"])
def test_data_files_are_synced_before_the_rows_on_every_commit_path(
    rig_factory, monkeypatch, path: str
) -> None:
    """When the data file is synced, the row saying its chunk is local must not be in
    state.db yet: `commit` (periodic, fsync) and `commit_sync` (unmount, verify) alike."""
    data = random_bytes(2 * CS)
    events: list[str] = []

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            await rig.image("a").read(0, CS)
            await rig.image("a").wait_stored()
            real = os.fdatasync

            def spy(fd: int) -> None:
                rows = committed_states(rig.cache_dir, "a")
                events.append("sync" if rows == {} else "sync after the rows")
                real(fd)

            monkeypatch.setattr(os, "fdatasync", spy)
            if path == "periodic":
                await rig.store.commit()
            else:
                rig.store.commit_sync()
            monkeypatch.setattr(os, "fdatasync", real)
            rows = committed_states(rig.cache_dir, "a")
            assert rows == {0: (ChunkState.CLEAN, chunk_digest(data[:CS]))}
            events.append("rows")

    trio.run(main)
    assert events == ["sync", "rows"]


def test_a_first_write_to_a_clean_chunk_commits_its_dirty_mark_without_a_data_sync(
    rig_factory, monkeypatch
) -> None:
    """Before a write changes a chunk the database calls clean, its row says dirty (a kill -9
    keeps the write's bytes in the page cache: a clean row over them was served as the base's
    and later put back by verify). That row alone is written: no data sync, which would make a
    guest's first write to each chunk of a thick image wait for every dirty page."""

    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = await committed_clean(rig, "a", 2)
            assert committed_states(rig.store.cache_dir, "a")[1][0] == ChunkState.CLEAN
            synced = spy_fdatasync(monkeypatch)
            commits = rig.store.commits
            await image.write(CS + 10, b"w" * 100)
            assert committed_states(rig.store.cache_dir, "a")[1] == (ChunkState.DIRTY, None)
            assert committed_states(rig.store.cache_dir, "a")[0][0] == ChunkState.CLEAN
            assert synced == [] and rig.store.commits == commits
            await image.write(CS + 200, b"v" * 100)  # dirty in the database already: no wait
            assert synced == [] and rig.store.commits == commits
            await image.fsync()
            assert synced == [os.stat(rig.store.data_path("a")).st_ino]

    trio.run(main)


def test_racing_first_writes_to_a_clean_chunk_make_it_dirty_once_without_a_data_sync(
    rig_factory, monkeypatch
) -> None:
    """QEMU's native AIO sends writes to one chunk at once: the second waits for the first's
    dirty mark instead of paying a full commit of its own."""

    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = await committed_clean(rig, "a", 2)
            synced = spy_fdatasync(monkeypatch)
            commits = rig.store.commits
            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(image.write, CS + n * 512, b"r" * 512)
            assert synced == [] and rig.store.commits == commits
            assert committed_states(rig.store.cache_dir, "a")[1] == (ChunkState.DIRTY, None)

    trio.run(main)


def test_a_chunk_refilled_after_a_forget_is_synced_before_its_row_says_dirty(
    rig_factory, monkeypatch
) -> None:
    """Forgotten (its row still clean until the next commit), refilled, then written: its new
    bytes may not be on disk yet, so a dirty row alone could end up over the bad bytes it was
    forgotten for after a power cut. The write's dirty mark goes with a full commit."""

    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = await committed_clean(rig, "a", 2)
            assert image.forget_chunk(1)
            await image.read(CS, CS)  # refilled
            await image.wait_stored()
            assert committed_states(rig.store.cache_dir, "a")[1][0] == ChunkState.CLEAN
            data_inode = os.stat(rig.store.data_path("a")).st_ino
            synced = spy_fdatasync(monkeypatch)
            await image.write(CS + 10, b"w" * 100)
            assert synced == [data_inode]
            assert committed_states(rig.store.cache_dir, "a")[1] == (ChunkState.DIRTY, None)

    trio.run(main)


def test_after_a_failed_sync_a_write_still_makes_its_clean_chunk_dirty_first(
    rig_factory, monkeypatch
) -> None:
    """Nothing is recorded local after a data sync failed, but a dirty row is never wrong:
    without it the restart the error asks for served the write's bytes as the base's."""

    async def main() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = await committed_clean(rig, "a", 2)
            await image.write(3 * CS, b"x" * CS)

            def failing_sync(fd: int) -> None:
                raise OSError(errno.EIO, "I/O error")

            monkeypatch.setattr(os, "fdatasync", failing_sync)
            with pytest.raises(CacheError):
                await rig.store.commit()
            monkeypatch.undo()
            assert rig.store.sync_failure is not None
            await image.write(CS + 10, b"w" * 100)
            assert committed_states(rig.store.cache_dir, "a")[1] == (ChunkState.DIRTY, None)

    trio.run(main)


def test_a_write_waiting_for_a_fill_when_a_sync_fails_fails_without_fetching_again(
    rig_factory, monkeypatch
) -> None:
    """After a failed sync fills are no longer stored (store_queue.py): a partial write whose
    chunk was being filled then fails with the sync error. Its fill's store is refused at
    once, so without that the write, finding its chunk neither local nor queued, fetched it
    again (and again, as the scheduler happened to order the refusal and the write)."""
    trials = 8  # the order is the scheduler's (random) choice: each trial is one coin toss

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    async def trial() -> None:
        async with rig_factory({"a": random_bytes(4 * CS)}) as rig:
            image = await committed_clean(rig, "a", 1)
            source = rig.source("a")
            source.faults.delay = 0.2
            failed: list[BaseException] = []

            async def partial_write() -> None:
                try:
                    await image.write(2 * CS + 10, b"xyz")
                except CacheError as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial_write)
                await wait_until(lambda: source.in_flight == 1)
                await image.write(0, b"w" * 10)  # something for the commit to sync
                monkeypatch.setattr(os, "fdatasync", failing_sync)
                with pytest.raises(CacheError):
                    await rig.store.commit()
                monkeypatch.undo()
            assert failed, "the write went on after the sync failed"
            assert [r for r in source.reads if r[0] == 2 * CS] == [(2 * CS, CS)]

    async def main() -> None:
        for _ in range(trials):
            await trial()

    trio.run(main)


def test_a_read_waiting_when_a_sync_fails_never_serves_the_base_for_a_lost_write(
    rig_factory, monkeypatch
) -> None:
    """A read of a chunk whose write the failed sync lost, and of a chunk it waits for: the
    lost one was checked before the wait. If it is forgotten meanwhile (the mount forgets at
    once; or another request), the read must fail, not fill it from the base and serve the
    base's bytes where the client wrote."""
    data = random_bytes(4 * CS)

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = await committed_clean(rig, "a", 1)
            await image.write(CS + 10, b"xyz")  # fills chunk 1 (not committed), then writes
            await image.wait_stored()
            source = rig.source("a")
            source.faults.delay = 0.2
            outcome: list[object] = []

            async def read_across() -> None:
                try:
                    outcome.append(bytes(await image.read(CS, 2 * CS)))
                except CacheError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_across)
                await wait_until(lambda: source.in_flight >= 1)  # chunk 2's fill
                monkeypatch.setattr(os, "fdatasync", failing_sync)
                with pytest.raises(CacheError):
                    await rig.store.commit()
                monkeypatch.undo()
                image.forget_unsynced()
            (got,) = outcome
            assert isinstance(got, CacheError), "the read served bytes for a lost write"
            with pytest.raises(CacheError):
                await image.read(CS, 16)

    trio.run(main)
