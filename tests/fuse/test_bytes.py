"""Issue 2, point 2: every byte right. Bytes read through MNT equal BASE: whole image and random
ranges, sizes that are not a multiple of the chunk size, a 0-byte image, reads across chunk
boundaries, reads past EOF."""

from __future__ import annotations

import os
import random

from tests.mounting import make_image, sha256_file

from .util import KIB, MIB, direct_read

CHUNK = 64 * KIB
SIZES = {
    "aligned.raw": 4 * MIB,
    "odd.raw": 3 * MIB + 12345,  # last chunk short
    "tiny.raw": 1000,  # smaller than one chunk
    "one-byte.raw": 1,
    "empty.raw": 0,
    "sparse.raw": 2 * MIB + 7,  # zero blocks: ZERO chunks are holes in the cache
}


def _make_all(base):
    for seed, (name, size) in enumerate(SIZES.items()):
        zeros = (0, 2) if name == "sparse.raw" else ()
        make_image(base / name, size, seed=seed + 1, zero_blocks=zeros, block_size=256 * KIB)


def test_whole_images_equal_base(tmp_dirs):
    _make_all(tmp_dirs.base)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        assert sorted(os.listdir(m.mnt)) == sorted(SIZES)
        for name, size in SIZES.items():
            assert os.stat(m.mnt / name).st_size == size, name
            assert sha256_file(m.mnt / name) == sha256_file(tmp_dirs.base / name), name
        assert (m.mnt / "empty.raw").read_bytes() == b""
        m.stop()
    # the second mount serves the same bytes from the cache alone
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        for name in SIZES:
            assert sha256_file(m.mnt / name) == sha256_file(tmp_dirs.base / name), name
        m.stop()


def test_random_ranges_boundaries_and_eof(tmp_dirs):
    _make_all(tmp_dirs.base)
    rng = random.Random(7)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        for name, size in SIZES.items():
            want = (tmp_dirs.base / name).read_bytes()
            with open(m.mnt / name, "rb", buffering=0) as f:
                fd = f.fileno()
                # random ranges, cold and warm, through the page cache
                for _ in range(40):
                    off = rng.randrange(0, size + 1)
                    length = rng.randrange(0, 300 * KIB)
                    assert os.pread(fd, length, off) == want[off : off + length], (name, off)
                # ranges that straddle chunk boundaries
                for boundary in range(CHUNK, size, CHUNK):
                    for before, after in ((1, 1), (4 * KIB, 4 * KIB), (CHUNK - 1, CHUNK + 1)):
                        off = max(0, boundary - before)
                        got = os.pread(fd, before + after, off)
                        assert got == want[off : off + before + after], (name, boundary)
                # past EOF: short read at the end, empty beyond it
                assert os.pread(fd, 100, max(0, size - 10)) == want[max(0, size - 10) :]
                assert os.pread(fd, 4096, size) == b""
                assert os.pread(fd, 4096, size + 12345) == b""
        m.stop()


def test_direct_reads_across_chunks_and_past_eof(tmp_dirs):
    """O_DIRECT reads reach the daemon every time (no page cache): cold chunk fills that
    span several chunks, the short last chunk, and EOF."""
    _make_all(tmp_dirs.base)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        name, size = "odd.raw", SIZES["odd.raw"]
        want = (tmp_dirs.base / name).read_bytes()
        path = m.mnt / name
        for off, length in [
            (CHUNK - 4 * KIB, 8 * KIB),  # two chunks
            (5 * CHUNK - 4 * KIB, 3 * CHUNK),  # four chunks, cold
            (size - size % 4096, 64 * KIB),  # last partial page, short
            (size // CHUNK * CHUNK, CHUNK),  # the short last chunk
        ]:
            assert direct_read(path, off, length) == want[off : off + length], off
        assert direct_read(path, (size + 4095) // 4096 * 4096, 4096) == b""
        assert direct_read(m.mnt / "empty.raw", 0, 4096) == b""
        m.stop()
