"""Review 4: read_object now maps an object's failed open as an image's (_open_error), so a
chunk object of a published image on a dir base that is a socket (ENXIO), or whose fan-out
directory is a file (ENOTDIR), is BaseChanged: Image._fill sets image.error ("base image
changed") for good, and every absent chunk of the image fails ESTALE until a remount. A
content-addressed object never "changed since it was listed" (it was never listed); one bad
object is one bad chunk: EIO for it alone, as a missing or corrupt one (test_bad_chunk.py)."""

from __future__ import annotations

import os
import socket

from tests.fuse.test_bad_chunk import BAD, CHUNKS, dd_direct
from tests.fuse.test_published_mount import CHUNK, object_path, published_image


def test_a_chunk_object_that_is_a_socket_fails_only_itself(tmp_dirs) -> None:
    p = published_image(tmp_dirs, size=CHUNKS * CHUNK, zero=())
    bad = object_path(tmp_dirs.base, p.digests[BAD])
    bad.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        short = tmp_dirs.base / "s"  # AF_UNIX paths are short: bound here, moved in place
        sock.bind(os.fspath(short))
        os.rename(short, bad)
        with tmp_dirs.mount("--no-stream") as m:
            image = str(m.mnt / "a.raw")
            result = dd_direct(image, BAD)
            assert result.returncode != 0
            assert b"Input/output error" in result.stderr, result.stderr  # not ESTALE
            after = BAD + 3  # another absent chunk, its object fine
            result = dd_direct(image, after)
            assert result.returncode == 0, result.stderr
            assert result.stdout == p.want[after * CHUNK : (after + 1) * CHUNK]
            m.stop()
