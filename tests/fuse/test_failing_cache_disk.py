"""A cache disk that fails under a running mount, for real: CACHE on an ext2 file system on a
loop device whose backing file is sparse on a small tmpfs. Once that tmpfs is full, every write
to a block of the loop device not written before fails at the device (a thin-provisioned disk
out of space): a buffered write lands in the page cache, its writeback fails, the next
fdatasync reports it once (and Linux marks the pages clean: "fsyncgate"), and once those pages
are evicted the file reads what the disk holds (zeros). ext2 has no journal to abort, and its
metadata blocks are all written by mkfs (lazy_itable_init=0), so only data writes fail."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corfs.cache_layout import data_path_in
from tests.mounting import CorfsMount, run_corfs

from .util import (
    KIB,
    MIB,
    assert_one_line_error,
    direct_read,
    image_status,
    live_status,
    wait_for,
    wait_stored,
)

CHUNK = 64 * KIB
# The short last chunk (512 bytes) is stored through the page cache (datafile.py: not aligned)
SIZE = MIB + 512


@dataclass
class ThinDisk:
    backing: Path  # the tmpfs holding the loop device's sparse file
    mountpoint: Path  # the ext2 file system on the loop device

    def run_out_of_space(self) -> None:
        """Fill the tmpfs: from now on, writes to blocks of the disk not written before fail."""
        free = os.statvfs(self.backing)
        with open(self.backing / "filler", "wb") as f:
            f.write(bytes(free.f_bavail * free.f_frsize))

    def make_room(self) -> None:
        (self.backing / "filler").unlink()


@pytest.fixture
def thin_disk(tmp_path: Path) -> Iterator[ThinDisk]:
    backing, mountpoint = tmp_path / "backing", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    with contextlib.ExitStack() as undo:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "corfs-thin", backing],
                       check=True)
        undo.callback(subprocess.run, ["umount", "-l", backing], check=False)
        image = backing / "disk.img"
        image.touch()
        os.truncate(image, 64 * MIB)
        device = subprocess.run(["losetup", "-f", "--show", image], check=True,
                                capture_output=True, text=True).stdout.strip()
        undo.callback(subprocess.run, ["losetup", "-d", device], check=False)
        subprocess.run(["mkfs.ext2", "-q", "-b", "4096", "-E", "lazy_itable_init=0", device],
                       check=True)
        subprocess.run(["mount", device, mountpoint], check=True)
        undo.callback(subprocess.run, ["umount", "-l", mountpoint], check=False)
        yield ThinDisk(backing, mountpoint)


def _fsync_errno(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return None


def _buffered_read_errno(path: Path, offset: int) -> int | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 100, offset)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return None


def _evict(path: str) -> None:
    """Drop the page cache of one file (its pages are clean: written back or failed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_chunk_whose_writeback_failed_is_never_served_from_the_disk(tmp_dirs, thin_disk):
    data = random.Random(5).randbytes(SIZE)
    (tmp_dirs.base / "a.raw").write_bytes(data)
    cache = thin_disk.mountpoint / "cache"
    last = SIZE // CHUNK * CHUNK
    options = ("--no-stream", "--chunk-size", "64K")
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        image = m.mnt / "a.raw"
        os.sync()  # what the mount wrote so far is on the disk
        thin_disk.run_out_of_space()
        assert direct_read(image, last, 4 * KIB) == data[last:]  # filled, stored buffered
        # The writeback of that chunk fails: the commit's fdatasync says so, once.
        wait_for(lambda: image_status(live_status(m.mnt), "a.raw")["error"], what="sync error")
        assert _fsync_errno(image) in (errno.EIO, errno.ENOSPC)
        _evict(data_path_in(os.fspath(cache), "a.raw"))
        assert direct_read(image, last, 4 * KIB) == data[last:], "served the disk's zeros"
        assert direct_read(image, 0, SIZE) == data
        assert _fsync_errno(image) in (errno.EIO, errno.ENOSPC), "an fsync after it succeeded"
    thin_disk.make_room()
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        assert direct_read(m.mnt / "a.raw", 0, SIZE) == data


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    top = tmp_path / "small"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "corfs-small", top], check=True)
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", top], check=False)


