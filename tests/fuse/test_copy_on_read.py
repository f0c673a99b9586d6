"""Issue 2, point 3: copy-on-read. A first read fetches whole chunks; a re-read never touches
BASE; concurrent readers of one missing chunk cause one fetch."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from tests.mounting import make_image

from .util import (
    KIB,
    MIB,
    direct_read,
    drop_caches,
    image_status,
    live_status,
    status,
    wait_stored,
)

CHUNK = 64 * KIB
SIZE = 4 * MIB + 5000


def _fetcher(mnt):
    return live_status(mnt)["fetcher"]


def test_first_read_fetches_whole_chunks(tmp_dirs):
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=3)
    want = (tmp_dirs.base / "a.raw").read_bytes()
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        path = m.mnt / "a.raw"
        st = status(m.mnt)
        assert image_status(st, "a.raw")["local_bytes"] == 0
        assert st["fetcher"]["bytes_fetched"] == 0

        # 4 KiB in the middle of chunk 2: exactly chunk 2 is fetched and kept
        assert (
            direct_read(path, 2 * CHUNK + 8 * KIB, 4 * KIB)
            == want[2 * CHUNK + 8 * KIB :][: 4 * KIB]
        )
        st = wait_stored(m.mnt, "a.raw", CHUNK)
        assert st["fetcher"]["bytes_fetched"] == CHUNK

        # 8 KiB across the boundary of chunks 9 and 10: both whole chunks
        off = 10 * CHUNK - 4 * KIB
        assert direct_read(path, off, 8 * KIB) == want[off : off + 8 * KIB]
        st = wait_stored(m.mnt, "a.raw", 3 * CHUNK)
        assert st["fetcher"]["bytes_fetched"] == 3 * CHUNK

        # the short last chunk is fetched whole, up to EOF only
        last = SIZE // CHUNK * CHUNK
        assert direct_read(path, last, 4 * KIB) == want[last : last + 4 * KIB]
        st = wait_stored(m.mnt, "a.raw", 3 * CHUNK + SIZE - last)
        assert st["fetcher"]["bytes_fetched"] == 3 * CHUNK + SIZE - last
        m.stop()
    # the chunks are recorded: the cache alone says so after unmount
    assert image_status(status(tmp_dirs.cache), "a.raw")["local_bytes"] == 3 * CHUNK + SIZE - last


def test_reread_never_touches_base(tmp_dirs, tmp_path):
    """O_DIRECT reads: the kernel asks for exactly these ranges (buffered reads would add the
    kernel's read-ahead, which may reach chunks that were never local)."""
    make_image(tmp_dirs.base / "a.raw", SIZE, seed=4)
    want = (tmp_dirs.base / "a.raw").read_bytes()
    ranges = [(0, 100 * KIB), (CHUNK * 7 - 4 * KIB, 3 * CHUNK + 8 * KIB), (1 * MIB, 256 * KIB)]
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        path = m.mnt / "a.raw"
        for off, length in ranges:
            assert direct_read(path, off, length) == want[off : off + length]
        before = _fetcher(m.mnt)
        assert before["bytes_fetched"] > 0

        # Take the base away: move it out of BASE, then scribble over it in place (the
        # daemon may hold it open, so the moved inode must not hold the old bytes either).
        moved = tmp_path / "moved-away.raw"
        os.rename(tmp_dirs.base / "a.raw", moved)
        with open(moved, "r+b") as f:
            f.write(b"\xee" * SIZE)
        drop_caches()

        for off, length in ranges:  # O_DIRECT: every read reaches the daemon
            assert direct_read(path, off, length) == want[off : off + length]
        assert _fetcher(m.mnt)["requests"] == before["requests"]
        assert _fetcher(m.mnt)["bytes_fetched"] == before["bytes_fetched"]
        with open(path, "rb") as f:  # buffered, page cache dropped: same bytes
            for off, length in ranges:
                f.seek(off)
                assert f.read(length) == want[off : off + length]

        # ...and the base really is unusable: a chunk that is not local fails
        with pytest.raises(OSError) as err:
            direct_read(path, 3 * MIB, 4 * KIB)
        assert err.value.errno in (errno.EIO, errno.ESTALE, errno.ENOENT)
        m.stop()


def _read_into(results, i, barrier, path, off):
    try:
        barrier.wait()
        results[i] = direct_read(path, off, 16 * KIB)
    except BaseException as exc:  # reported by the test
        results[i] = exc


def test_concurrent_readers_one_fetch(tmp_dirs):
    """Eight O_DIRECT readers of one missing chunk: one base request. Each image's last chunk
    is read, so sequential read-ahead (which fetches chunks after a miss) has nothing to add
    and the fetcher counters show the fills of that chunk alone."""
    names = [f"img{i}.raw" for i in range(3)]
    for seed, name in enumerate(names):
        make_image(tmp_dirs.base / name, 16 * CHUNK, seed=50 + seed)
    readers = 8
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        for name in names:
            want = (tmp_dirs.base / name).read_bytes()
            path = m.mnt / name
            off = 15 * CHUNK + 16 * KIB
            before = _fetcher(m.mnt)
            barrier = threading.Barrier(readers)
            results: list[bytes | BaseException] = [b""] * readers
            threads = [
                threading.Thread(target=_read_into, args=(results, i, barrier, path, off))
                for i in range(readers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert all(r == want[off : off + 16 * KIB] for r in results), results
            after = _fetcher(m.mnt)
            assert after["requests"] - before["requests"] == 1, (name, before, after)
            assert after["bytes_fetched"] - before["bytes_fetched"] == CHUNK
            wait_stored(m.mnt, name, CHUNK)
        m.stop()
