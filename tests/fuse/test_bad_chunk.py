"""One bad chunk fails only itself (issue 10, item 9), through a real mount: a published image
whose chunk 5 object is damaged streams every other chunk, including 5's neighbours in the
same stream run; an O_DIRECT dd of a neighbour reads right bytes, dd of chunk 5 gives EIO, and
status (JSON and the table) names the failing chunk and its error."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import zstandard

from tests.fuse.test_published_mount import CHUNK, object_path, published_image
from tests.fuse.util import image_status, live_status, wait_for
from tests.mounting import run_corfs

BAD = 5
CHUNKS = 16


def dd_direct(path: str, chunk: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["dd", f"if={path}", "bs=64K", f"skip={chunk}", "count=1", "iflag=direct", "status=none"],
        capture_output=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("corrupt", f"chunk {BAD} failed its digest check"), ("missing", "does not exist")],
)
def test_a_bad_chunk_fails_only_itself(tmp_dirs, damage: str, reason: str) -> None:
    assert CHUNK == 64 << 10
    p = published_image(tmp_dirs, size=CHUNKS * CHUNK, zero=())
    if damage == "corrupt":
        data = bytearray(p.want[BAD * CHUNK : (BAD + 1) * CHUNK])
        data[100] ^= 0x01  # a right-sized zstd frame with one wrong byte: fails its digest
        compressed = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(data))
        object_path(tmp_dirs.base, p.digests[BAD]).write_bytes(compressed)
    else:  # a disk read gets EIO, never ENOENT ("the image file is gone") from the object
        object_path(tmp_dirs.base, p.digests[BAD]).unlink()
    with tmp_dirs.mount() as m:  # streaming, runs of 4 chunks: 4-7 holds the bad one
        image = m.mnt / "a.raw"
        st = wait_for(
            lambda: (s := image_status(live_status(m.mnt), "a.raw"))["local_bytes"]
            == (CHUNKS - 1) * CHUNK
            and s,
            20,
            "every chunk but the bad one to stream",
        )
        assert st["failing_chunks"] == 1 and st["failing_chunk_indexes"] == [BAD]
        assert reason in st["error"]
        assert st["state"] == "streaming"  # it keeps retrying chunk 5, later
        for neighbour in (BAD - 1, BAD + 1):
            result = dd_direct(str(image), neighbour)
            assert result.returncode == 0, result.stderr
            assert result.stdout == p.want[neighbour * CHUNK : (neighbour + 1) * CHUNK]
        result = dd_direct(str(image), BAD)
        assert result.returncode != 0 and b"Input/output error" in result.stderr
        assert image_status(live_status(m.mnt), "a.raw")["local_bytes"] == (CHUNKS - 1) * CHUNK
        table = run_corfs("status", m.mnt)
        assert table.returncode == 0, table.stderr
        assert f"failing chunks: 1 ({BAD})" in table.stdout
        m.stop()


def test_a_chunk_object_that_is_a_socket_fails_only_itself(tmp_dirs) -> None:
    """Review finding: an object's failed open was mapped as an image's, so a chunk object
    that is a socket (ENXIO), or whose fan-out directory is a file (ENOTDIR), was BaseChanged:
    the image's error for good, every absent chunk of it ESTALE until a remount. A
    content-addressed object was never listed, so never "changed": EIO for it alone."""
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
