"""Issue 2, point 4: writes land in CACHE only, a partly written chunk is completed from BASE
first, fsync through MNT is durable across kill -9, --read-only refuses writes (EROFS)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os

import pytest

from tests.mounting import make_image, sha256_file

from .util import KIB, MIB, direct_read, drop_caches, image_status, live_status, status

SIZE = 8 * MIB


def test_writes_land_in_cache_only(tmp_dirs):
    base = make_image(tmp_dirs.base / "a.raw", SIZE, seed=11)
    sha, mtime = sha256_file(base), os.stat(base).st_mtime_ns
    want = bytearray(base.read_bytes())
    with tmp_dirs.mount("--no-stream") as m:
        with open(m.mnt / "a.raw", "r+b") as f:
            for off, data in [(0, b"A" * 4096), (3 * MIB - 100, b"B" * 300), (SIZE - 7, b"C" * 7)]:
                f.seek(off)
                f.write(data)
                want[off : off + len(data)] = data
            f.flush()
            os.fsync(f.fileno())
        drop_caches()
        assert (m.mnt / "a.raw").read_bytes() == want
        assert image_status(live_status(m.mnt), "a.raw")["dirty_bytes"] > 0
        m.stop()
    assert sha256_file(base) == sha
    assert os.stat(base).st_mtime_ns == mtime
    with tmp_dirs.mount("--no-stream") as m:  # and they stay after a remount
        assert (m.mnt / "a.raw").read_bytes() == want
        m.stop()
    assert sha256_file(base) == sha


def test_partial_write_completes_chunk_from_base(tmp_dirs):
    base = make_image(tmp_dirs.base / "a.raw", SIZE, seed=12)
    orig = base.read_bytes()
    chunk = 1 * MIB
    start = 3 * chunk
    patch_off = start + chunk // 2 + 4 * KIB  # 4 KiB in the middle of absent chunk 3
    patch = bytes(range(256)) * 16
    with tmp_dirs.mount("--no-stream", "--chunk-size", "1M") as m:
        assert image_status(live_status(m.mnt), "a.raw")["local_bytes"] == 0
        fd = os.open(m.mnt / "a.raw", os.O_WRONLY)
        try:
            assert os.pwrite(fd, patch, patch_off) == len(patch)
            os.fsync(fd)
        finally:
            os.close(fd)
        st = live_status(m.mnt)
        assert image_status(st, "a.raw")["local_bytes"] == chunk  # just that chunk
        assert st["fetcher"]["bytes_fetched"] == chunk
        expected = bytearray(orig[start : start + chunk])
        expected[patch_off - start : patch_off - start + len(patch)] = patch
        assert direct_read(m.mnt / "a.raw", start, chunk) == expected
        m.stop()
    # the cache's data file holds the completed chunk (base + write), nothing else is local
    data = (tmp_dirs.cache / "data" / "a.raw").read_bytes()
    assert data[start : start + chunk] == expected
    assert image_status(status(tmp_dirs.cache), "a.raw")["local_bytes"] == chunk
    assert base.read_bytes() == orig


def test_fsync_is_durable_across_kill9(tmp_dirs):
    base = make_image(tmp_dirs.base / "a.raw", SIZE, seed=13)
    want = bytearray(base.read_bytes())
    writes = [(5 * MIB + 123, b"\x5a" * 5000), (0, b"\x01" * 512), (7 * MIB, b"\x77" * MIB)]
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        fd = os.open(m.mnt / "a.raw", os.O_RDWR)
        try:
            for off, data in writes:
                os.pwrite(fd, data, off)
                want[off : off + len(data)] = data
            os.fsync(fd)
            m.kill9()  # right after fsync returned: no time for the periodic commit
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once the daemon is gone
                os.close(fd)
    drop_caches()
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        for off, data in writes:
            assert (
                direct_read(m.mnt / "a.raw", off // 4096 * 4096, len(data) + 4096)[
                    off % 4096 : off % 4096 + len(data)
                ]
                == data
            )
        assert (m.mnt / "a.raw").read_bytes() == want
        m.stop()


def test_read_only_refuses_writes(tmp_dirs):
    base = make_image(tmp_dirs.base / "a.raw", 1 * MIB, seed=14)
    orig = base.read_bytes()
    with tmp_dirs.mount("--read-only", "--no-stream") as m:
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as err:
                os.open(m.mnt / "a.raw", flags)
            assert err.value.errno == errno.EROFS
        assert (m.mnt / "a.raw").read_bytes() == orig
        assert live_status(m.mnt)["images"][0]["dirty_bytes"] == 0
        m.stop()
    assert base.read_bytes() == orig


def test_a_write_across_the_end_is_cut_short_there(tmp_dirs):
    """As on a block device: a write that runs past the image's end puts in what fits and
    says so (a short count); one wholly past the end is ENOSPC. The size never changes."""
    base = make_image(tmp_dirs.base / "a.raw", 1 * MIB, seed=15)
    want = bytearray(base.read_bytes())
    with tmp_dirs.mount("--no-stream") as m:
        fd = os.open(m.mnt / "a.raw", os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"E" * 8192, MIB - 4096) == 4096
            with pytest.raises(OSError) as err:
                os.pwrite(fd, b"F", MIB)
            assert err.value.errno == errno.ENOSPC
            os.fsync(fd)
        finally:
            os.close(fd)
        want[MIB - 4096 :] = b"E" * 4096
        assert os.stat(m.mnt / "a.raw").st_size == MIB
        drop_caches()
        assert (m.mnt / "a.raw").read_bytes() == want
        m.stop()


def test_a_direct_write_across_the_end_is_enospc_not_eio(tmp_dirs):
    """With O_DIRECT (QEMU's cache=none, dd oflag=direct) the kernel counts a short write as
    failed and answers EIO, an I/O error where nothing failed: a direct write across the end
    is ENOSPC, as one wholly past it is, with the bytes before the end written (where a block
    device's next write says ENOSPC). Buffered writes keep their short count."""
    base = make_image(tmp_dirs.base / "a.raw", 1 * MIB, seed=16)
    want = bytearray(base.read_bytes())
    with tmp_dirs.mount("--no-stream") as m:
        image = m.mnt / "a.raw"
        buf = mmap.mmap(-1, 3 * 4096)  # page aligned, as O_DIRECT wants
        buf[:] = b"D" * len(buf)
        fd = os.open(image, os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as err:
                os.pwritev(fd, [buf], MIB - 4096)
            assert err.value.errno == errno.ENOSPC
            want[MIB - 4096 :] = b"D" * 4096
            with pytest.raises(OSError) as err:
                os.pwritev(fd, [buf], MIB)
            assert err.value.errno == errno.ENOSPC
            assert os.pwritev(fd, [memoryview(buf)[:4096]], MIB - 8192) == 4096  # inside: fine
            want[MIB - 8192 : MIB - 4096] = b"D" * 4096
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(image, "r+b") as f:  # the same image, buffered: still a short count
            f.seek(MIB - 100)
            assert f.raw.write(b"B" * 8192) == 100
            want[MIB - 100 :] = b"B" * 100
        assert "across the end of a.raw" in m.log_text()
        assert os.stat(image).st_size == MIB
        drop_caches()
        assert image.read_bytes() == want
        m.stop()


def test_an_image_keeps_its_size_and_mmap_writes_land(tmp_dirs):
    """What a file system call that would change an image's size or allocation answers:
    ftruncate to another size and O_TRUNC are EPERM (to its own size: fine), an O_APPEND write
    starts at the end (ENOSPC), fallocate in any mode is EOPNOTSUPP (the kernel's answer:
    pyfuse3 has no fallocate), and the bytes stay as they were. Writes through a shared mapping
    land, and survive a kill -9 once msync returned."""
    base = make_image(tmp_dirs.base / "a.raw", 4 * MIB + 777, seed=17)
    want = bytearray(base.read_bytes())
    size = len(want)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        image = m.mnt / "a.raw"
        fd = os.open(image, os.O_RDWR)
        try:
            os.ftruncate(fd, size)
            for other in (0, size - 1, size + 1):
                with pytest.raises(OSError) as err:
                    os.ftruncate(fd, other)
                assert err.value.errno == errno.EPERM
            # plain, keep size, punch hole, zero range, collapse range, insert range
            for mode in (0x00, 0x01, 0x03, 0x10, 0x08, 0x20):
                assert libc.fallocate(fd, mode, 65536, 65536) == -1
                assert ctypes.get_errno() == errno.EOPNOTSUPP, mode
            with mmap.mmap(fd, size) as mapping:
                for offset, length in ((10, 5), (70000, 9000), (size - 700, 700)):
                    mapping[offset : offset + length] = b"M" * length
                    want[offset : offset + length] = b"M" * length
                mapping.flush()  # msync(MS_SYNC): written back, then fsync
        finally:
            os.close(fd)
        with pytest.raises(OSError) as err:
            os.close(os.open(image, os.O_WRONLY | os.O_TRUNC))
        assert err.value.errno == errno.EPERM
        fd = os.open(image, os.O_WRONLY | os.O_APPEND)
        try:
            with pytest.raises(OSError) as err:
                os.write(fd, b"A")
            assert err.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.stat(image).st_size == size
        m.kill9()
    drop_caches()
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        assert (m.mnt / "a.raw").read_bytes() == want
        m.stop()
