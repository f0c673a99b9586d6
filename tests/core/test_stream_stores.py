"""Stream fills reach the data file behind a guest's flush (DataFile.store, coalesce=False):
none starts while a commit of the cache runs, and one being written stops between chunks when a
commit comes, so a commit's fdatasync does not queue at the disk behind a stream of direct
writes (bench/flush_latency). A fill a client waits for is not held back."""

from __future__ import annotations

from pathlib import Path

import trio

from corfs.buffers import aligned_copy
from corfs.digest import chunk_digest
from corfs.fetcher import FetchedChunk
from corfs.store import CacheStore
from tests.core.rig import random_bytes

MIB = 1 << 20


def _chunks(data: bytes) -> list[FetchedChunk]:
    return [
        FetchedChunk(i, aligned_copy(data[i * MIB : (i + 1) * MIB]),
                     chunk_digest(data[i * MIB : (i + 1) * MIB]))
        for i in range(len(data) // MIB)
    ]


def _store_with(tmp_path, data: bytes) -> CacheStore:
    """A cache with image "a" of len(data) bytes in 1 MiB chunks, nothing local."""
    store = CacheStore.open(str(tmp_path / "cache"))
    store.create_image("a", len(data), MIB, "id-a", "memory://")
    return store


async def _store(data_file, chunks: list[FetchedChunk], calls: list[list[int]], coalesce: bool):
    """DataFile.store, recording the chunks of each `stored` call."""
    await data_file.store(
        chunks, wanted=lambda i: True,
        stored=lambda done: calls.append([c.index for c in done]), coalesce=coalesce,
    )


def test_a_stream_store_waits_for_a_running_commit(tmp_path) -> None:
    data = random_bytes(4 * MIB, seed=51)
    store = _store_with(tmp_path, data)
    data_file = store.data_file("a")
    calls: list[list[int]] = []

    async def main() -> None:
        async def stream_store() -> None:
            await _store(data_file, _chunks(data), calls, coalesce=False)

        async with trio.open_nursery() as nursery:
            await store._commit_lock.acquire()  # a commit is running
            nursery.start_soon(stream_store)
            await trio.sleep(0.3)
            assert calls == []  # nothing written meanwhile
            store._commit_lock.release()
        assert calls == [[0, 1, 2, 3]]

    try:
        trio.run(main)
        assert Path(store.data_path("a")).read_bytes() == data
    finally:
        store.close()


def test_a_fill_a_client_waits_for_is_not_held_back_by_a_commit(tmp_path) -> None:
    data = random_bytes(2 * MIB, seed=52)
    store = _store_with(tmp_path, data)
    data_file = store.data_file("a")
    calls: list[list[int]] = []

    async def main() -> None:
        await store._commit_lock.acquire()
        try:
            with trio.fail_after(10):
                await _store(data_file, _chunks(data), calls, coalesce=True)
        finally:
            store._commit_lock.release()

    try:
        trio.run(main)
    finally:
        store.close()
    assert calls == [[0, 1]]


def test_a_stream_store_stops_between_chunks_for_a_commit(tmp_path) -> None:
    data = random_bytes(64 * MIB, seed=53)
    store = _store_with(tmp_path, data)
    data_file = store.data_file("a")
    calls: list[list[int]] = []

    chunks = _chunks(data)

    async def main() -> None:
        async def stream_store() -> None:
            await _store(data_file, chunks, calls, coalesce=False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_store)
            await trio.sleep(0.005)  # the store's thread is writing its 64 chunks
            store.touch("a")
            await store.commit()
        assert len(calls) >= 2  # it stopped for the commit, and went on after it
        assert [i for call in calls for i in call] == list(range(64))

    try:
        trio.run(main)
        assert Path(store.data_path("a")).read_bytes() == data
    finally:
        store.close()