def test_a_write_that_the_full_cache_disk_refuses_is_enospc(tmp_dirs, small_tmpfs):
    """A first write to a clean chunk makes its row dirty first (dirty_first.py): on a full
    cache disk that SQL fails, and the write must say ENOSPC (QEMU's default werror=enospc
    pauses the VM until there is room; EIO would go to the guest as a disk error)."""
    data = random.Random(6).randbytes(16 * MIB)
    (tmp_dirs.base / "a.raw").write_bytes(data)
    cache = small_tmpfs / "cache"
    options = ("--chunk-size", "64K")
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        image = m.mnt / "a.raw"
        wait_for(lambda: image_status(live_status(m.mnt), "a.raw")["state"] == "complete",
                 what="the image to be local")
        assert _fsync_errno(image) is None
        free = os.statvfs(small_tmpfs)
        with open(small_tmpfs / "filler", "wb") as f:
            f.write(bytes(free.f_bavail * free.f_frsize))
        fd = os.open(image, os.O_RDWR)
        try:
            failed = None
            for chunk in range(len(data) // CHUNK):  # each write: rows of a clean chunk
                try:
                    os.pwrite(fd, b"w" * 4 * KIB, chunk * CHUNK + 100)
                except OSError as exc:
                    failed = exc.errno
                    break
        finally:
            os.close(fd)
        assert failed is not None, "the state database never ran out of room"
        assert failed == errno.ENOSPC, errno.errorcode[failed]
        # Room again: the writes that succeeded are kept, the refused one changed nothing.
        (small_tmpfs / "filler").unlink()
        assert _fsync_errno(image) is None
        expected = bytearray(data)
        for written in range(chunk):
            start = written * CHUNK + 100
            expected[start : start + 4 * KIB] = b"w" * 4 * KIB
        assert direct_read(image, 0, len(data)) == expected
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        assert direct_read(m.mnt / "a.raw", 0, len(data)) == expected


def test_a_partial_write_over_a_fill_whose_writeback_failed_is_eio_never_the_disks_zeros(
    tmp_dirs, thin_disk
):
    """A partial write to an absent chunk fills it first: its fill's bytes and the write's go
    to the page cache together, and the chunk is dirty before any commit. If their writeback
    fails, the chunk must read neither as the disk's zeros nor, unannounced, as the base's
    bytes (a reader may have seen the write): EIO until a remount. The write was never
    acknowledged (every fsync fails): after the remount the chunk is the base's."""
    data = random.Random(7).randbytes(SIZE)
    (tmp_dirs.base / "a.raw").write_bytes(data)
    cache = thin_disk.mountpoint / "cache"
    last = SIZE // CHUNK * CHUNK
    options = ("--no-stream", "--chunk-size", "64K")
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        image = m.mnt / "a.raw"
        os.sync()
        thin_disk.run_out_of_space()
        fd = os.open(image, os.O_RDWR)
        try:
            os.pwrite(fd, b"w" * 100, last)  # fills the last chunk (512 bytes), then writes
            assert os.pread(fd, 100, last) == b"w" * 100  # now in the kernel's page cache
        finally:
            os.close(fd)
        wait_for(lambda: image_status(live_status(m.mnt), "a.raw")["error"], what="sync error")
        assert _fsync_errno(image) in (errno.EIO, errno.ENOSPC)
        _evict(data_path_in(os.fspath(cache), "a.raw"))
        with pytest.raises(OSError) as lost:
            direct_read(image, last, 4 * KIB)
        assert lost.value.errno == errno.EIO, "the lost write's chunk was served"
        # ... and a buffered reader is not served the lost write from the kernel's page cache
        wait_for(lambda: _buffered_read_errno(image, last) == errno.EIO, 5,
                 "the kernel's cached pages of the lost write to go")
        assert direct_read(image, 0, last) == data[:last]  # the other chunks are served
    thin_disk.make_room()
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        assert direct_read(m.mnt / "a.raw", last, 4 * KIB) == data[last:]


def test_a_final_commit_whose_sync_fails_is_one_line_and_exit_3(tmp_dirs, thin_disk):
    """Stopped before the periodic commit, the final commit's sync is the one that fails: the
    mount ends with its one-line error (exit 3), no traceback from what a failed sync does
    while the mount still runs."""
    data = random.Random(11).randbytes(SIZE)
    (tmp_dirs.base / "a.raw").write_bytes(data)
    cache = thin_disk.mountpoint / "cache"
    last = SIZE // CHUNK * CHUNK
    options = ("--no-stream", "--chunk-size", "64K")
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        os.sync()
        thin_disk.run_out_of_space()
        assert direct_read(m.mnt / "a.raw", last, 4 * KIB) == data[last:]  # stored buffered
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)  # at once: before the periodic commit, mostly
        assert m.proc.wait(30) == 3
        log = m.log_text()
        assert "Traceback" not in log and "RuntimeError" not in log, log


def test_after_a_failed_sync_the_stream_stops_instead_of_fetching_for_nothing(
    tmp_dirs, thin_disk
):
    """Once the cache cannot sync, no fill is stored: a stream going on would fetch the whole
    image again and again (every pass's chunks stay absent). It stops, saying why."""
    data = random.Random(9).randbytes(4 * MIB + 512)
    (tmp_dirs.base / "a.raw").write_bytes(data)
    cache = thin_disk.mountpoint / "cache"
    options = ("--stream-paused", "--chunk-size", "64K")
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        image = m.mnt / "a.raw"
        os.sync()
        thin_disk.run_out_of_space()
        assert direct_read(image, 4 * MIB, 512) == data[4 * MIB :]  # stored buffered
        wait_for(lambda: image_status(live_status(m.mnt), "a.raw")["error"], what="sync error")
        assert image_status(live_status(m.mnt), "a.raw")["state"] == "error"  # even paused
        run_corfs("stream", "resume", m.mnt, check=True)
        wait_for(lambda: image_status(live_status(m.mnt), "a.raw")["state"] == "error",
                 what="the stream stopping")
        fetched = live_status(m.mnt)["fetcher"]["bytes_fetched"]
        time.sleep(1.5)  # a stream going on fetches the 4 MiB image in well under that
        assert live_status(m.mnt)["fetcher"]["bytes_fetched"] == fetched
        assert direct_read(image, 0, len(data)) == data  # readers are still served


