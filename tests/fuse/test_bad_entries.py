"""Issue 10, item 7 (directory bases): one bad base entry fails only itself. The mount comes
up, serves the good images and leaves each bad one out with one warning naming it (escaped,
one printable line). The HTTP and S3 cases are in tests/remote/test_bad_entries_remote.py."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading

import pytest

from tests.fifo import fifo_opened
from tests.mounting import make_image, run_corfs, sha256_file

from .util import KIB, MIB, direct_read

LONG_NAME = "é" * 100  # 200 bytes of UTF-8: a fine file name, but quoted it is 600 bytes


def test_long_utf8_name_is_served(tmp_dirs) -> None:
    good = make_image(tmp_dirs.base / "good.raw", MIB, seed=1)
    long_digest = sha256_file(make_image(tmp_dirs.base / LONG_NAME, MIB + 17, seed=2))
    with tmp_dirs.mount("--chunk-size", "64K", "--no-stream") as m:
        assert sorted(os.listdir(m.mnt)) == sorted(["good.raw", LONG_NAME])
        assert sha256_file(m.mnt / LONG_NAME) == long_digest
        assert sha256_file(m.mnt / "good.raw") == sha256_file(good)
        m.stop()
    names = os.listdir(tmp_dirs.cache / "data")
    assert all(len(n.encode()) <= 255 for n in names)
    assert "good.raw" in names  # short names keep their quoted data file (old caches work)
    # A remount finds the long name's chunks again: nothing to fetch, base gone or not.
    os.unlink(tmp_dirs.base / LONG_NAME)
    with tmp_dirs.mount("--no-stream") as m:
        assert sha256_file(m.mnt / LONG_NAME) == long_digest
        m.stop()


def _publish(src_dir, dest, name: str) -> None:
    src = make_image(src_dir / name, MIB, seed=3)
    result = run_corfs("publish", src, dest, "--chunk-size", "64K", "--no-progress")
    assert result.returncode == 0, result.stderr


def test_manifests_naming_dot_and_dotdot_are_left_out(tmp_dirs, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    _publish(tmp_path / "src", tmp_dirs.base, "pub.raw")
    good = make_image(tmp_dirs.base / "good.raw", MIB, seed=4)
    doc = json.loads((tmp_dirs.base / "pub.raw.corfs.json").read_text())
    for bad in (".", ".."):  # manifests that parse, for images named "." and ".."
        (tmp_dirs.base / f"{bad}.corfs.json").write_text(json.dumps({**doc, "name": bad}))
    with tmp_dirs.mount("--no-stream") as m:
        assert sorted(os.listdir(m.mnt)) == ["good.raw", "pub.raw"]
        assert sha256_file(m.mnt / "good.raw") == sha256_file(good)
        assert sha256_file(m.mnt / "pub.raw") == sha256_file(tmp_path / "src" / "pub.raw")
        m.stop()
    log = m.log_text()
    for bad in (".", ".."):
        lines = [line for line in log.splitlines() if f"leaving out image {bad!r}" in line]
        assert len(lines) == 1, log


def test_control_characters_and_bad_utf8_are_left_out_with_an_escaped_warning(
    tmp_dirs,
) -> None:
    good = make_image(tmp_dirs.base / "good.raw", MIB, seed=5)
    make_image(tmp_dirs.base / "evil\x1b[2Jname.raw", MIB, seed=6)
    make_image(tmp_dirs.base / os.fsdecode(b"latin1-\xe9.raw"), MIB, seed=7)
    with tmp_dirs.mount("--no-stream") as m:
        assert os.listdir(m.mnt) == ["good.raw"]
        assert sha256_file(m.mnt / "good.raw") == sha256_file(good)
        m.stop()
    log = m.log_text()
    assert "\x1b" not in log
    assert log.count("leaving out image 'evil\\x1b[2Jname.raw'") == 1, log
    assert log.count("leaving out image 'latin1-\\udce9.raw': it is not valid UTF-8") == 1, log


def _wake_openers(fifo) -> None:
    """Open the FIFO for writing, which lets whoever waits in an open() of it for reading go
    on (nobody waits: ENXIO)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        assert exc.errno == errno.ENXIO


def test_an_image_replaced_by_a_fifo_fails_alone(tmp_dirs) -> None:
    """A base image swapped for a FIFO after the listing: each read of it opened the FIFO,
    which blocks until a writer comes, in a thread holding one of the directory base's 8
    read slots; 8 such reads and every image of the base failed with EIO."""
    make_image(tmp_dirs.base / "swapped.raw", MIB, seed=8)
    good = make_image(tmp_dirs.base / "good.raw", MIB, seed=9)
    fifo = tmp_dirs.base / "swapped.raw"
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k", "--io-timeout", "2") as m:
        fifo.unlink()
        os.mkfifo(fifo)
        errors: list[int] = []

        def read(index: int) -> None:
            try:
                direct_read(m.mnt / "swapped.raw", index * 64 * KIB, 4096)
            except OSError as exc:
                errors.append(exc.errno)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(10)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert sha256_file(m.mnt / "good.raw") == sha256_file(good)
            assert errors == [errno.ESTALE] * 10  # it changed: not this version any more
        finally:
            _wake_openers(fifo)
        m.stop()


def test_a_symlink_put_in_an_images_place_is_not_followed(tmp_dirs, tmp_path) -> None:
    """The listing resolved the image's path; a symbolic link put there since was followed by
    the daemon (root) to whatever it names, opened before the identity check refused it: a
    device opened for nothing (an open of /dev/watchdog arms it), here a FIFO outside BASE
    whose waiting writer that open let go."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=10)
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        (tmp_dirs.base / "a.raw").unlink()
        (tmp_dirs.base / "a.raw").symlink_to(fifo)
        with fifo_opened(fifo) as opened:
            with pytest.raises(OSError) as failed:
                direct_read(m.mnt / "a.raw", 0, 4096)
            assert failed.value.errno == errno.ESTALE
            assert not opened.wait(1), "the daemon opened what the symbolic link names"
        m.stop()


def test_an_image_replaced_by_a_socket_fails_alone(tmp_dirs) -> None:
    """A base image swapped for a bound Unix socket after the listing: its open (O_NONBLOCK)
    fails with ENXIO, which was taken for a passing trouble of the base (TransientBaseError,
    EIO) where the image changed: ESTALE for it alone, the other image read as before."""
    make_image(tmp_dirs.base / "swapped.raw", MIB, seed=11)
    good = make_image(tmp_dirs.base / "good.raw", MIB, seed=12)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k", "--io-timeout", "2") as m:
        (tmp_dirs.base / "swapped.raw").unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.fspath(tmp_dirs.base / "swapped.raw"))
            with pytest.raises(OSError) as failed:
                direct_read(m.mnt / "swapped.raw", 0, 4096)
            assert failed.value.errno == errno.ESTALE, failed.value
            assert sha256_file(m.mnt / "good.raw") == sha256_file(good)
        m.stop()
