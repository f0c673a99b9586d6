"""The rig of tests/core: real CacheStore (in tmp_path), Fetcher and Images over a MemoryBase,
with the fill nursery the mount would own. No kernel, no network. Tests import the helpers
from here; tests/core/conftest.py only turns `open_rig` into the `rig_factory` fixture.

    async with rig_factory({"a.raw": data}, chunk_size=CS) as rig:
        assert await rig.image("a.raw").read(0, 10) == data[:10]
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import trio
import trio.testing

from corfs.base import ChunkLayout
from corfs.base.memory import MemoryBase, MemoryImage
from corfs.config import DEFAULT_RANDOM_RANGE
from corfs.digest import chunk_digest, is_zero
from corfs.fetcher import Fetcher, RetryPolicy
from corfs.image import Image
from corfs.read_memory import ReadMemory
from corfs.store import CacheStore, ChunkState
from corfs.write_behind import WriteBehind

CS = 4096
DEFAULT_POLICY = RetryPolicy(io_timeout=10.0)


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic, never-zero-chunk data (each 16 bytes differ)."""
    import random

    rnd = random.Random(seed)
    return rnd.randbytes(size)


def layout_of(data: bytes, chunk_size: int) -> ChunkLayout:
    """The ChunkLayout a published image of `data` would have."""
    digests: list[bytes | None] = []
    for off in range(0, len(data), chunk_size):
        piece = data[off : off + chunk_size]
        digests.append(None if is_zero(piece) else chunk_digest(piece))
    return ChunkLayout(chunk_size, tuple(digests))


def resident_pages(path: str, offset: int, length: int) -> int:
    """How many pages of the range are in the page cache (mincore on a mapping)."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, length, offset=offset) as mapping:
            address = ctypes.c_char.from_buffer(mapping)
            pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            rc = libc.mincore(ctypes.addressof(address), length, vector)
            del address  # release the buffer export before the mapping closes
            assert rc == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vector)
    finally:
        os.close(fd)


def chunk_reads(source: MemoryImage, chunk_size: int) -> list[int]:
    """Every chunk index each base read touched, in order (a run read counts each chunk)."""
    out: list[int] = []
    for offset, length in source.reads:
        out.extend(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return out


def committed_states(cache_dir: str | Path, name: str) -> dict[int, tuple[int, bytes | None]]:
    """What a fresh process would see in CACHE: {idx: (state, digest)} of committed rows."""
    other = CacheStore.open(str(cache_dir), lock=False, create=False)
    try:
        rows = other._query("SELECT idx, state, digest FROM chunks WHERE image = ?", (name,))
    finally:
        other.close()
    return {idx: (state, digest) for idx, state, digest in rows}


@dataclass
class Rig:
    base: MemoryBase
    store: CacheStore
    fetcher: Fetcher
    nursery: trio.Nursery
    cache_dir: Path
    chunk_size: int
    images: dict[str, Image] = field(default_factory=dict)

    def image(self, name: str) -> Image:
        return self.images[name]

    def source(self, name: str) -> MemoryImage:
        return self.base.images[name]

    def data_file(self, name: str) -> bytes:
        with open(self.store.data_path(name), "rb") as f:
            return f.read()


async def wait_until(predicate: Callable[[], bool], timeout: float = 600.0) -> None:
    """Poll until `predicate()` holds (use under MockClock(autojump) so waits are free)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@contextlib.asynccontextmanager
async def open_rig(
    tmp_path: Path,
    images: dict[str, bytes],
    *,
    chunk_size: int = CS,
    policy: RetryPolicy = DEFAULT_POLICY,
    read_only: bool = False,
    published: bool = False,
    cache_dir: Path | None = None,
    store: CacheStore | None = None,
    connections: int = 8,
    random_range: int = DEFAULT_RANDOM_RANGE,
    read_memory: int | None = None,
    write_behind: int | None = None,
) -> AsyncIterator[Rig]:
    """A Rig over `images` (name -> bytes), its cache in `cache_dir` or tmp_path/cache;
    `connections`: the fetcher's requests in flight at once (--connections); `random_range`:
    --random-range; `read_memory`, `write_behind`: as the options, one for all the images
    (by default none, and one write-behind budget per image)."""
    base = MemoryBase()
    for name, data in images.items():
        layout = layout_of(data, chunk_size) if published else None
        base.add(MemoryImage(name, bytearray(data), identity=f"id-{name}", layout=layout))
    sources = await base.list_images()
    cache = cache_dir or tmp_path / "cache"
    own_store = store is None
    if store is None:
        store = CacheStore.open(str(cache))
    fetcher = Fetcher(policy, slots=connections)
    shared_memory = ReadMemory.bounded(read_memory) if read_memory is not None else None
    shared_budget = WriteBehind(write_behind) if write_behind is not None else None
    try:
        async with trio.open_nursery() as nursery:
            rig = Rig(base, store, fetcher, nursery, cache, chunk_size)
            for source in sources:
                record = store.record_of(source.name)
                if record is None:
                    record = store.create_image(
                        source.name, source.size, chunk_size, source.identity, "memory://"
                    )
                rig.images[source.name] = Image(
                    record, store, fetcher, source, nursery, read_only=read_only,
                    random_range=random_range, read_memory=shared_memory,
                    write_behind=shared_budget,
                )
            yield rig
            nursery.cancel_scope.cancel()
    finally:
        if own_store:
            store.close()


def st_allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


__all__ = [
    "CS",
    "ChunkState",
    "Rig",
    "chunk_reads",
    "committed_states",
    "layout_of",
    "open_rig",
    "random_bytes",
    "st_allocated",
    "wait_until",
]


# A test in virtual time that runs this long in real time has a task that never waits (a busy
# loop): virtual time cannot advance past it, so the test would otherwise hang until
# pytest-timeout. The slowest of them takes ~8 s.
REAL_TIME_LIMIT_S = 30.0


def run_with_mock_clock(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main` in virtual time that jumps whenever every task waits and no worker thread
    runs (fills write data files in threads; a thread's milliseconds are no idle time). A
    fixed threshold of real idle time before each jump (5 ms) made a test that backs off
    through a long outage take 15 s of real time. Fails (rather than hangs) if a task spins:
    see REAL_TIME_LIMIT_S."""

    async def guarded() -> None:
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            timer = threading.Timer(REAL_TIME_LIMIT_S, token.run_sync_soon, (scope.cancel,))
            timer.start()
            try:
                await main()
            finally:
                timer.cancel()
        if scope.cancelled_caught:
            pytest.fail(
                f"over {REAL_TIME_LIMIT_S:g} s of real time in virtual time: a task never waits "
                "(a busy loop keeps the mock clock from advancing), or a worker thread never "
                "ends (the clock does not jump while one runs)"
            )

    clock = trio.testing.MockClock(autojump_threshold=0)
    threads = 0
    run_sync = trio.to_thread.run_sync

    async def counted_run_sync(*args: Any, **kwargs: Any) -> Any:
        nonlocal threads
        threads += 1
        clock.autojump_threshold = math.inf  # the thread's end wakes the loop
        try:
            return await run_sync(*args, **kwargs)
        finally:
            threads -= 1
            if not threads:
                clock.autojump_threshold = 0

    with mock.patch.object(trio.to_thread, "run_sync", counted_run_sync):
        trio.run(guarded, clock=clock)