def test_a_mount_on_a_full_cache_disk_serves_and_stops_cleanly(tmp_dirs, small_tmpfs):
    """The small files beside the state (where the mount is, a recorded trace) cannot be
    written on a full cache disk: that costs a warning, not the mount (a traceback, exit 1)."""
    data = random.Random(8).randbytes(2 * MIB)
    (tmp_dirs.base / "a.raw").write_bytes(data)
    cache = small_tmpfs / "cache"
    options = ("--no-stream", "--chunk-size", "64K", "--record-trace")
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        assert direct_read(m.mnt / "a.raw", 0, len(data)) == data
        wait_stored(m.mnt, "a.raw", len(data))  # then nothing is left to record at the stop
        assert _fsync_errno(m.mnt / "a.raw") is None
        free = os.statvfs(small_tmpfs)  # the disk fills up while mounted
        with open(small_tmpfs / "filler", "wb") as f:
            f.write(bytes(free.f_bavail * free.f_frsize))
        m.stop()
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        assert direct_read(m.mnt / "a.raw", 0, len(data)) == data
        m.stop()  # exit code 0
        assert "Traceback" not in m.log_text()
        assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []


def test_a_cache_that_cannot_open_its_database_on_a_full_disk_says_the_disk_is_full(
    tmp_dirs, small_tmpfs
):
    """SQLite needs room for its WAL and shared memory files to open the state; on a full disk
    it says "disk I/O error". "Unusable" would invite deleting a cache that may hold the only
    copy of a guest's writes: the line must say the disk is full."""
    (tmp_dirs.base / "a.raw").write_bytes(random.Random(9).randbytes(MIB))
    cache = small_tmpfs / "cache"
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, "--no-stream", log_dir=tmp_dirs.logs) as m:
        assert direct_read(m.mnt / "a.raw", 0, MIB)
        m.stop()
    assert not (cache / "state.db-wal").exists()  # a clean close removes it
    free = os.statvfs(small_tmpfs)
    with open(small_tmpfs / "filler", "wb") as f:
        f.write(bytes(free.f_bavail * free.f_frsize))
    result = run_corfs("mount", tmp_dirs.base, cache, tmp_dirs.mnt, "--no-stream", timeout=20)
    line = assert_one_line_error(result, "full")
    assert "unusable" not in line, line
    assert result.returncode == 3


def test_a_write_the_full_disk_cut_short_leaves_the_chunks_it_did_not_reach_as_they_were(
    tmp_dirs, small_tmpfs
):
    """One write request over two absent chunks; the disk fills up a quarter of the way in.
    The client gets ENOSPC, and every 4 KiB block of the range then holds its old bytes (the
    base's) or the write's, as on a disk: never the zeros of the data file's holes, neither
    in the chunk the write stopped in nor in the one it never reached."""
    data = random.Random(10).randbytes(MIB)
    (tmp_dirs.base / "a.raw").write_bytes(data)
    cache = small_tmpfs / "cache"
    at, length = 4 * CHUNK, 2 * CHUNK
    options = ("--no-stream", "--chunk-size", "64K")
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        image = m.mnt / "a.raw"
        assert direct_read(image, 0, 4 * KIB) == data[: 4 * KIB]  # the data file exists
        os.sync()
        free = os.statvfs(small_tmpfs)
        with open(small_tmpfs / "filler", "wb") as f:  # room for 32 KiB more
            f.write(bytes(free.f_bavail * free.f_frsize - 32 * KIB))
        fd = os.open(image, os.O_WRONLY | os.O_DIRECT)
        buffer = mmap.mmap(-1, length)
        buffer[:] = b"w" * length
        try:
            with pytest.raises(OSError) as failed:
                os.pwritev(fd, [buffer], at)
        finally:
            os.close(fd)
        assert failed.value.errno == errno.ENOSPC
        (small_tmpfs / "filler").unlink()

        def check(got: bytes) -> None:
            for block in range(0, length, 4 * KIB):
                piece = got[block : block + 4 * KIB]
                old = data[at + block : at + block + 4 * KIB]
                assert piece in (old, b"w" * 4 * KIB), f"block at {at + block}: neither"

        check(direct_read(image, at, length))
        assert _fsync_errno(image) is None
        assert direct_read(image, 0, MIB)[:at] == data[:at]
    with CorfsMount(tmp_dirs.base, cache, tmp_dirs.mnt, *options, log_dir=tmp_dirs.logs) as m:
        check(direct_read(m.mnt / "a.raw", at, length))
