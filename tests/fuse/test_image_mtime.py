"""The mtime an image shows through the mount, across a remount. Backup and sync tools (rsync's
quick check, make, `find -newer`) decide from it whether an image changed.

While mounted, an image's mtime is the daemon's clock at its last client write
(image.py: `time.time_ns()` after the write) or what a setattr gave it (fuse_ops.py: kept in
memory only); at mount it is taken from the data file's st_mtime (mount.py), which the kernel
stamps with its coarse clock at every write to that file, client writes and fill stores alike.
So across a remount the mtime jumps: back (before the fine clock reading of the last write),
to a time set by no one (a fill stored by a mere read), and a set mtime is forgotten."""

from __future__ import annotations

import os
import time

from tests.mounting import make_image

from .util import MIB

OPTIONS = ("--no-stream", "--chunk-size", "64k")


def _mtime_after_remount(tmp_dirs) -> int:
    with tmp_dirs.mount(*OPTIONS) as m:
        mtime = os.stat(m.mnt / "a.raw").st_mtime_ns
        m.stop()
    return mtime


def test_an_image_written_after_its_mtime_was_seen_never_shows_an_older_one(tmp_dirs):
    """Write, look at the mtime, write again, remount: the image changed after the mtime was
    seen, so it must not show an older one (a tool asking "changed since?" would say no)."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=1)
    for attempt in range(3):
        with tmp_dirs.mount(*OPTIONS) as m:
            image = m.mnt / "a.raw"
            fd = os.open(image, os.O_RDWR)
            try:
                os.pwrite(fd, b"1" * 4096, 8192)
                seen = os.stat(image).st_mtime_ns
                os.pwrite(fd, b"2" * 4096, 8192)  # the image changes after `seen`
                os.fsync(fd)
            finally:
                os.close(fd)
            assert os.stat(image).st_mtime_ns > seen
            m.stop()
        after = _mtime_after_remount(tmp_dirs)
        assert after >= seen, f"attempt {attempt}: mtime went back {seen - after} ns"


def test_reading_an_image_does_not_change_its_mtime(tmp_dirs):
    """Reads fill chunks into the data file; nobody wrote the image, its mtime stays."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=2)
    before = _mtime_after_remount(tmp_dirs)
    time.sleep(0.05)
    with tmp_dirs.mount(*OPTIONS) as m:
        image = m.mnt / "a.raw"
        image.read_bytes()
        assert os.stat(image).st_mtime_ns == before  # while mounted: unchanged
        m.stop()
    assert _mtime_after_remount(tmp_dirs) == before


def test_a_set_mtime_is_kept_across_a_remount(tmp_dirs):
    """utime through the mount succeeds (touch -d, rsync -t, cp -p): then it must be kept, as a
    mode change that would not be kept is refused (fuse_ops.setattr)."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=3)
    when = 1_500_000_000_000_000_000
    with tmp_dirs.mount(*OPTIONS) as m:
        os.utime(m.mnt / "a.raw", ns=(when, when))
        assert os.stat(m.mnt / "a.raw").st_mtime_ns == when
        m.stop()
    assert _mtime_after_remount(tmp_dirs) == when
